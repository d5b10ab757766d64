"""The runtime and the embedding worker are Protocols, implemented by the local and the Ray
classes with compatible signatures (checked with inspect, so that a backend's copy cannot
drift), and the floors above use them without duck typing."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from persia.backends.ray.embedding_workers import RemoteEmbeddingWorker, RemoteLookup
from persia.backends.ray.runtime import RayRuntime
from persia.backends.ray.serving import RayServingRuntime
from persia.checkpoint.follow import ServingRuntime
from persia.ctx import TrainCtx
from persia.data import DataLoader
from persia.embedding.optim import Adagrad
from persia.runtime.pipeline import Runtime, RuntimeProtocol
from persia.worker.embedding_worker import EmbeddingWorker, Lookup
from persia.worker.protocol import EmbeddingWorkerProtocol, LookupResult
from runtime._jobs import ListDataset, Net, embedding_file, make_batches

PERSIA = Path(__file__).resolve().parents[2] / "persia"


def _members(protocol: type) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _shape(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _problems(cls: type, protocol: type) -> list[str]:
    problems = []
    for name, want in _members(protocol).items():
        have = inspect.getattr_static(cls, name, None)
        if have is None:
            problems.append(f"{name}: missing")
        elif isinstance(want, property):
            if not isinstance(have, property):
                problems.append(f"{name}: not a property")
        elif not callable(have):
            problems.append(f"{name}: not a method")
        elif _shape(have) != _shape(want):
            problems.append(f"{name}{inspect.signature(have)} != {inspect.signature(want)}")
    return problems


def test_the_runtime_protocol_declares_what_its_callers_use():
    assert set(_members(RuntimeProtocol)) == {
        "closed",
        "lookup",
        "submit",
        "flush",
        "close",
        "delta_interval_s",
        "attach_delta_writer",
        "recovery_report",
        "prefetch",
        "push_metrics",
    }
    assert set(RuntimeProtocol.__annotations__) == {
        "store",
        "spec",
        "read_only",
        "training_allowed",
        "counts",
        "batches_applied",
    }
    assert set(_members(EmbeddingWorkerProtocol)) == {"forward", "backward", "close"}


@pytest.mark.parametrize("cls", [Runtime, RayRuntime, ServingRuntime, RayServingRuntime])
def test_every_runtime_implements_the_protocol(cls):
    assert _problems(cls, RuntimeProtocol) == []


@pytest.mark.parametrize("cls", [EmbeddingWorker, RemoteEmbeddingWorker])
def test_every_embedding_worker_implements_the_protocol(cls):
    assert _problems(cls, EmbeddingWorkerProtocol) == []


@pytest.mark.parametrize("cls", [Lookup, RemoteLookup])
def test_every_lookup_result_has_the_fields_the_context_reads(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(_members(LookupResult)) <= fields


def test_a_local_runtime_and_worker_are_their_protocols_at_run_time():
    model = Net()
    with TrainCtx(
        Adagrad(lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        embedding_config_file=embedding_file(),
    ) as ctx:
        runtime = ctx.runtime
        assert isinstance(runtime, RuntimeProtocol)
        assert isinstance(runtime, Runtime)
        assert isinstance(runtime.worker, EmbeddingWorkerProtocol)
        assert runtime.delta_interval_s is None and runtime.recovery_report() is None
        assert not runtime.closed
        for batch in DataLoader(ListDataset(make_batches(2))):
            assert isinstance(batch.lookup, LookupResult)
            out, labels = ctx.forward(batch)
            ctx.backward(torch.nn.functional.binary_cross_entropy(out, labels[0]))
    runtime.close()
    assert runtime.closed


def test_no_runtime_or_worker_is_duck_typed():
    """The floors above the runtime use the protocols, not getattr / hasattr on a runtime or
    an embedding worker."""
    pattern = re.compile(r"\b(getattr|hasattr)\(\s*[\w.]*(runtime|worker)\b")
    found = [
        f"{path.relative_to(PERSIA.parent)}:{i}: {line.strip()}"
        for path in sorted(PERSIA.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
