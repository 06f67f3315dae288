"""Parametrized cases of which only some run by default.

Every combination is a test; those outside ``fast`` are marked ``slow`` (run
with ``pytest -m slow``), so that the default run keeps one case of each kind
and stays within its time budget on two CPU cores.
"""

import itertools

import pytest


def grid(*axes, fast):
  """``pytest.param`` for every combination of ``axes``; those not in ``fast`` are slow.

  Args:
    *axes: the values of each parameter, in the order of the parametrize names.
    fast: the combinations (tuples, or single values for one axis) that run by
      default.
  """
  keep = [f if isinstance(f, tuple) else (f,) for f in fast]
  combos = list(itertools.product(*axes))
  missing = [f for f in keep if f not in combos]
  if missing:
    raise ValueError(f"fast cases not in the grid: {missing}")
  return [pytest.param(*c, marks=() if c in keep else pytest.mark.slow) for c in combos]
