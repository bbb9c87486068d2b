"""Independent references shared by the integration tests (GC itself: helpers.np_centre).

Nothing here imports optax_gc: the tests compare the library against these.
"""

from __future__ import annotations

import numpy as np
from helpers import flat, np_centre


def leaves_by_path(tree) -> dict[str, np.ndarray]:
  """Maps each leaf's "/"-joined path (a trailing ``value`` dropped) to a NumPy copy."""
  return {path: np.asarray(leaf) for path, leaf in flat(tree).items()}


def assert_update_is_gc(
  update, grad, axes, *, path, scale=1.0, strength=1.0, rtol=1e-4, atol_floor=0.0
):
  """Checks ``update == scale * GC(grad)`` for one leaf, and that GC was not a no-op there.

  The tolerance is relative to the largest gradient entry (plus ``atol_floor``,
  for updates read back as differences of float32 parameters), so float32
  rounding passes and a missing or misplaced mean (a change of order |mean|) fails.
  """
  expected = scale * np_centre(grad, axes, strength)
  atol = rtol * abs(scale) * float(np.max(np.abs(grad))) + atol_floor
  np.testing.assert_allclose(
    np.asarray(update, np.float64), expected, rtol=rtol, atol=atol, err_msg=f"leaf {path}"
  )
  if axes is not None and strength != 0:
    removed = np.max(np.abs(expected - scale * np.asarray(grad, np.float64)))
    assert removed > 10 * atol, f"{path}: the mean is too small for this check to fail"


def param_step_atol(before) -> float:
  """Rounding of ``after - before`` for float32 parameters: a few ulps of the largest one."""
  return 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(before)))
