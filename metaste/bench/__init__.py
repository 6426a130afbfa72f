"""Data, models, methods and the ``metaste compare`` command shared by examples and benchmarks.

Importing the package registers every compared method (:mod:`.methods`)."""

from . import methods  # noqa: F401  (registers the methods in the registry)
