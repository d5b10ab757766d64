"""PERSIA's ``estimated_distinct_id``: distinct IDs seen per feature, estimated with HyperLogLog.

Cost is kept off the per-ID path: the embedding worker hands each batch's *unique* keys (it
de-duplicates them anyway), and only the keys whose multiplicative hash falls in 1/16 of the
hash space are inserted (a hash sample: an ID is either always or never sampled, so the distinct
count of the sample times 16 estimates the distinct count of all). Each feature keeps 2**12
registers; the estimate uses the small-range (linear counting) correction. Expect about 2%
error from the registers plus the sampling error, which matters only below a few thousand IDs.
"""

from __future__ import annotations

import numpy as np

_P = 12  # registers per feature: 2**_P
_M = 1 << _P
_SAMPLE_SHIFT = 60  # keep keys whose hash has its top 4 bits zero: 1/16
SAMPLE_FACTOR = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ALPHA = 0.7213 / (1 + 1.079 / _M)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class DistinctEstimator:
    """HyperLogLog registers per feature over a 1/16 hash sample of the keys.

    Args:
        prefix_bits: the top bits of a key that hold its feature's prefix.
        features: prefix -> feature name.
    """

    def __init__(self, prefix_bits: int, features: dict[int, str]) -> None:
        self.shift = np.uint64(64 - prefix_bits)
        self.features = dict(features)
        self.registers: dict[str, np.ndarray] = {
            name: np.zeros(_M, dtype=np.uint8) for name in set(features.values())
        }

    def add(self, uniques: np.ndarray) -> None:
        """Inserts one batch's unique keys (``u64[u]``)."""
        if uniques.size == 0:
            return
        with np.errstate(over="ignore"):
            sampled = uniques[(uniques * _GOLDEN) >> np.uint64(_SAMPLE_SHIFT) == 0]
            if sampled.size == 0:
                return
            h = _splitmix(sampled)
        index = (h >> np.uint64(64 - _P)).astype(np.intp)
        # rank = leading zeros of the remaining bits + 1; a guard bit bounds it at 64 - _P + 1
        rest = (h << np.uint64(_P)) | np.uint64(1 << (_P - 1))
        rank = (64 - np.floor(np.log2(rest.astype(np.float64)))).astype(np.uint8)
        prefixes = sampled >> self.shift
        for prefix in np.unique(prefixes):
            name = self.features.get(int(prefix))
            if name is None:
                continue
            sel = prefixes == prefix
            np.maximum.at(self.registers[name], index[sel], rank[sel])

    def estimates(self) -> dict[str, float]:
        """Feature name -> estimated distinct IDs seen."""
        out = {}
        for name, reg in self.registers.items():
            zeros = int(np.count_nonzero(reg == 0))
            if zeros == _M:
                out[name] = 0.0
                continue
            raw = _ALPHA * _M * _M / float(np.sum(np.exp2(-reg.astype(np.float64))))
            if raw <= 2.5 * _M and zeros > 0:
                raw = _M * float(np.log(_M / zeros))
            out[name] = raw * SAMPLE_FACTOR
        return out
