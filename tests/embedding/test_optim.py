"""persia.embedding.optim: kernels vs NumPy twins, SGD/Adagrad/Adam vs torch, validation, dicts."""

from __future__ import annotations

import json
import pickle

import naive_optim
import numpy as np
import pytest
import torch

from persia.embedding.optim import ADAM_MAX_STEP, SGD, Adagrad, Adam, EmbeddingOptimizer
from persia.errors import ConfigError, StoreError

OPTIMIZERS = [
    SGD(lr=0.1),
    SGD(lr=0.05, momentum=0.9),
    SGD(lr=0.05, momentum=0.5, weight_decay=0.1),
    SGD(lr=0.2, weight_decay=0.3),
    Adagrad(),
    Adagrad(lr=0.3, initial_accumulator_value=0.0, eps=1e-6),
    Adagrad(lr=0.1, weight_decay=0.2, g_square_momentum=0.9, eps=1e-3),
    Adagrad(lr=0.1, vectorwise_shared=True),
    Adagrad(
        lr=0.2,
        initial_accumulator_value=0.5,
        weight_decay=0.1,
        g_square_momentum=0.8,
        eps=1e-4,
        vectorwise_shared=True,
    ),
    Adam(),
    Adam(lr=0.05, betas=(0.5, 0.9), weight_decay=0.1, eps=1e-3),
    Adam(lr=0.01, betas=(0.0, 0.0)),
]


def _table(opt: EmbeddingOptimizer, num: int, dim: int, rng: np.random.Generator):
    values = rng.uniform(-1, 1, (num, dim)).astype(np.float32)
    state = np.tile(opt.initial_state(dim), (num, 1))
    if state.shape[1]:  # a used state, not only the initial one
        state += rng.uniform(0, 0.5, state.shape).astype(np.float32)
        if opt.name == "adam":
            state[:, -1] = rng.integers(0, 5, num)
    return values, np.ascontiguousarray(state, dtype=np.float32)


def _batch(num: int, n: int, dim: int, rng: np.random.Generator):
    rows = rng.integers(-1, num, n).astype(np.int32)  # -1 (absent) and duplicates included
    grads = rng.normal(0, 1, (n, dim)).astype(np.float32)
    bad = rng.random(n) < 0.1
    grads[bad, rng.integers(0, dim, int(bad.sum()))] = rng.choice(
        np.array([np.nan, np.inf, -np.inf], np.float32), int(bad.sum())
    )
    return rows, grads


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o))
@pytest.mark.parametrize("bound", [0.0, 0.7, np.inf])
@pytest.mark.parametrize("dim", [1, 5, 16, 33])
def test_kernel_matches_twin(opt: EmbeddingOptimizer, bound: float, dim: int) -> None:
    rng = np.random.default_rng(dim * 7 + int(bound * 10 if bound < 1 else 3))
    num = 40
    values, state = _table(opt, num, dim, rng)
    twin_values, twin_state = values.copy(), state.copy()
    total = np.zeros(3, np.int64)
    for _ in range(3):
        rows, grads = _batch(num, 150, dim, rng)  # 150 > 2 blocks of the kernel
        grads_before = grads.copy()
        got = opt.apply(values, state, rows, grads, bound)
        want = naive_optim.apply(opt, twin_values, twin_state, rows, grads, bound)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(grads, grads_before)  # grads are not modified
        np.testing.assert_allclose(values, twin_values, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(state, twin_state, rtol=2e-6, atol=1e-7)
        total += got
    assert total[1] > 0 and total[2] > 0 and total[0] > 0
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(state))
    if 0 < bound < np.inf:
        assert np.abs(values).max() <= np.float32(bound)
        assert np.isclose(np.abs(values).max(), bound)  # the bound was reached: clipping ran


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o))
def test_skipped_rows_are_untouched_and_duplicates_apply_in_order(opt: EmbeddingOptimizer) -> None:
    rng = np.random.default_rng(1)
    values, state = _table(opt, 6, 4, rng)
    v0, s0 = values.copy(), state.copy()
    grads = rng.normal(0, 1, (4, 4)).astype(np.float32)
    grads[1, 2] = np.nan
    counts = opt.apply(values, state, np.array([2, 3, -1, 2], np.int32), grads, 0.0)
    assert counts.tolist() == [2, 1, 1]
    untouched = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(values[untouched], v0[untouched])
    np.testing.assert_array_equal(state[untouched], s0[untouched])
    # the same as two separate calls, in order
    v1, s1 = v0.copy(), s0.copy()
    opt.apply(v1, s1, np.array([2], np.int32), grads[:1].copy(), 0.0)
    opt.apply(v1, s1, np.array([2], np.int32), grads[3:].copy(), 0.0)
    np.testing.assert_array_equal(values, v1)
    np.testing.assert_array_equal(state, s1)


def test_every_option_changes_the_result() -> None:
    base = {
        SGD: dict(lr=0.1, momentum=0.5, weight_decay=0.1),
        Adagrad: dict(
            lr=0.1,
            initial_accumulator_value=0.1,
            weight_decay=0.1,
            g_square_momentum=0.9,
            eps=1e-2,
            vectorwise_shared=False,
        ),
        Adam: dict(lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-2),
    }
    changed = {
        "lr": 0.2,
        "momentum": 0.8,
        "weight_decay": 0.3,
        "initial_accumulator_value": 0.5,
        "g_square_momentum": 0.5,
        "eps": 0.5,
        "vectorwise_shared": True,
        "betas": (0.5, 0.9),
    }

    def run(opt: EmbeddingOptimizer) -> np.ndarray:
        values = np.full((3, 4), 0.5, np.float32)
        values[1] = -0.25
        state = np.tile(opt.initial_state(4), (3, 1))
        g = np.random.default_rng(3).normal(0, 1, (2, 3, 4)).astype(np.float32)
        for step in range(2):
            opt.apply(values, state, np.array([0, 1, 2], np.int32), g[step], 0.0)
        return values

    for cls, kwargs in base.items():
        reference = run(cls(**kwargs))
        for key in kwargs:
            other = run(cls(**{**kwargs, key: changed[key]}))
            assert not np.allclose(other, reference, rtol=1e-5, atol=0), (cls.__name__, key)


# torch warns about its own sparse tensors in Adagrad/SparseAdam; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _torch_steps(module, opt, batches, ours, dim, num, weights):
    """Train the torch module and our table on the same bags; return the max error per step."""
    values = weights.copy()
    state = np.tile(ours.initial_state(dim), (num, 1))
    errors = []
    for indices, offsets, coeff in batches:
        opt.zero_grad()
        out = module(torch.from_numpy(indices), torch.from_numpy(offsets))
        (out * torch.from_numpy(coeff)).sum().backward()
        grad = module.weight.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows = grad.indices()[0].numpy().astype(np.int32)
            grads = np.ascontiguousarray(grad.values().numpy())
        else:
            rows = np.arange(num, dtype=np.int32)
            grads = np.ascontiguousarray(grad.numpy())
        opt.step()
        counts = ours.apply(values, state, rows, grads, 0.0)
        assert counts.tolist() == [len(rows), 0, 0]
        ref = module.weight.detach().numpy()
        # error relative to the table's scale (elements near 0 have no meaningful relative error);
        # not 0: torch's AVX-512 sqrt is off by 1 ulp at times, torch's SGD adds duplicates singly
        errors.append(float(np.max(np.abs(values - ref)) / np.max(np.abs(ref))))
    return values, state, errors


def _bags(num, dim, steps, cover_all, rng):
    batches = []
    for _ in range(steps):
        indices = rng.integers(0, num, 60)
        if cover_all:
            indices = np.concatenate([indices, np.arange(num)])
        else:
            indices = np.concatenate([indices, indices[:10]])  # duplicates inside bags
        offsets = np.sort(rng.choice(np.arange(1, len(indices)), 7, replace=False))
        offsets = np.concatenate([[0], offsets])
        coeff = rng.normal(0, 1, (8, dim)).astype(np.float32)
        batches.append((indices.astype(np.int64), offsets.astype(np.int64), coeff))
    return batches


def _module(num, dim, weights, sparse):
    torch.manual_seed(0)
    module = torch.nn.EmbeddingBag(num, dim, mode="sum", sparse=sparse)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weights))
    return module


@pytest.mark.parametrize("cover_all", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1, initial_accumulator_value=1e-2),
        dict(lr=0.3, initial_accumulator_value=0.0),
        dict(lr=0.05, initial_accumulator_value=0.25, eps=1e-3),
    ],
)
def test_adagrad_matches_torch_sparse(kwargs, cover_all) -> None:
    rng = np.random.default_rng(4)
    num, dim = 50, 8
    weights = rng.uniform(-0.5, 0.5, (num, dim)).astype(np.float32)
    module = _module(num, dim, weights, sparse=True)
    ours = Adagrad(**kwargs)
    topt = torch.optim.Adagrad(module.parameters(), **kwargs)  # torch's defaults differ from ours
    assert topt.defaults["initial_accumulator_value"] == ours.initial_accumulator_value
    batches = _bags(num, dim, 6, cover_all, rng)
    _, state, errors = _torch_steps(module, topt, batches, ours, dim, num, weights)
    assert max(errors) < 1e-6, errors
    torch_sum = topt.state[module.weight]["sum"].numpy()
    np.testing.assert_allclose(state, torch_sum, rtol=1e-6)


@pytest.mark.parametrize("cover_all", [False, True])
def test_plain_sgd_matches_torch_sparse(cover_all) -> None:
    rng = np.random.default_rng(5)
    num, dim = 50, 8
    weights = rng.uniform(-0.5, 0.5, (num, dim)).astype(np.float32)
    module = _module(num, dim, weights, sparse=True)
    topt = torch.optim.SGD(module.parameters(), lr=0.1)
    batches = _bags(num, dim, 6, cover_all, rng)
    _, _, errors = _torch_steps(module, topt, batches, SGD(lr=0.1), dim, num, weights)
    assert max(errors) < 1e-6, errors


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.05, weight_decay=0.2),
        dict(lr=0.05, momentum=0.5, weight_decay=0.1),
    ],
)
def test_sgd_momentum_and_weight_decay_match_torch(kwargs) -> None:
    # torch decays momentum and weights of every row each step; lazy = torch when all rows are hit
    rng = np.random.default_rng(6)
    num, dim = 30, 4
    weights = rng.uniform(-0.5, 0.5, (num, dim)).astype(np.float32)
    module = _module(num, dim, weights, sparse=False)
    topt = torch.optim.SGD(module.parameters(), **kwargs)
    batches = _bags(num, dim, 6, True, rng)
    _, state, errors = _torch_steps(module, topt, batches, SGD(**kwargs), dim, num, weights)
    assert max(errors) < 1e-6, errors
    if kwargs.get("momentum"):
        buf = topt.state[module.weight]["momentum_buffer"].numpy()
        np.testing.assert_allclose(state, buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(lr=0.01), dict(lr=0.05, betas=(0.5, 0.9), eps=1e-4)])
def test_adam_matches_torch_sparse_adam(kwargs) -> None:
    rng = np.random.default_rng(7)
    num, dim = 30, 8
    weights = rng.uniform(-0.5, 0.5, (num, dim)).astype(np.float32)
    module = _module(num, dim, weights, sparse=True)
    topt = torch.optim.SparseAdam(list(module.parameters()), **kwargs)
    batches = _bags(num, dim, 8, True, rng)
    _, state, errors = _torch_steps(module, topt, batches, Adam(**kwargs), dim, num, weights)
    assert max(errors) < 1e-6, errors
    tstate = topt.state[module.weight]
    np.testing.assert_allclose(state[:, :dim], tstate["exp_avg"].numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(state[:, dim:-1], tstate["exp_avg_sq"].numpy(), rtol=1e-6)
    assert np.all(state[:, -1] == 8)


def test_adam_step_count_is_per_row_and_saturates() -> None:
    opt = Adam(lr=0.1)
    values = np.zeros((3, 2), np.float32)
    state = np.tile(opt.initial_state(2), (3, 1))
    state[2, -1] = ADAM_MAX_STEP - 1
    ones = np.ones((4, 2), np.float32)
    opt.apply(values, state, np.array([0, 0, 2, 2], np.int32), ones, 0.0)
    assert state[:, -1].tolist() == [2, 0, ADAM_MAX_STEP]
    # first step of a fresh row: m / (1-b1) = g, v / (1-b2) = g^2, so the update is ~lr * sign(g)
    v = np.zeros((1, 2), np.float32)
    s = np.tile(opt.initial_state(2), (1, 1))
    opt.apply(v, s, np.array([0], np.int32), np.array([[3.0, -0.5]], np.float32), 0.0)
    np.testing.assert_allclose(v, [[-0.1, 0.1]], rtol=1e-6)


def test_state_layout() -> None:
    assert SGD(0.1).state_width(16) == 0
    assert SGD(0.1, momentum=0.9).state_width(16) == 16
    assert Adagrad().state_width(16) == 16
    assert Adagrad(vectorwise_shared=True).state_width(16) == 1
    assert Adam().state_width(16) == 33
    np.testing.assert_array_equal(
        Adagrad(initial_accumulator_value=0.3).initial_state(3), np.full(3, 0.3, np.float32)
    )
    np.testing.assert_array_equal(Adam().initial_state(2), np.zeros(5, np.float32))
    for opt in OPTIMIZERS:
        assert opt.initial_state(7).dtype == np.float32
        assert opt.initial_state(7).shape == (opt.state_width(7),)
    assert {o.name for o in OPTIMIZERS} == {"sgd", "adagrad", "rowwise_adagrad", "adam"}
    with pytest.raises(StoreError, match="dim must be an integer > 0, got 0"):
        Adagrad().state_width(0)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SGD(lr=0), "lr"),
        (lambda: SGD(lr=-1.0), "lr"),
        (lambda: SGD(lr=float("nan")), "lr"),
        (lambda: SGD(lr=0.1, momentum=-0.1), "momentum"),
        (lambda: SGD(lr=0.1, weight_decay=-1), "weight_decay"),
        (lambda: SGD(lr="0.1"), "lr"),
        (lambda: SGD(lr=True), "lr"),
        (lambda: Adam(betas=(0.9, 1.0)), "betas[1]"),
        (lambda: Adam(betas=(-0.1, 0.9)), "betas[0]"),
        (lambda: Adam(betas=(0.9,)), "betas"),
        (lambda: Adam(eps=0), "eps"),
        (lambda: Adam(lr=float("inf")), "lr"),
        (lambda: Adam(weight_decay=-0.5), "weight_decay"),
        (lambda: Adagrad(initial_accumulator_value=-1), "initial_accumulator_value"),
        (lambda: Adagrad(g_square_momentum=0), "g_square_momentum"),
        (lambda: Adagrad(g_square_momentum=1.5), "g_square_momentum"),
        (lambda: Adagrad(eps=-1e-10), "eps"),
        (lambda: Adagrad(weight_decay=-1), "weight_decay"),
        (lambda: Adagrad(vectorwise_shared="yes"), "vectorwise_shared"),
    ],
)
def test_bad_config_names_the_field(make, field) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        Adagrad(lr=0, eps=0, g_square_momentum=2)
    assert len(info.value.problems) == 3
    assert "lr must be > 0, got 0" in str(info.value)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: repr(o))
def test_dict_round_trip(opt: EmbeddingOptimizer) -> None:
    d = json.loads(json.dumps(opt.to_dict()))
    assert d["type"] == type(opt).__name__
    back = EmbeddingOptimizer.from_dict(d)
    assert back == opt and type(back) is type(opt)
    assert type(opt).from_dict(d) == opt
    assert pickle.loads(pickle.dumps(opt)) == opt
    assert hash(back) == hash(opt)


def test_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match="type must be one of"):
        EmbeddingOptimizer.from_dict({"type": "RMSprop", "lr": 0.1})
    with pytest.raises(ConfigError, match="unknown field"):
        EmbeddingOptimizer.from_dict({"type": "SGD", "lr": 0.1, "nesterov": True})
    with pytest.raises(ConfigError, match="lr"):
        EmbeddingOptimizer.from_dict({"type": "SGD"})
    with pytest.raises(ConfigError, match="must be Adam"):
        Adam.from_dict(SGD(0.1).to_dict())
    with pytest.raises(ConfigError, match="lr must be > 0"):
        EmbeddingOptimizer.from_dict({"type": "Adam", "lr": -1})


def test_ints_are_normalised_to_float() -> None:
    opt = Adagrad(lr=1, weight_decay=0, g_square_momentum=1)
    assert isinstance(opt.lr, float) and opt == Adagrad(lr=1.0)
    assert Adam(betas=[0, 0.5]).betas == (0.0, 0.5)


def test_apply_validates_arguments() -> None:
    opt = Adagrad()
    values = np.zeros((5, 4), np.float32)
    state = np.tile(opt.initial_state(4), (5, 1))
    rows = np.array([0, 4], np.int32)
    grads = np.ones((2, 4), np.float32)
    cases = [
        (dict(values=values.astype(np.float64)), "values must have dtype float32"),
        (dict(values=np.zeros((5, 2), np.float32)), "state must have shape"),
        (dict(values=np.zeros((5, 8), np.float32)[:, ::2]), "values must be C-contiguous"),
        (dict(state=state[:, :1].copy()), r"state must have shape \(5, 4\)"),
        (dict(rows=rows.astype(np.int64)), "rows must have dtype int32"),
        (dict(rows=np.array([0, 5], np.int32)), r"rows must be in \[-1, 5\), got 5"),
        (dict(rows=np.array([0, -2], np.int32)), "got -2"),
        (dict(grads=np.ones((3, 4), np.float32)), r"grads must have shape \(2, 4\)"),
        (dict(grads=[[1.0] * 4] * 2), "grads must be a numpy array"),
        (dict(weight_bound=float("nan")), "weight_bound"),
        (dict(weight_bound="10"), "weight_bound"),
    ]
    base = dict(values=values, state=state, rows=rows, grads=grads, weight_bound=10.0)
    for change, message in cases:
        with pytest.raises(StoreError, match=message):
            opt.apply(**{**base, **change})
    assert np.all(values == 0) and np.all(state == opt.initial_state(4))
    empty = opt.apply(values, state, np.zeros(0, np.int32), np.zeros((0, 4), np.float32), 1.0)
    assert empty.tolist() == [0, 0, 0] and empty.dtype == np.int64
    assert opt.apply(**base).tolist() == [2, 0, 0]


def test_threads_on_separate_tables_match_sequential_runs() -> None:
    import threading

    opt = Adagrad(lr=0.1, vectorwise_shared=False)
    rng = np.random.default_rng(8)
    tables = [_table(opt, 2000, 16, rng) for _ in range(2)]
    batches = [_batch(2000, 20000, 16, rng) for _ in range(2)]
    expected = []
    for (values, state), (rows, grads) in zip(tables, batches, strict=True):
        v, s = values.copy(), state.copy()
        opt.apply(v, s, rows, grads, 1.0)
        expected.append((v, s))
    threads = [
        threading.Thread(target=opt.apply, args=(values, state, rows, grads, 1.0))
        for (values, state), (rows, grads) in zip(tables, batches, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (values, state), (v, s) in zip(tables, expected, strict=True):
        np.testing.assert_array_equal(values, v)
        np.testing.assert_array_equal(state, s)
