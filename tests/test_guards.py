"""The trainer's divergence guards on hand-made histories and parameters."""
import jax.numpy as jnp
import numpy as np
import pytest

from mapo_jax.run.guards import SKIP_WINDOW, DivergedError, check_exportable, check_skipped


def test_more_than_the_fraction_of_the_last_window_stops():
  history = [(0, 0)]
  check_skipped(history, 50, 10, 0.1)  # 10 of 50 steps: exactly the limit of 10 per 100, not past it
  with pytest.raises(DivergedError, match="11 of the last 60 steps"):
    check_skipped(history, 60, 11, 0.1)
  # Skips older than the window no longer count: 30 skipped by step 100, none since.
  history = [(0, 0), (100, 30)]
  check_skipped(history, 100 + SKIP_WINDOW, 30, 0.1)
  with pytest.raises(DivergedError):
    check_skipped(history, 100 + SKIP_WINDOW + 10, 41, 0.1)  # 11 in the last 100 (steps 111..210)


def test_the_history_keeps_only_the_window():
  """A long run's checks (every 10 steps for 10 SKIP_WINDOWs) leave at most a window's worth in the history."""
  history = [(0, 0)]
  for step in range(10, 10 * SKIP_WINDOW + 1, 10):
    check_skipped(history, step, 0, 0.1)
  assert len(history) <= SKIP_WINDOW // 10 + 1 and history[-1] == (10 * SKIP_WINDOW, 0)
  assert history[0][0] <= 9 * SKIP_WINDOW  # the window's base is kept


def test_export_refuses_non_finite_or_grown_parameters():
  params = {"a": jnp.ones((3,)), "b": [jnp.full((4,), 2.0)]}
  norm = float(np.sqrt(3 + 16))
  check_exportable(params, norm, 10.0)
  with pytest.raises(DivergedError, match="not finite"):
    check_exportable({"a": jnp.array([1.0, jnp.nan])}, norm, 10.0)
  with pytest.raises(DivergedError, match="grew from"):
    check_exportable(jax_scaled(params, 11.0), norm, 10.0)


def jax_scaled(tree, factor):
  return {"a": tree["a"] * factor, "b": [x * factor for x in tree["b"]]}
