"""Command-line entry points: `python -m train` (fit + export), `python -m train.evaluate`,
`python -m train.stats`, `python -m train.model_table`."""
