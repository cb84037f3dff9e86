"""Evaluation: routers trained and replayed against single models, random and the oracle; cost
frontiers, shift, sweeps and plots (the metrics themselves: :mod:`router_ml.metrics`)."""
