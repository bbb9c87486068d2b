"""GC on a 2x4 ("data", "model") mesh of 8 simulated CPU devices; run by test_sharding.py.

Run it in a process of its own, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is
imported (test_sharding.py does). For both ``AxisType.Auto`` and
``AxisType.Explicit`` meshes, and kernels sharded on their fan-in axes, on their
output axis, and on both, it checks that a jitted optimizer step
``chain(optax_gc.centralize(), optax.adamw(...))``:

- centres the sharded gradient as NumPy float64 does, with the fan-in axes
  written down here;
- gives the same parameters as the same step on one device (rtol 1e-5, one
  ulp for the bfloat16 leaf);
- keeps the sharding of every parameter and optimizer-state leaf across steps;
- compiles to HLO whose only collective is all-reduce (no all-gather).

It prints one line per case and exits non-zero listing every failed check.
Importing this module (pytest's doctest collection does) runs nothing.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import collectives, nest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gc

STEPS = 3
RULES = (
  (r"(blocks/lin|big/stack(_bf16)?)/kernel$", (-2,)),
  (r"big/torch/kernel$", "all_but_first"),
)

# leaf: (shape, fan-in axes written by hand for the flax layouts, or None).
LEAVES = {
  "dense/kernel": ((16, 8), (0,)),  # (in, out)
  "conv/kernel": ((2, 8, 16), (0, 1)),  # (width, in, out)
  "attn/out/kernel": ((4, 2, 16), (0, 1)),  # (heads, head_dim, out)
  "blocks/lin/kernel": ((2, 16, 8), (1,)),  # nnx.vmap stack: (layers, in, out)
  "dense/bias": ((8,), None),
  # Large enough (2**16 elements) for the transform's dot path (the fan-in sum
  # as a dot with a constant), which must not gather either: fan-in first,
  # batched by a stack's layer axis, and fan-in last (a torch layout).
  "big/kernel": ((256, 256), (0,)),
  "big/stack/kernel": ((4, 128, 128), (1,)),
  "big/torch/kernel": ((256, 256), (1,)),
  "big/stack_bf16/kernel": ((4, 128, 128), (1,)),  # bfloat16 params and gradients
}
# bfloat16 leaves: GC within bfloat16 rounding of float64 (2**-8 relative), the
# parameters within one bfloat16 ulp of one device's (2**-7), instead of 1e-5.
BF16 = {"big/stack_bf16/kernel"}

# How each leaf is laid out on the mesh, per case.
SPECS = {
  "fan_in": {
    "dense/kernel": P("model", None),
    "conv/kernel": P("data", "model", None),
    "attn/out/kernel": P("model", "data", None),
    "blocks/lin/kernel": P(None, ("data", "model"), None),
    "dense/bias": P(None),
    "big/kernel": P("model", None),
    "big/stack/kernel": P(None, "model", None),
    "big/torch/kernel": P(None, "model"),
    "big/stack_bf16/kernel": P(None, "model", None),
  },
  "fan_out": {
    "dense/kernel": P(None, "model"),
    "conv/kernel": P(None, None, ("data", "model")),
    "attn/out/kernel": P(None, None, "model"),
    "blocks/lin/kernel": P("data", None, "model"),
    "dense/bias": P("model"),
    "big/kernel": P(None, "model"),
    "big/stack/kernel": P("data", None, "model"),
    "big/torch/kernel": P("model", None),
    "big/stack_bf16/kernel": P("data", None, "model"),
  },
  "both": {
    "dense/kernel": P("data", "model"),
    "conv/kernel": P(None, "data", "model"),
    "attn/out/kernel": P("data", None, "model"),
    "blocks/lin/kernel": P(None, "data", "model"),
    "dense/bias": P("model"),
    "big/kernel": P("data", "model"),
    "big/stack/kernel": P(None, "data", "model"),
    "big/torch/kernel": P("data", "model"),
    "big/stack_bf16/kernel": P(None, "data", "model"),
  },
}


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat(value, path + "/"))
    else:
      out[path] = value
  return out


def _arrays(seed, offset):
  rng = np.random.default_rng(seed)
  return {
    path: np.asarray(
      rng.normal(offset, 1.0, size=shape), jnp.bfloat16 if path in BF16 else np.float32
    )
    for path, (shape, _) in LEAVES.items()
  }


def _gc64(grads):
  out = {}
  for path, g in grads.items():
    g64, axes = np.asarray(g, np.float64), LEAVES[path][1]
    out[path] = g64 if axes is None else g64 - g64.mean(axis=axes, keepdims=True)
  return out


TX = optax.chain(optax_gc.centralize(RULES), optax.adamw(1e-2, weight_decay=1e-2))


def _step(params, opt_state, grads):
  """One optimizer step; also returns GC of the gradient, to check it on its own."""
  centred, _ = optax_gc.centralize(RULES).update(grads, optax.EmptyState())
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, centred


def _same_sharding(a, b, ndim):
  return a.is_equivalent_to(b, ndim)


def _run(place, params_np, grads_np):
  """Runs STEPS jitted steps on arrays placed by ``place``.

  Returns the (params, opt_state) after each step, the compiled HLO text, and
  GC of the first gradient.
  """
  params = nest({p: place(p, v) for p, v in params_np.items()})
  grads = [nest({p: place(p, v) for p, v in g.items()}) for g in grads_np]
  # Eager init, as nnx.Optimizer and TrainState.create do: optax's zeros_like
  # lays the moments out like the parameters. (jax.jit(TX.init) under an Auto
  # mesh would need out_shardings: nothing ties its zeros to the inputs.)
  opt_state = TX.init(params)
  # One compilation: the HLO checked is the program that runs.
  step = jax.jit(_step).lower(params, opt_state, grads[0]).compile()
  history, centred = [(params, opt_state)], []
  for g in grads:
    params, opt_state, c = step(params, opt_state, g)
    history.append((params, opt_state))
    centred.append(c)
  return history, step.as_text(), centred[0]


def check_case(axis_type, case, reference, params_np, grads_np):
  """Returns a list of failure messages for one (axis type, sharding case)."""
  failures = []
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  specs = SPECS[case]
  name = f"{axis_type.name}/{case}"

  def place(path, value):
    return jax.device_put(value, NamedSharding(mesh, specs[path]))

  with jax.set_mesh(mesh):
    history, hlo, centred = _run(place, params_np, grads_np)

  # GC of the sharded gradient, against NumPy float64 with hand-written axes;
  # it keeps the gradient's sharding.
  expected = _gc64(grads_np[0])
  for path, value in _flat(centred).items():
    tol = 2.0**-8 if path in BF16 else 1e-5
    if not np.allclose(np.asarray(value, np.float64), expected[path], rtol=tol, atol=1e-5):
      failures.append(f"{name}: GC of {path} differs from NumPy float64")
    if not _same_sharding(value.sharding, NamedSharding(mesh, specs[path]), value.ndim):
      failures.append(f"{name}: GC changed the sharding of {path} to {value.sharding}")

  # Same parameters as on one device.
  final = _flat(history[-1][0])
  for path, value in reference.items():
    got, tol = np.asarray(final[path], np.float64), 2.0**-7 if path in BF16 else 1e-5  # 1 ulp
    if not np.allclose(got, np.asarray(value, np.float64), rtol=tol, atol=1e-6):
      err = np.max(np.abs(got - value))
      failures.append(f"{name}: {path} after {STEPS} steps differs from one device by {err}")

  # Every parameter and state leaf keeps its sharding across steps; the
  # moments are laid out like their parameters.
  first_params, first_state = history[0]
  for path, leaf in _flat(first_params).items():
    if not _same_sharding(leaf.sharding, NamedSharding(mesh, specs[path]), leaf.ndim):
      failures.append(f"{name}: param {path} was placed as {leaf.sharding}")
  adam = first_state[1][0]
  for moment in ("mu", "nu"):
    for path, leaf in _flat(getattr(adam, moment)).items():
      if not _same_sharding(leaf.sharding, NamedSharding(mesh, specs[path]), leaf.ndim):
        failures.append(f"{name}: {moment} of {path} is laid out as {leaf.sharding}")
  initial = jax.tree_util.tree_flatten_with_path(history[0])[0]
  changed = set()
  for t, state in enumerate(history[1:], 1):
    for (keypath, leaf0), leaf in zip(initial, jax.tree.leaves(state), strict=True):
      where = jax.tree_util.keystr(keypath)
      if where not in changed and not _same_sharding(leaf.sharding, leaf0.sharding, leaf.ndim):
        changed.add(where)
        failures.append(
          f"{name}: step {t} changed {where} from {leaf0.sharding.spec} to {leaf.sharding.spec}"
        )

  # The only collective: all-reduce (of the fan-in means, where the fan-in is sharded).
  found = set(collectives(hlo))
  if found - {"all-reduce"}:
    lines = [
      line.strip()[:240]
      for line in hlo.splitlines()
      if any(re.search(rf"\b{op}(-start)?\(", line) for op in found - {"all-reduce"})
    ]
    failures.append(
      f"{name}: the compiled step holds {sorted(found)}:\n    " + "\n    ".join(lines)
    )
  if case != "fan_out" and "all-reduce" not in found:
    failures.append(f"{name}: no all-reduce, though the fan-in is sharded")
  print(f"{name}: collectives {sorted(found) or 'none'}; {len(failures)} failures", flush=True)
  return failures


def main() -> int:
  if jax.device_count() != 8:
    print(
      f"needs 8 devices, found {jax.device_count()}: set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax",
      file=sys.stderr,
    )
    return 2
  params_np = _arrays(0, 0.0)
  grads_np = [_arrays(1 + t, 0.5) for t in range(STEPS)]
  one = jax.devices()[0]
  history, _, _ = _run(lambda path, v: jax.device_put(v, one), params_np, grads_np)
  reference = {p: np.asarray(v) for p, v in _flat(history[-1][0]).items()}
  # The steps moved the kernels by more than the tolerance.
  assert all(np.max(np.abs(reference[p] - params_np[p])) > 1e-3 for p in LEAVES)

  failures = []
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    for case in SPECS:
      try:
        failures += check_case(axis_type, case, reference, params_np, grads_np)
      except Exception as e:  # report every case, not only the first that raises
        failures.append(f"{axis_type.name}/{case}: raised {type(e).__name__}: {e}")
  for failure in failures:
    print("FAIL", failure, file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
