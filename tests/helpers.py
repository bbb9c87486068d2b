"""Independent references for the tests: NumPy, float64, written without optax_gc.

conftest.py imports this module to set ``XLA_FLAGS`` before anything imports
jax, so jax is imported only inside the functions that need it.
"""

import re

import numpy as np

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU's code generation without LLVM's optimisations: programs compile in about half
# the time, and run more slowly.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def with_host_device_count(xla_flags: str, count: int) -> str:
  """``xla_flags`` with the CPU device count set to ``count``, the other flags kept.

  >>> with_host_device_count("--xla_dump_to=/tmp --xla_force_host_platform_device_count=2", 8)
  '--xla_dump_to=/tmp --xla_force_host_platform_device_count=8'
  """
  kept = [f for f in xla_flags.split() if f.split("=")[0] != DEVICE_COUNT_FLAG]
  return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])


def np_centre(g, axes, strength=1.0):
  """GC of one array in float64: g - strength * mean over ``axes``."""
  x = np.asarray(g, dtype=np.float64)
  if axes is None:
    return x
  return x - strength * x.mean(axis=tuple(axes), keepdims=True)


def flat(tree, *, numpy=False):
  """{path string: leaf} built with jax.tree_util, for comparing trees by name.

  Paths are "/"-joined, with a trailing ``value`` (an nnx Variable's, a flax
  box's) dropped, as optax_gc writes them. ``numpy=True`` copies each leaf to a
  NumPy array (whose ``astype(np.float64)`` is float64 also where jax's is not).
  """
  import jax

  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = np.asarray(leaf) if numpy else leaf
  return out


def nest(flat_tree):
  """The nested dict of ``{"a/b": leaf}``: the inverse of :func:`flat` for dicts."""
  out = {}
  for path, value in flat_tree.items():
    node = out
    *parents, last = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = value
  return out


def fan_in_sums(g, axes):
  """Sum over the fan-in, in float64: zero for every output unit after GC."""
  return np.asarray(g, dtype=np.float64).sum(axis=tuple(axes))


def collectives(hlo: str) -> list[str]:
  """The collective operations in compiled HLO text (async ``-start`` forms included)."""
  return sorted(op for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", hlo))


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


def run_steps(step, params, opt_state, grads):
  """``(history, centred)`` of ``step(params, opt_state, g) -> (params, opt_state, centred)``.

  ``history`` holds ``(params, opt_state)`` before the first step and after each.
  """
  history, centred = [(params, opt_state)], []
  for g in grads:
    params, opt_state, c = step(params, opt_state, g)
    history.append((params, opt_state))
    centred.append(c)
  return history, centred


def random_params(shapes: dict, seed: int = 0) -> dict:
  """``{layer: {name: float64 normal array}}`` of the given shapes."""
  rng = np.random.default_rng(seed)
  return {n: {k: rng.normal(size=s) for k, s in d.items()} for n, d in shapes.items()}


def step_grads(params, t: int):
  """Gradients that depend on the step and on the parameters (so optimizer state matters)."""
  import jax

  rng = np.random.default_rng(1000 + t)
  return jax.tree.map(lambda p: rng.normal(size=p.shape) + 0.3 * np.asarray(p), params)
