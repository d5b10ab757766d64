"""Logging, with PERSIA's entry points (``get_default_logger``, ``get_logger``).

persia logs through the ``"persia"`` logger hierarchy. The first call of :func:`get_default_logger`
or :func:`get_logger` gives the ``"persia"`` logger one stream handler with a one-line format::

    2024-01-01 12:00:00,000 WARNING  [config.py:42] persia.embedding.config: ...

Calling either function again never adds a second handler. Records still propagate to the root
logger, so ``logging.basicConfig`` or pytest's ``caplog`` see them too.

:func:`warn_once` logs a warning once per ``(logger, key)`` for the life of the process: used for
"accepted but has no effect" messages, which would otherwise repeat every batch or every load.
"""

from __future__ import annotations

import logging
import threading

__all__ = [
    "COLOR_FORMATTER",
    "DEFAULT_LOGGER_NAME",
    "FILE_LOG_FORMAT",
    "FORMATTER",
    "LOG_COLOR",
    "LOG_FORMAT",
    "STREAM_LOG_FORMAT",
    "levelFilter",
    "get_default_logger",
    "get_logger",
    "set_logger",
    "setLogger",
    "warn_once",
    "reset_warn_once",
]

#: Name of the logger persia itself logs to (PERSIA used "log"; its children are persia's modules).
DEFAULT_LOGGER_NAME = "persia"
#: One line per record: time, level, source position, logger name, message.
LOG_FORMAT = "%(asctime)s %(levelname)-8s [%(filename)s:%(lineno)d] %(name)s: %(message)s"

#: PERSIA's names of its two formats; persia writes one format to streams and files alike
#: (PERSIA's stream format was coloured by ``colorlog``, which persia does not depend on).
STREAM_LOG_FORMAT = LOG_FORMAT
FILE_LOG_FORMAT = LOG_FORMAT
#: PERSIA's colour of each level name (kept for scripts that read it; persia does not colour).
LOG_COLOR = {
    "DEBUG": "cyan",
    "INFO": "green",
    "WARNING": "yellow",
    "ERROR": "red",
    "CRITICAL": "red,bg_white",
}

_FORMATTER = logging.Formatter(LOG_FORMAT)
#: PERSIA's formatter names: both are the one plain formatter of :data:`LOG_FORMAT`.
FORMATTER = _FORMATTER
COLOR_FORMATTER = _FORMATTER
_HANDLER_MARK = "_persia_handler_kind"
_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()
_default_logger: logging.Logger | None = None


class _LevelAbove(logging.Filter):
    """Keeps records whose level is strictly above ``level`` (PERSIA's error-redirect filter)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > self.level


#: PERSIA's name of the filter that keeps records strictly above a level.
levelFilter = _LevelAbove


def _add_handler_once(logger: logging.Logger, kind: str, **kw) -> None:
    """Adds a handler of ``kind`` to ``logger`` unless one we added is already there."""
    if any(getattr(h, _HANDLER_MARK, None) == kind for h in logger.handlers):
        return
    handler: logging.Handler
    if kind == "stream":
        handler = logging.StreamHandler()
    else:
        handler = logging.FileHandler(kw.pop("filename"), mode="a")
        if "above" in kw:
            handler.addFilter(_LevelAbove(kw.pop("above")))
    handler.setFormatter(_FORMATTER)
    setattr(handler, _HANDLER_MARK, kind)
    logger.addHandler(handler)


def set_logger(
    name: str,
    log_level: int = logging.INFO,
    log_filename: str = "train.log",
    enable_file_logger: bool = False,
    err_redirect_filepath: str = "error.log",
    enable_err_redirect: bool = False,
    err_redirect_level: int = logging.INFO,
) -> logging.Logger:
    """Configures the logger ``name``: a stream handler, optionally a file and an error file.

    PERSIA's ``setLogger`` arguments. Handlers are added at most once each, so calling this twice
    does not duplicate output.

    Args:
        name: logger name.
        log_level: level of the logger.
        log_filename: file of the file handler (with ``enable_file_logger``).
        enable_file_logger: also write every record to ``log_filename``.
        err_redirect_filepath: file that receives records above ``err_redirect_level``.
        enable_err_redirect: enable that error file.
        err_redirect_level: records strictly above this level go to the error file.

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    with _lock:
        _add_handler_once(logger, "stream")
        if enable_file_logger:
            _add_handler_once(logger, "file", filename=log_filename)
        if enable_err_redirect:
            _add_handler_once(
                logger, "error-file", filename=err_redirect_filepath, above=err_redirect_level
            )
    logger.setLevel(log_level)
    return logger


#: PERSIA's spelling of :func:`set_logger`.
setLogger = set_logger


def get_default_logger(name: str | None = None, **kwargs) -> logging.Logger:
    """The process-wide default logger, configured on the first call (PERSIA's semantics).

    Args:
        name: name of the default logger, used on the first call only; default ``"persia"``.
        **kwargs: :func:`set_logger` arguments (``log_level``, ``enable_file_logger``, ...),
            used on the first call only.

    Returns:
        The default logger; the same object on every call.
    """
    global _default_logger
    with _lock:
        existing = _default_logger
    if existing is not None:
        return existing
    logger = set_logger(name or DEFAULT_LOGGER_NAME, **kwargs)
    with _lock:
        if _default_logger is None:
            _default_logger = logger
        return _default_logger


def get_logger(name: str, log_level: int | None = None) -> logging.Logger:
    """The logger ``name`` (``logging.getLogger``), as PERSIA's ``get_logger``.

    Loggers under ``"persia"`` (``"persia.embedding.config"``, ...) get their output through the ``"persia"``
    logger, which is configured (one stream handler, INFO) the first time.

    Args:
        name: logger name.
        log_level: if given, set on the returned logger.

    Returns:
        The logger.
    """
    if name == DEFAULT_LOGGER_NAME or name.startswith(DEFAULT_LOGGER_NAME + "."):
        root = logging.getLogger(DEFAULT_LOGGER_NAME)
        with _lock:
            _add_handler_once(root, "stream")
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    logger = logging.getLogger(name)
    if log_level is not None:
        logger.setLevel(log_level)
    return logger


def warn_once(logger: logging.Logger, key: str, message: str) -> bool:
    """Logs ``message`` as a warning the first time ``(logger, key)`` is seen in this process.

    Args:
        logger: where to log.
        key: identity of the warning (e.g. the config field path).
        message: the text.

    Returns:
        True if the warning was logged now, False if it had been logged before.
    """
    ident = (logger.name, key)
    with _lock:
        if ident in _warned:
            return False
        _warned.add(ident)
    logger.warning(message, stacklevel=2)
    return True


def reset_warn_once() -> None:
    """Forgets which one-time warnings were logged (for tests and long-lived notebooks)."""
    with _lock:
        _warned.clear()
