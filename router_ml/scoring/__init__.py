"""Automatic scorers: turn a model's answer into a quality label, per task, cached and versioned.

One module per idea, imported from where it is defined:

- ``base``: :class:`Example` (prompt, answer, reference / tests, task), :class:`Score` (value in
  [0, 1], scorer name and version, what was extracted, error, the scorer's own cost), the
  :class:`Scorer` contract;
- ``choice`` (multiple-choice letter), ``math_answer`` (GSM8K / MATH answer equivalence),
  ``code`` (unit tests in ``sandbox``), ``qa`` (exact match, token F1), ``judge`` (LLM-as-judge:
  rubric and position-swapped pairwise), ``zeroeval`` (ZeroEval's own verdicts, for rebuilding
  ``zeroeval_math_code``);
- ``registry``: :data:`SCORERS` by name, :func:`build_scorer`, the scorer each task gets;
- ``cache``: :class:`ScoreCache` (SQLite) and :func:`score_examples`;
- ``table``: score a table of answers (``router-ml score``).

The package sits below ``data`` in the layers (the ``zeroeval`` rebuild scores raw outputs) and
imports nothing of the project above it: the judge reaches a backend through a small protocol
that :class:`router_ml.backends.client.BackendClient` satisfies.
"""
