"""Every hand-written shard implements :class:`persia.rpc.protocol.ShardProtocol` with a
compatible signature: the shard itself, the Ray actor class, its proxy and the recovery wrapper.
A new member of the protocol, or a drifting copy, fails here."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from persia.backends.ray.backend import ParameterServer, RemoteShard
from persia.backends.ray.recovery import RecoverableShard
from persia.embedding.optim import SGD
from persia.rpc.protocol import PROPERTIES, ShardProtocol
from persia.store import Shard

_RAY_TRACE = "_ray_trace_ctx"


def _members() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(ShardProtocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults (annotations may be narrower or wider). Once a class
    was made a Ray actor in this process, Ray's tracing adds a keyword ``_ray_trace_ctx`` to its
    methods: not part of the interface."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != _RAY_TRACE]


def test_the_protocol_declares_what_its_callers_use():
    assert set(_members()) == {
        "lookup",
        "apply_gradients",
        "stats",
        "export_rows",
        "import_rows",
        "track_changes",
        "tracking_changes",
        "changed_count",
        "take_changes",
    }
    assert set(PROPERTIES) == {n for n, v in _members().items() if isinstance(v, property)}


@pytest.mark.parametrize(
    "cls, remote",
    [(Shard, False), (RemoteShard, False), (RecoverableShard, False), (ParameterServer, True)],
    ids=["Shard", "RemoteShard", "RecoverableShard", "ParameterServer"],
)
def test_every_shard_class_implements_the_protocol(cls, remote):
    problems = []
    for name, want in _members().items():
        have = inspect.getattr_static(cls, name, None)
        if have is None:
            problems.append(f"{name}: missing")
        elif isinstance(want, property):
            if remote:  # an actor serves a property as a method without arguments
                if not callable(have) or _shape(inspect.signature(have)) != _shape(
                    inspect.signature(want.fget)
                ):
                    problems.append(f"{name}: not a method without arguments")
            elif not isinstance(have, property):
                problems.append(f"{name}: not a property")
        elif not callable(have):
            problems.append(f"{name}: not a method")
        elif _shape(inspect.signature(have)) != _shape(inspect.signature(want)):
            problems.append(
                f"{name}{inspect.signature(have)} != protocol {inspect.signature(want)}"
            )
    assert problems == [], f"{cls.__name__}: " + "; ".join(problems)


def test_a_shard_is_a_shard_protocol_at_run_time():
    shard = Shard(16, SGD(lr=0.1), dims=[4])
    assert isinstance(shard, ShardProtocol)
    rows = shard.lookup(np.array([1, 2], dtype=np.uint64), 4, True)
    assert rows.shape == (2, 4)
    assert set(shard.export_rows(4)) == {4}
