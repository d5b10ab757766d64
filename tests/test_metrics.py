import itertools

import numpy as np
import pytest

from persia.errors import PersiaError
from persia.metrics import log_loss, roc_auc


def naive_auc(y, p):
    pos = [s for s, t in zip(p, y, strict=True) if t == 1]
    neg = [s for s, t in zip(p, y, strict=True) if t == 0]
    total = 0.0
    for a, b in itertools.product(pos, neg):
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    p = np.round(rng.random(200), 1)  # many ties
    assert roc_auc(y, p) == pytest.approx(naive_auc(y, p), abs=1e-12)


def test_auc_extremes():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5


def test_log_loss_value():
    assert log_loss([1, 0], [0.8, 0.2]) == pytest.approx(-np.log(0.8))


@pytest.mark.parametrize(
    "y,p,msg",
    [
        ([1, 1], [0.1, 0.2], "both classes"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1], "same length"),
    ],
)
def test_bad_input(y, p, msg):
    with pytest.raises(PersiaError, match=msg):
        roc_auc(y, p)
