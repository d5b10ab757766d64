"""The chart of bench_e2e.py's results, drawn with matplotlib (the ``dev`` extra installs it).

Left: samples/s per contender (horizontal bars, value at the end). Right: persia's held-out AUC
against the staleness bound (1, 2, 4, 8, 16) when the sweep ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {
    "persia": "#1f77b4",
    "torch": "#d62728",
    "torchrec": "#ff7f0e",
    "dense": "#7f7f7f",
}


def _color(name: str) -> str:
    for key in ("torchrec", "torch", "persia", "dense"):
        if name.startswith(key):
            return _COLORS[key]
    return "#000000"


def write_chart(path: Path, results: dict[str, dict[str, Any]], title: str | None = None) -> None:
    """Writes the two-panel PNG for ``results`` (label -> result line)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    bars = [(k, float(v["samples_per_s"])) for k, v in results.items() if "staleness-" not in k]
    sweep = sorted(
        (int(v["staleness"]), float(v["auc"]))
        for k, v in results.items()
        if (k.startswith("persia-staleness-") or k in ("persia-sync", "persia-hybrid"))
        and v.get("staleness") is not None
        and v.get("auc") is not None
    )
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, max(4.0, 0.38 * len(bars) + 1.6)), width_ratios=(1.4, 1)
    )
    names = [n for n, _ in bars][::-1]
    values = [v for _, v in bars][::-1]
    left.barh(names, values, color=[_color(n) for n in names])
    top = max(values, default=1.0)
    for y, v in enumerate(values):
        left.text(v + top * 0.01, y, f"{v / 1000:.1f}k", va="center", fontsize=9)
    left.set_xlim(0, top * 1.15)
    left.set_xlabel("samples/s")
    left.set_title("samples/s per contender")
    left.grid(axis="x", alpha=0.3)
    ks = [1, 2, 4, 8, 16]
    if sweep:
        xs = [k for k, _ in sweep]
        aucs = [a for _, a in sweep]
        right.plot(xs, aucs, marker="o", color=_COLORS["persia"])
        for k, a in sweep:
            right.annotate(f"{a:.4f}", (k, a), textcoords="offset points", xytext=(0, 8),
                           ha="center", fontsize=9)  # fmt: skip
        right.set_xscale("log", base=2)
        right.set_xticks(ks, [str(k) for k in ks])
        pad = max(0.002, (max(aucs) - min(aucs)) * 0.3)
        right.set_ylim(min(aucs) - pad, max(aucs) + pad)
        right.set_xlabel("staleness bound (batches in flight)")
        right.set_ylabel("held-out AUC")
        right.grid(alpha=0.3)
    else:
        right.text(0.5, 0.5, "no sweep (run with --sweep)", ha="center", va="center")
        right.set_xticks([])
        right.set_yticks([])
    right.set_title("persia: AUC vs staleness")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
