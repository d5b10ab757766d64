"""The PersiaError family: every error persia raises at its API boundary.

Where PERSIA raised a built-in exception type for the same user error, persia's error is an
instance of it too (:class:`BatchError` is a ``RuntimeError``).

Errors carry enough context to act on (the field, the expected and the received value) and
survive pickling, so they cross process boundaries (the Ray backend) intact.
"""

from __future__ import annotations

__all__ = [
    "PersiaError",
    "ConfigError",
    "BatchError",
    "StoreError",
    "CheckpointError",
    "BackendError",
]


class PersiaError(Exception):
    """Base class of every error persia raises on bad input or a failed role."""

    def __reduce__(self):  # keep subclasses with extra attributes picklable
        return (self.__class__, self.args)


class ConfigError(PersiaError):
    """A configuration (YAML or Python) is invalid. Lists every problem at once.

    Attributes:
        problems: one human-readable line per problem.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"invalid configuration{where}: {len(self.problems)} problems:\n{lines}"
        super().__init__(msg)

    def __reduce__(self):
        return (self.__class__, (self.problems, self.source))


class BatchError(PersiaError, RuntimeError):
    """A batch (IDs, dense features, labels) is malformed.

    Also a ``RuntimeError``, as PERSIA's batch checks raised (its tests expect ``RuntimeError``
    for a training batch without labels), so ``except RuntimeError`` in a PERSIA script still
    catches it.
    """


class StoreError(PersiaError):
    """A parameter-server (store) operation got bad input; the store stays usable."""


class CheckpointError(PersiaError):
    """A checkpoint is missing, truncated, tampered with or does not match the job."""


class BackendError(PersiaError):
    """A role of the cluster backend failed or could not be reached.

    Attributes:
        role: e.g. "parameter-server", "embedding-worker", "nn-worker".
        rank: which replica of that role.
    """

    def __init__(self, message: str, role: str | None = None, rank: int | None = None) -> None:
        self.role = role
        self.rank = rank
        who = "" if role is None else f"{role}: " if rank is None else f"{role}[{rank}]: "
        super().__init__(who + message)
        self.message = message

    def __reduce__(self):
        return (self.__class__, (self.message, self.role, self.rank))
