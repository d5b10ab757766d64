"""The problem collector behind both configuration front ends (private).

PERSIA's YAML files (:mod:`persia.embedding.config`) and the job file (:mod:`persia.job.config`)
are read by one :class:`Problems`: it takes typed values out of nested dicts, and instead of
raising at the first bad value it collects one line per problem (``path: expected ..., got ...``),
so that one :class:`~persia.errors.ConfigError` lists every problem of a file at once.

The two front ends word two things differently, and their messages are kept as they are:

* ``positive_int``: how an int that must be ``>= 1`` is described (PERSIA's files:
  ``"an int > 0"``; the job file: ``"an int >= 1"``);
* ``null_is_absent``: whether ``key: null`` counts as absent when the key's default is ``None``
  (the job file: yes; PERSIA's files: no, ``null`` is a wrong type there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from persia.errors import ConfigError
from persia.logger import warn_once

__all__ = ["MISSING", "Problems", "join", "show"]

#: Marks a value that is not there at all (as opposed to ``None``).
MISSING: Any = object()


def join(path: str, key: object) -> str:
    """``path.key`` (``key`` alone at the top level)."""
    return f"{path}.{key}" if path else str(key)


def show(value: object) -> str:
    """How a received value appears in a message (``nothing`` when it is missing)."""
    return "nothing" if value is MISSING else repr(value)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class Problems:
    """Reads typed values out of nested dicts, collecting problems and warnings.

    Args:
        positive_int: the words for "an int >= 1" (see the module doc).
        null_is_absent: whether ``None`` counts as absent when the default is ``None``.

    Attributes:
        problems: one line per problem, in the order found.
        warnings: ``(key, message)`` pairs; ``key`` identifies the warning for ``warn_once``.
    """

    def __init__(self, positive_int: str = "an int > 0", null_is_absent: bool = False) -> None:
        self.positive_int = positive_int
        self.null_is_absent = null_is_absent
        self.problems: list[str] = []
        self.warnings: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ reporting
    def add(self, message: str) -> None:
        """Records a problem worded by the caller."""
        self.problems.append(message)

    def bad(self, path: str, expected: str, got: object) -> None:
        """Records ``path: expected <expected>, got <got>``."""
        self.problems.append(f"{path or '<top level>'}: expected {expected}, got {show(got)}")

    def warn(self, path: str, message: str) -> None:
        """Records a warning ``path: message``."""
        self.warnings.append((path, f"{path}: {message}"))

    def no_effect(
        self, d: dict, key: str, path: str, value: object, default: object, why: str
    ) -> None:
        """Warns when a key of an unbuilt feature is set to something other than its default."""
        if key in d and value != default:
            self.warn(join(path, key), f"accepted, but has no effect: {why}")

    def finish(self, source: str | None, log: logging.Logger) -> tuple[str, ...]:
        """Raises the collected problems, else logs the warnings once and returns them.

        Raises:
            ConfigError: listing every problem.
        """
        if self.problems:
            raise ConfigError(self.problems, source=source)
        for key, message in self.warnings:
            warn_once(log, f"{source}:{key}", message if not source else f"{source}: {message}")
        return tuple(message for _, message in self.warnings)

    # ------------------------------------------------------------------ structure
    def _absent(self, value: object, default: object) -> bool:
        return value is MISSING or (self.null_is_absent and value is None and default is None)

    def mapping(self, value: object, path: str) -> dict | None:
        """``value`` as a dict (None or missing -> empty), or None after reporting a problem."""
        if value is None or value is MISSING:
            return {}
        if not isinstance(value, Mapping):
            self.bad(path, "a mapping", value)
            return None
        return dict(value)

    def keys(
        self,
        d: dict,
        path: str,
        known: Iterable[str],
        renamed: Mapping[str, str] | None = None,
    ) -> dict:
        """``d`` with old names mapped to the right ones; unknown keys reported."""
        known = tuple(known)
        renamed = renamed or {}
        out: dict = {}
        for key, value in d.items():
            where = join(path, key)
            if key in renamed:
                right = renamed[key]
                if right in d:
                    self.problems.append(
                        f"{where}: old name of {join(path, right)}; give only one of them"
                    )
                    continue
                self.warn(
                    where,
                    f"accepted as {join(path, right)} (PERSIA's misspelling or old name; "
                    f"the right key is {right!r})",
                )
                out[right] = value
            elif key in known:
                out[key] = value
            else:
                self.problems.append(f"{where}: unknown key; expected one of {', '.join(known)}")
        return out

    def section(self, value: object, path: str, known: tuple[str, ...]) -> dict:
        """:meth:`mapping` then :meth:`keys`: a mapping with only known keys (empty if bad)."""
        return self.keys(self.mapping(value, path) or {}, path, known)

    # ------------------------------------------------------------------ values
    def int_(
        self,
        d: dict,
        key: str,
        path: str,
        default: Any,
        minimum: int = 1,
        maximum: int | None = None,
    ) -> Any:
        """``d[key]``: an int in ``[minimum, maximum]``; ``default`` when absent or bad
        (``MISSING`` as default: required)."""
        value = d.get(key, MISSING)
        if self._absent(value, default):
            if default is MISSING:
                self.bad(join(path, key), f"an int >= {minimum} (required)", value)
            return default
        if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
            if maximum is not None:
                bound = f"an int in [{minimum}, {maximum}]"
            elif minimum == 1:
                bound = self.positive_int
            else:
                bound = f"an int >= {minimum}"
            self.bad(join(path, key), bound, value)
            return default
        return value

    def number(
        self,
        d: dict,
        key: str,
        path: str,
        default: Any,
        check: Callable[[float], bool] | None = None,
        expected: str = "a number",
    ) -> Any:
        """``d[key]`` as a finite float passing ``check``; ``default`` when absent or bad."""
        value = d.get(key, MISSING)
        if self._absent(value, default):
            return default
        if not is_number(value) or not math.isfinite(value) or (check and not check(value)):
            self.bad(join(path, key), expected, value)
            return default
        return float(value)

    def bool_(self, d: dict, key: str, path: str, default: bool) -> bool:
        """``d[key]``: true or false; ``default`` when absent or bad."""
        value = d.get(key, MISSING)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.bad(join(path, key), "true or false", value)
            return default
        return value

    def str_(self, d: dict, key: str, path: str, default: Any, choices: Iterable[str] = ()) -> Any:
        """``d[key]``: a non-empty string (lower-cased and one of ``choices`` if given);
        ``default`` when absent or bad (``MISSING`` as default: required, None when absent)."""
        value = d.get(key, MISSING)
        if self._absent(value, default):
            if default is MISSING:
                self.bad(join(path, key), "a non-empty string (required)", value)
                return None
            return default
        fallback = None if default is MISSING else default
        choices = tuple(choices)
        if not isinstance(value, str) or not value:
            self.bad(join(path, key), "a non-empty string", value)
            return fallback
        if choices and value.lower() not in choices:
            self.bad(join(path, key), f"one of {', '.join(choices)}", value)
            return fallback
        return value.lower() if choices else value

    def choice(self, d: dict, key: str, path: str, default: str, choices: tuple[str, ...]) -> str:
        """``d[key]`` lower-cased, one of ``choices``; ``default`` when absent or bad."""
        value = d.get(key, MISSING)
        if value is MISSING:
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            self.bad(join(path, key), f"one of {', '.join(choices)}", value)
            return default
        return value.lower()

    def strings(self, value: object, path: str, allow_empty_items: bool = False) -> tuple:
        """A string or a list of strings, as a tuple (empty after reporting a problem)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and (v or allow_empty_items) for v in value
        ):
            self.bad(path, "a string or a list of strings", value)
            return ()
        return tuple(value)
