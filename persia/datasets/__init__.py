"""Data sets persia generates for examples, tests and benchmarks."""

from persia.datasets.synthetic import CRITEO_CARDINALITIES, SyntheticStream

__all__ = ["SyntheticStream", "CRITEO_CARDINALITIES"]
