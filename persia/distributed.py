"""PERSIA's ``persia.distributed``: the options of synchronous dense training across NN workers.

``TrainCtx(..., distributed_option=DDPOption(...))`` takes one; the default is
:func:`get_default_distributed_option`. The implementation is
:mod:`persia.runtime.distributed`. Bagua is not available in persia:
``BaguaDistributedOption(...)`` raises :class:`BaguaNotAvailableError` (an ``ImportError``).
"""

from persia.runtime.distributed import (
    DEFAULT_MASTER_PORT,
    BaguaDistributedOption,
    BaguaNotAvailableError,
    DDPOption,
    DistributedBaseOption,
    get_default_distributed_option,
)

__all__ = [
    "BaguaDistributedOption",
    "BaguaNotAvailableError",
    "DDPOption",
    "DEFAULT_MASTER_PORT",
    "DistributedBaseOption",
    "get_default_distributed_option",
]
