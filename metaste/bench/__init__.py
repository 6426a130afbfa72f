"""Data, models, methods and the ``metaste compare`` command shared by examples and benchmarks."""
