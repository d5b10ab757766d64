"""Evaluation metrics on plain arrays: ROC AUC (ties averaged) and log loss."""

from __future__ import annotations

import numpy as np

from persia.errors import PersiaError

__all__ = ["roc_auc", "log_loss"]


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise PersiaError(f"labels and scores must have the same length, got {y.size} and {p.size}")
    if y.size == 0:
        raise PersiaError("labels and scores must not be empty")
    if not np.isin(y, (0.0, 1.0)).all():
        raise PersiaError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise PersiaError("scores must be finite")
    return y, p


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counted as one half (the Mann-Whitney statistic).

    Raises:
        PersiaError: lengths differ, labels not 0/1, or only one class present.
    """
    y, p = _check(labels, scores)
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        raise PersiaError(f"AUC needs both classes, got {pos} positives and {neg} negatives")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    ends = np.r_[starts[1:], sp.size]
    avg = (starts + ends + 1) / 2.0  # 1-based mean rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y, p = _check(labels, probs)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
