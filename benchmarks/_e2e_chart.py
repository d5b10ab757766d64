"""A dependency-free PNG chart of bench_e2e.py's results (no matplotlib: zlib and a 3x5 font).

Left: samples/s per contender (horizontal bars, value at the end). Right: persia's held-out AUC
against the staleness bound (1, 2, 4, 8, 16) when the sweep ran.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# 3x5 glyphs, rows top to bottom, "1" = ink.
_FONT = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111",
    "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111",
    "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111",
    "1": "010110010010111", "2": "110001010100111", "3": "110001010001110",
    "4": "101101111001001", "5": "111100110001110", "6": "011100111101111",
    "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    "-": "000000111000000", ".": "000000000000010", "@": "010101111100011",
    "/": "001001010100100", " ": "000000000000000", "=": "000111000111000",
}  # fmt: skip

_COLORS = {
    "persia": (31, 119, 180),
    "torch": (214, 39, 40),
    "torchrec": (255, 127, 14),
    "dense": (127, 127, 127),
}


class Canvas:
    """An RGB image with rectangles, lines and 3x5 text."""

    def __init__(self, width: int, height: int) -> None:
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        h, w, _ = self.px.shape
        self.px[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = color

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for t in range(n + 1):
            x = round(x0 + (x1 - x0) * t / n)
            y = round(y0 + (y1 - y0) * t / n)
            self.rect(x - 1, y - 1, x + 1, y + 1, color)

    def text(self, x: int, y: int, s: str, scale: int = 2, color=(0, 0, 0)) -> int:
        """Writes ``s`` (upper-cased) at (x, y); returns the x after it."""
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    r, c = divmod(i, 3)
                    self.rect(
                        x + c * scale,
                        y + r * scale,
                        x + (c + 1) * scale,
                        y + (r + 1) * scale,
                        color,
                    )
            x += 4 * scale
        return x

    def png(self) -> bytes:
        h, w, _ = self.px.shape
        raw = b"".join(b"\x00" + self.px[y].tobytes() for y in range(h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _color(name: str) -> tuple[int, int, int]:
    for key in ("torchrec", "torch", "persia", "dense"):
        if name.startswith(key):
            return _COLORS[key]
    return (0, 0, 0)


def write_chart(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Writes the two-panel PNG for ``results`` (label -> result line)."""
    bars = [(k, v["samples_per_s"]) for k, v in results.items() if "staleness-" not in k]
    sweep = sorted(
        (int(v["staleness"]), float(v["auc"]))
        for k, v in results.items()
        if k.startswith("persia-staleness-") or k in ("persia-sync", "persia-hybrid")
    )
    row, left, bar_w = 26, 230, 330
    height = max(80 + row * len(bars), 360)
    c = Canvas(left + bar_w + 120 + 420, height)
    c.text(10, 10, "SAMPLES/S PER CONTENDER (K = 1000)", scale=2)
    top = max((v for _, v in bars), default=1.0)
    for i, (name, value) in enumerate(bars):
        y = 50 + i * row
        c.text(10, y + 4, name, scale=2)
        c.rect(left, y, left + int(bar_w * value / top), y + row - 8, _color(name))
        c.text(left + int(bar_w * value / top) + 6, y + 4, f"{value / 1000:.1f}K", scale=2)
    # Right panel: AUC vs staleness.
    x0, y0, pw, ph = left + bar_w + 150, 60, 360, 240
    c.text(x0 - 20, 10, "PERSIA AUC VS STALENESS", scale=2)
    c.rect(x0, y0 + ph, x0 + pw, y0 + ph + 2, (0, 0, 0))
    c.rect(x0, y0, x0 + 2, y0 + ph, (0, 0, 0))
    if sweep:
        aucs = [a for _, a in sweep]
        lo, hi = min(aucs) - 0.002, max(aucs) + 0.002
        ks = [1, 2, 4, 8, 16]
        pts = []
        for k, a in sweep:
            pos = ks.index(k) if k in ks else len(ks) - 1
            x = x0 + 20 + pos * (pw - 40) // (len(ks) - 1)
            y = y0 + ph - int((a - lo) / (hi - lo) * ph)
            pts.append((x, y))
            c.rect(x - 4, y - 4, x + 4, y + 4, _COLORS["persia"])
            c.text(x - 20, y - 18, f"{a:.4f}", scale=2)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
            c.line(xa, ya, xb, yb, _COLORS["persia"])
        for pos, k in enumerate(ks):
            c.text(x0 + 20 + pos * (pw - 40) // (len(ks) - 1) - 4, y0 + ph + 10, str(k))
        c.text(x0 + pw // 2 - 40, y0 + ph + 34, "STALENESS")
        c.text(x0 - 70, y0 - 2, f"{hi:.3f}")
        c.text(x0 - 70, y0 + ph - 10, f"{lo:.3f}")
    else:
        c.text(x0 + 20, y0 + ph // 2, "NO SWEEP (RUN WITH --SWEEP)")
    Path(path).write_bytes(c.png())
