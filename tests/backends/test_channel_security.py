"""The job's ZeroMQ channels admit only the job (persia.rpc.security): a stranger process that
knows each server's address and public key, but none of the job's client keys, gets no reply from
a parameter server, an embedding-worker actor or a data loader, and changes no row; with
``channel_security="null"`` the same stranger does get in (so the probe can see a hole). Training
with CURVE is bit-identical to training without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime._jobs import Net, make_batches, run, to_persia, train_ctx

from persia.backends.ray.backend import ClusterConfig
from persia.errors import ConfigError

STRANGER = Path(__file__).with_name("_stranger.py")


def stranger(targets: list[dict]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(STRANGER), json.dumps(targets)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _target(kind: str, access, keys=(), dim: int = 4) -> dict:
    key = access.server_key.decode() if access.server_key is not None else "0" * 40
    return {
        "kind": kind,
        "address": access.address,
        "server_key": key,
        "keys": list(keys),
        "dim": dim,
    }


def _train(ray_cluster, security: str, probe: bool):
    torch.manual_seed(0)
    cluster = ClusterConfig(
        num_ps=2, num_embedding_workers=1, ew_num_cpus=0.1, timeout_s=30, channel_security=security
    )
    with train_ctx(Net(), backend="ray", cluster=cluster) as ctx:
        losses = run(ctx, make_batches(8, seed=5))
        ctx.runtime.flush(30)
        if not probe:
            return losses, None
        ps = ctx.runtime.store.actors
        ew = ctx.runtime.worker.actors
        parts = [ray_cluster.get(a.export_rows.remote(4)) for a in ps]
        keys = [[int(k) for k in p[4]["keys"][:5]] for p in parts]
        targets = [
            _target("ps", ray_cluster.get(a.access.remote()), k)
            for a, k in zip(ps, keys, strict=True)
        ]
        targets.append(_target("ew", ray_cluster.get(ew[0].access.remote()), [1, 2, 3]))
        result = stranger(targets)
        after = [ray_cluster.get(a.export_rows.remote(4)) for a in ps]
        for before, now in zip(parts, after, strict=True):
            np.testing.assert_array_equal(before[4]["keys"], now[4]["keys"])
            if security == "curve":  # not one value moved, no row added or dropped
                np.testing.assert_array_equal(before[4]["values"], now[4]["values"])
            else:  # the probe can get in: its gradients of 1e3 moved the rows
                assert not np.array_equal(before[4]["values"], now[4]["values"])
        return losses, result


def test_a_stranger_gets_nothing_and_curve_trains_bit_identically(ray_cluster):
    secure, probed = _train(ray_cluster, "curve", probe=True)
    assert [p["kind"] for p in probed] == ["ps", "ps", "ew"]
    assert all(p["curve"] == 0 and p["null"] == 0 for p in probed), probed
    plain, open_probe = _train(ray_cluster, "null", probe=True)
    # the control: the same stranger gets every reply from a NULL-mechanism job
    assert [p["null"] for p in open_probe] == [2, 2, 1], open_probe
    assert secure == plain  # bit-identical losses, staleness 1


def test_a_stranger_gets_no_batch_from_a_data_loader(ray_cluster):
    from persia.backends.ray.stream import StreamSender, receive_batches

    batches = make_batches(2, seed=1)
    for security in ("curve", "null"):
        channel = f"sec-{security}"
        sender = StreamSender(
            replica_index=0,
            replica_size=1,
            channel=channel,
            timeout_s=30,
            linger_s=1,
            security=security,
        )
        # the loader hands each batch to whoever asks first: a stranger that gets in steals one
        sending = threading.Thread(
            target=lambda s=sender: [s.send(to_persia(b)) for b in batches], daemon=True
        )
        sending.start()
        info = ray_cluster.get(sender._actor.get.remote())
        probed = stranger([_target("stream", info["endpoint"])])[0]
        got: list = []
        reader = threading.Thread(
            target=lambda c=channel, g=got: g.extend(receive_batches(c, timeout_s=30)), daemon=True
        )
        reader.start()
        sending.join(30)
        sender.close()
        reader.join(30)
        assert not reader.is_alive() and not sending.is_alive()
        if security == "curve":
            assert probed["curve"] == 0 and probed["null"] == 0, probed
            assert len(got) == len(batches)  # the job's own reader got every batch
            np.testing.assert_array_equal(got[0].non_id_type_features[0].data, batches[0][1])
        else:  # the control: NULL hands a batch to anyone who asks
            assert probed["null"] == 1, probed
            assert len(got) == len(batches) - 1


def test_channel_security_setting_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match="channel_security"):
        ClusterConfig(channel_security="tls")
    monkeypatch.setenv("PERSIA_CHANNEL_SECURITY", "nope")
    with pytest.raises(ConfigError, match="PERSIA_CHANNEL_SECURITY"):
        ClusterConfig()
    monkeypatch.setenv("PERSIA_CHANNEL_SECURITY", "null")
    assert ClusterConfig().channel_security == "null"
    monkeypatch.delenv("PERSIA_CHANNEL_SECURITY")
    assert ClusterConfig().channel_security == "curve"
