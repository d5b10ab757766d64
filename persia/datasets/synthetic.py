"""A seeded synthetic click stream with a planted teacher, shaped like real recommender data.

Every sample has ``num_dense`` dense features (standard normal) and one ID per slot (or up to
``ids_per_sample`` for multi-hot slots: one bound for every slot, or one per slot). IDs follow a Zipf-like law per slot (hot heads, long
tails): a rank r in ``[0, cardinality)`` is drawn with probability about proportional to
``(r + 1) ** -zipf_exponent``, then mapped to a scattered uint64 ID by :func:`persia.hashing.hash_ints`
salted with the slot index.

Labels come from a planted teacher: ``logit = bias + dense @ w + sum over IDs of effect(slot,
rank)``, where each ID's effect is a deterministic hash of (seed, slot, rank) scaled by
``id_effect_scale`` (no table is stored, so cardinalities of millions cost nothing), and
``label ~ Bernoulli(sigmoid(logit))``. The teacher's own AUC (:meth:`SyntheticStream.teacher_auc`)
is the ceiling a model can reach.

Batches are a pure function of (seed, batch index): any process can regenerate any batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from persia.data import IterableDataset
from persia.embedding.data import IDTypeFeature, Label, NonIDTypeFeature, PersiaBatch
from persia.errors import ConfigError
from persia.hashing import hash_ints

__all__ = ["SyntheticStream", "SyntheticBatch", "CRITEO_CARDINALITIES"]

#: Criteo Kaggle's per-slot cardinalities (26 slots, 33.8M IDs in all).
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

_U53 = float(2**53)


@dataclass
class SyntheticBatch:
    """One generated batch, columnar.

    Attributes:
        dense: f32[B, num_dense].
        values: per slot, u64 IDs of all samples concatenated.
        lengths: per slot, i64[B] IDs per sample.
        ranks: per slot, the popularity rank of each ID (0 = hottest).
        labels: f32[B, 1] in {0, 1}.
        logits: f64[B], the teacher's logit (for the ceiling AUC).
    """

    dense: np.ndarray
    values: list[np.ndarray]
    lengths: list[np.ndarray]
    ranks: list[np.ndarray]
    labels: np.ndarray
    logits: np.ndarray

    def to_persia_batch(self, slot_names: Sequence[str], requires_grad: bool = True) -> PersiaBatch:
        """The batch as a :class:`PersiaBatch` (columnar ID features)."""
        return PersiaBatch(
            [
                IDTypeFeature.from_columnar(name, v, n)
                for name, v, n in zip(slot_names, self.values, self.lengths, strict=True)
            ],
            non_id_type_features=[NonIDTypeFeature(self.dense)],
            labels=[Label(self.labels)],
            requires_grad=requires_grad,
        )


class SyntheticStream:
    """Generates batches of the planted-teacher stream.

    Args:
        cardinalities: distinct IDs per slot.
        num_dense: dense features per sample.
        zipf_exponent: skew of the ID law (> 0; about 1.05-1.2 is realistic).
        ids_per_sample: IDs per sample per slot; above 1, each sample gets a uniform 1..that many.
            An int applies to every slot; a sequence (one int per slot) makes some slots
            multi-hot and leaves others one-hot (a slot at 1 draws nothing for its lengths, so
            ``[k] * num_slots`` gives exactly the batches of ``k``).
        id_effect_scale: standard deviation of one ID's effect on the logit.
        dense_effect_scale: standard deviation of each dense weight.
        bias: the teacher's intercept (sets the positive rate; the default -2.2 gives about 25%
            with the other defaults and Criteo's cardinalities, Criteo's own click rate).
        seed: the stream's seed.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int = 13,
        zipf_exponent: float = 1.1,
        ids_per_sample: int | Sequence[int] = 1,
        id_effect_scale: float = 0.5,
        dense_effect_scale: float = 0.3,
        bias: float = -2.2,
        seed: int = 0,
    ) -> None:
        problems = []
        if not cardinalities or any(
            isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 1
            for c in cardinalities
        ):
            problems.append(f"cardinalities must be ints >= 1, got {list(cardinalities)!r}")
        if not (isinstance(num_dense, int) and num_dense >= 0):
            problems.append(f"num_dense must be an int >= 0, got {num_dense!r}")
        if not zipf_exponent > 0:
            problems.append(f"zipf_exponent must be > 0, got {zipf_exponent!r}")
        per_slot = _per_slot_ids(ids_per_sample, len(cardinalities) if cardinalities else 0)
        if isinstance(per_slot, str):
            problems.append(per_slot)
        for name, value in (
            ("id_effect_scale", id_effect_scale),
            ("dense_effect_scale", dense_effect_scale),
        ):
            if not (np.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if not np.isfinite(bias):
            problems.append(f"bias must be finite, got {bias!r}")
        if problems:
            raise ConfigError(problems)
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.num_dense = num_dense
        self.zipf_exponent = float(zipf_exponent)
        self.ids_per_sample = ids_per_sample
        #: the IDs-per-sample bound of each slot
        self.slot_ids_per_sample: tuple[int, ...] = per_slot  # type: ignore[assignment]
        self.id_effect_scale = float(id_effect_scale)
        self.bias = float(bias)
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 2**31])
        self.dense_weights = rng.normal(0.0, dense_effect_scale, num_dense)

    @property
    def num_slots(self) -> int:
        return len(self.cardinalities)

    def slot_names(self, prefix: str = "slot_") -> list[str]:
        return [f"{prefix}{i}" for i in range(self.num_slots)]

    def _ranks(self, rng: np.random.Generator, n: int, card: int) -> np.ndarray:
        """Zipf-like ranks in [0, card): inverse CDF of a continuous power law on [1, card + 1)."""
        u = rng.random(n)
        s = self.zipf_exponent
        top = float(card) + 1.0
        if abs(s - 1.0) < 1e-9:
            x = np.exp(u * np.log(top))
        else:
            a = 1.0 - s
            x = (1.0 + u * (top**a - 1.0)) ** (1.0 / a)
        return np.minimum(x.astype(np.int64) - 1, card - 1)

    def effects(self, slot: int, ranks: np.ndarray) -> np.ndarray:
        """The planted effect of each ID (given by its rank) of ``slot`` on the logit."""
        h = hash_ints(ranks, salt=(self.seed * 1_000_003 + slot + 1) % 2**64)
        u1 = ((h >> np.uint64(11)).astype(np.float64) + 0.5) / _U53
        # Standard normal by Box-Muller from two uniforms: the hash and a hash of the hash.
        h2 = hash_ints(h, salt=0x9E3779B97F4A7C15)
        u2 = ((h2 >> np.uint64(11)).astype(np.float64) + 0.5) / _U53
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return self.id_effect_scale * z

    def batch(self, index: int, batch_size: int) -> SyntheticBatch:
        """Batch ``index`` (a pure function of the seed and the index)."""
        rng = np.random.default_rng([self.seed, int(index)])
        dense = rng.standard_normal((batch_size, self.num_dense)).astype(np.float32)
        logits = self.bias + dense.astype(np.float64) @ self.dense_weights
        values, lengths, ranks_all = [], [], []
        for slot, card in enumerate(self.cardinalities):
            most = self.slot_ids_per_sample[slot]
            if most == 1:
                n = np.ones(batch_size, dtype=np.int64)
            else:
                n = rng.integers(1, most + 1, batch_size).astype(np.int64)
            total = int(n.sum())
            ranks = self._ranks(rng, total, card)
            eff = self.effects(slot, ranks)
            if most == 1:
                logits += eff
            else:
                sample = np.repeat(np.arange(batch_size), n)
                logits += np.bincount(sample, weights=eff, minlength=batch_size) / np.sqrt(n)
            values.append(hash_ints(ranks, salt=slot + 1))
            lengths.append(n)
            ranks_all.append(ranks)
        p = 1.0 / (1.0 + np.exp(-logits))
        labels = (rng.random(batch_size) < p).astype(np.float32)[:, None]
        return SyntheticBatch(dense, values, lengths, ranks_all, labels, logits)

    def batches(self, start: int, count: int, batch_size: int) -> Iterator[SyntheticBatch]:
        """Batches ``start .. start + count - 1``."""
        for i in range(start, start + count):
            yield self.batch(i, batch_size)

    def dataset(
        self,
        slot_names: Sequence[str],
        start: int,
        count: int,
        batch_size: int,
        requires_grad: bool = True,
    ) -> IterableDataset:
        """Batches ``start .. start + count - 1`` as :class:`PersiaBatch` es, in a
        :class:`persia.data.IterableDataset` for :class:`persia.data.DataLoader`
        (``requires_grad=False`` for evaluation)."""
        return _StreamDataset(self, list(slot_names), start, count, batch_size, requires_grad)

    def teacher_auc(self, start: int, count: int, batch_size: int) -> float:
        """AUC of the teacher's own logits on those batches: the ceiling."""
        from persia.metrics import roc_auc

        ys, ps = [], []
        for b in self.batches(start, count, batch_size):
            ys.append(b.labels[:, 0])
            ps.append(b.logits)
        return roc_auc(np.concatenate(ys), np.concatenate(ps))


def _per_slot_ids(ids_per_sample: int | Sequence[int], num_slots: int) -> tuple[int, ...] | str:
    """The per-slot bounds of ``ids_per_sample``, or the problem with it."""

    def ok(k: object) -> bool:
        return isinstance(k, int | np.integer) and not isinstance(k, bool) and bool(k >= 1)

    if isinstance(ids_per_sample, int | np.integer) and not isinstance(ids_per_sample, bool):
        if not ok(ids_per_sample):
            return f"ids_per_sample must be an int >= 1, got {ids_per_sample!r}"
        return (int(ids_per_sample),) * num_slots
    if isinstance(ids_per_sample, str) or not isinstance(ids_per_sample, Sequence):
        return f"ids_per_sample must be an int >= 1 or one per slot, got {ids_per_sample!r}"
    bounds = list(ids_per_sample)
    if len(bounds) != num_slots or not all(ok(k) for k in bounds):
        return f"ids_per_sample must hold one int >= 1 per slot ({num_slots} slots), got {bounds!r}"
    return tuple(int(k) for k in bounds)


class _StreamDataset(IterableDataset):
    """:meth:`SyntheticStream.dataset`: a range of the stream's batches as PersiaBatches."""

    def __init__(
        self,
        stream: SyntheticStream,
        slot_names: list[str],
        start: int,
        count: int,
        batch_size: int,
        requires_grad: bool,
    ) -> None:
        super().__init__()
        self.stream, self.slot_names = stream, slot_names
        self.start, self.count, self.batch_size = start, count, batch_size
        self.requires_grad = requires_grad

    def __iter__(self) -> Iterator[PersiaBatch]:
        for b in self.stream.batches(self.start, self.count, self.batch_size):
            yield b.to_persia_batch(self.slot_names, requires_grad=self.requires_grad)
