"""The autograd cost of a model concatenating persia's per-slot embeddings.

    python benchmarks/bench_slot_grads.py                 # 26 slots, dim 16, batch 4096
    python benchmarks/bench_slot_grads.py --batch-size 2048 --repeat 31
    python benchmarks/bench_slot_grads.py --quick                         # CI: batch 256, 3 steps

One training step's forward and backward of the embedding-bound workload's model (bottom MLP
13-16, top MLP (16 + 26 * 16)-32-1; ``bench_e2e.py --workload embedding-bound``) with the model
doing ``torch.cat(embeddings, dim=1)`` over the slots' tensors, as user models do, until the
gradient of the summed buffer is ready to leave, three ways, interleaved, median of repeats:

* ``views``: each slot a column view of one ``summed`` tensor that requires grad (persia before
  ``persia.ctx._device.split_slots``): each view's backward makes a full-width gradient;
* ``split``: :func:`persia.ctx._device.split_slots` (what ``prepare_features`` gives now): one
  autograd function whose backward concatenates the slots' gradients once;
* ``one-tensor``: the model takes ``summed`` itself (no per-slot tensors): the floor.

One JSON line per way (``ms_per_step``) and the ratios ``views_over_split`` and
``split_over_one_tensor``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from persia.ctx._device import split_slots  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=26)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=21, help="steps per way (median)")
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--quick", action="store_true", help="CI: batch 256, 3 steps per way")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeat = 256, 3
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    n, s, d = args.batch_size, args.slots, args.dim
    width = s * d
    bottom = nn.Sequential(nn.Linear(13, 16), nn.ReLU())
    top = nn.Sequential(nn.Linear(16 + width, 32), nn.ReLU(), nn.Linear(32, 1))
    dense = torch.randn(n, 13)
    labels = torch.randint(0, 2, (n, 1)).float()
    pooled = torch.randn(n, width) * 0.01
    cols = [(i * d, d) for i in range(s)]
    loss_fn = nn.BCEWithLogitsLoss()

    def step(way: str) -> torch.Tensor:
        summed = pooled.clone().requires_grad_()
        if way == "views":
            x = torch.cat([summed[:, a : a + w] for a, w in cols], dim=1)
        elif way == "split":
            x = torch.cat(split_slots(summed, cols), dim=1)
        else:
            x = summed
        loss = loss_fn(top(torch.cat([bottom(dense), x], dim=1)), labels)
        loss.backward()
        assert summed.grad is not None
        return summed.grad

    ways = ("views", "split", "one-tensor")
    ref = step("views")
    for way in ways[1:]:  # the same gradient every way
        torch.testing.assert_close(step(way), ref)
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(3):  # warm up
        for w in ways:
            step(w)
    for _ in range(args.repeat):
        for w in ways:
            top.zero_grad()
            bottom.zero_grad()
            t0 = time.perf_counter()
            step(w)
            times[w].append(time.perf_counter() - t0)
    ms = {w: 1000.0 * statistics.median(t) for w, t in times.items()}
    common = {"slots": s, "dim": d, "batch_size": n, "repeat": args.repeat,
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    for w in ways:
        print(json.dumps({"way": w, "ms_per_step": round(ms[w], 3), **common}), flush=True)
    for metric, value in (
        ("views_over_split", ms["views"] / ms["split"]),
        ("split_over_one_tensor", ms["split"] / ms["one-tensor"]),
    ):
        print(json.dumps({"metric": metric, "value": round(value, 3), "unit": "x", **common}))


if __name__ == "__main__":
    main()
