"""How many threads torch computes the dense step with on a CPU NN worker, chosen by measurement.

On a small machine the embedding path (the DataLoader's lookup thread, the store's kernels and
the gradient applier) shares the cores with torch's own OpenMP threads. When the dense step is
cheap, the embedding path sets the pace, and torch's threads spinning on every core slow it
down: one core fewer for torch makes the whole job faster. When the dense step dominates, every
core for torch is faster. Which case a job is in depends on its model, its batch and its
machine, so :class:`ThreadTuner` measures it during the first steps of training:

1. after ``skip`` steps of warm-up it times ``observe`` steps with torch's ``n`` threads;
2. then ``block`` steps with ``n - 1`` (the first step of a block pays for the switch and is not
   counted). When their median is ``abort`` slower than the observed steps' (a job paced by its
   dense step: the DLRM case), ``n`` is kept at once;
3. otherwise blocks of ``n`` and ``n - 1`` alternate until each count has ``rounds`` blocks, and
   ``n - 1`` is kept when its median step was at least ``margin`` faster.

Steps are timed from the end of one ``backward`` to the end of the next, so the wait for the
next batch counts (the NN worker's own busy time does not tell: when torch's threads and the
embedding path's compete for the cores, the dense step itself gets slower, not the wait).

The tuner only calls its ``set_threads`` function; :class:`persia.ctx.TrainCtx` passes
``torch.set_num_threads`` and restores the original count when the context exits.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from persia.errors import PersiaError

#: the values of ``TrainCtx(nn_threads=...)`` / ``PERSIA_NN_THREADS`` other than an int
AUTO = "auto"
KEEP = "keep"


def parse_nn_threads(value: object, source: str = "nn_threads") -> str | int:
    """``"auto"``, ``"keep"`` or an int >= 1 (also as a string: the environment's form).

    Raises:
        PersiaError: anything else, naming ``source``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, KEEP):
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise PersiaError(f'{source} must be "auto", "keep" or an int >= 1, got {value!r}')


class ThreadTuner:
    """Chooses between ``threads`` and ``threads - 1`` torch threads by the steps' wall time
    (see the module's docstring). Feed it :meth:`step` once per training step; it is done
    (``decided`` is the count kept) after at most ``skip + observe + 2 * rounds * block`` steps.
    """

    def __init__(
        self,
        threads: int,
        set_threads: Callable[[int], None],
        *,
        skip: int = 8,
        observe: int = 8,
        block: int = 4,
        rounds: int = 3,
        margin: float = 0.03,
        abort: float = 0.15,
    ) -> None:
        if threads < 2:
            raise PersiaError(f"ThreadTuner needs at least 2 threads to choose from, got {threads}")
        self.threads = threads
        self._set = set_threads
        self.skip, self.observe, self.block = skip, observe, block
        self.rounds, self.margin, self.abort = rounds, margin, abort
        self.steps = 0
        #: the thread count kept, once chosen (None while measuring)
        self.decided: int | None = None
        #: why: a sentence for the log
        self.reason = ""
        self._observed: list[float] = []
        self._times: dict[int, list[float]] = {threads: [], threads - 1: []}
        self._current = threads

    def _trial_threads(self, k: int) -> int:
        """Thread count of trial step ``k`` (0-based): blocks alternate, fewer threads first."""
        return self.threads - 1 if (k // self.block) % 2 == 0 else self.threads

    def step(self, interval_s: float) -> None:
        """One training step, ``interval_s`` from the end of the previous step's backward to
        the end of this one's."""
        if self.decided is not None:
            return
        k = self.steps
        self.steps += 1
        if k < self.skip:
            return
        k -= self.skip
        if k < self.observe:
            self._observed.append(interval_s)
            if k == self.observe - 1:
                self._switch(self._trial_threads(0))
            return
        k -= self.observe
        threads = self._trial_threads(k)
        if k % self.block:  # a block's first step pays for the switch: not counted
            self._times[threads].append(interval_s)
        k += 1
        fewer_ms = 1000 * statistics.median(self._times[self.threads - 1] or [0.0])
        if k == self.block:  # the first block of fewer threads: clearly slower ends the trial
            seen_ms = 1000 * statistics.median(self._observed)
            if fewer_ms > seen_ms * (1.0 + self.abort):
                self._decide(
                    self.threads,
                    f"{self.threads - 1} thread(s) slower than {self.threads}: "
                    f"{fewer_ms:.2f} vs {seen_ms:.2f} ms per step",
                )
                return
        if k == 2 * self.rounds * self.block:
            more_ms = 1000 * statistics.median(self._times[self.threads])
            if fewer_ms <= more_ms * (1.0 - self.margin):
                keep, word = self.threads - 1, "faster"
            else:
                keep, word = self.threads, "not faster"
            self._decide(
                keep,
                f"{self.threads - 1} thread(s) {word} than {self.threads}: "
                f"{fewer_ms:.2f} vs {more_ms:.2f} ms per step",
            )
        else:
            self._switch(self._trial_threads(k))

    def _switch(self, threads: int) -> None:
        if threads != self._current:
            self._set(threads)
            self._current = threads

    def _decide(self, threads: int, reason: str) -> None:
        self._switch(threads)
        self.decided = threads
        self.reason = reason
