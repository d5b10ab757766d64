"""Old import path of PERSIA's YAML loaders, kept for scripts: the loaders live in
:mod:`persia.embedding.config`."""

from persia.embedding.config import *  # noqa: F403
from persia.embedding.config import __all__  # noqa: F401
