"""A process that is not part of the job: it knows a server's address and public key (both can
leak: they are not secrets) but holds none of the job's client keys. It tries each target with
CURVE under its own key pair and with ZeroMQ's NULL mechanism, and prints how many replies it got.

Usage: python _stranger.py '<json list of {"kind", "address", "server_key", "keys", "dim"}>'
kinds: "ps" (lookup + a poisoned apply_gradients), "ew" (a forward), "stream" (asks for a batch).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import zmq

from persia.rpc.zmq_transport import encode

WAIT_MS = 1500


def _requests(target: dict) -> list[list]:
    if target["kind"] == "ps":
        keys = np.array(target["keys"], dtype=np.uint64)
        grads = np.full((len(keys), int(target["dim"])), 1e3, dtype=np.float32)
        return [
            encode({"id": 1, "m": "lookup"}, [keys, int(target["dim"]), False]),
            encode({"id": 2, "m": "apply_gradients"}, [keys, grads]),
        ]
    if target["kind"] == "ew":
        ids = np.array(target["keys"], dtype=np.uint64)
        lengths = np.ones(len(ids), dtype=np.int64)
        return [encode({"id": 1, "m": "forward"}, [1, False, len(ids), 1, "a", ids, lengths])]
    return [[b"next"]]


def attempt(ctx: zmq.Context, target: dict, curve: bool) -> int:
    replies = 0
    for frames in _requests(target):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve:
            public, secret = zmq.curve_keypair()  # a key pair of its own, not the job's
            sock.curve_serverkey = target["server_key"].encode()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(target["address"])
        sock.send_multipart(frames)
        if sock.poll(WAIT_MS):
            sock.recv_multipart()
            replies += 1
        sock.close(0)
    return replies


def main() -> None:
    targets = json.loads(sys.argv[1])
    ctx = zmq.Context()
    out = []
    for t in targets:
        got = {"curve": attempt(ctx, t, True), "null": attempt(ctx, t, False)}
        out.append({"kind": t["kind"], "address": t["address"], **got})
    ctx.term()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
