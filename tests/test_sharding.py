"""GC on a 2x4 ("data", "model") mesh of the 8 simulated CPU devices conftest.py sets up.

For ``AxisType.Auto`` and ``AxisType.Explicit`` meshes, and kernels sharded on
their fan-in axes, on their output axis and on both, a jitted step of
``chain(optax_gc.centralize(), optax.adamw(...))``:

- centres the sharded gradient as NumPy float64 does, with the fan-in axes
  written down here, and keeps its sharding;
- gives the same parameters as the same steps on one device;
- keeps the sharding of every parameter and optimizer-state leaf across steps;
- compiles to HLO whose only collective is the all-reduce of the fan-in means,
  and has none where no fan-in is sharded.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import collectives, flat, nest, np_centre, run_steps
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
  # 2**16 elements, where XLA:CPU sums the fan-in as a dot with a constant
  # (optax_gc/_src/fan_in.py), which must not gather either: fan-in first,
  # batched by a stack's layer axis, and fan-in last (a torch layout).
  "big/kernel": ((256, 256), (0,)),
  "big/stack/kernel": ((4, 128, 128), (1,)),
  "big/torch/kernel": ((256, 256), (1,)),
  "big/stack_bf16/kernel": ((4, 128, 128), (1,)),  # bfloat16 params and gradients
}
# bfloat16 leaves: GC within bfloat16 rounding of float64 (2**-8 relative), the
# parameters within one bfloat16 ulp of one device's (2**-7), instead of 1e-5.
BF16 = {"big/stack_bf16/kernel"}

# How each leaf is laid out on the mesh, per layout.
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
CASES = [
  (axis_type, layout) for axis_type in (AxisType.Auto, AxisType.Explicit) for layout in SPECS
]

TX = optax.chain(optax_gc.centralize(RULES), optax.adamw(1e-2, weight_decay=1e-2))


def _arrays(seed, offset):
  rng = np.random.default_rng(seed)
  return {
    path: np.asarray(
      rng.normal(offset, 1.0, size=shape), jnp.bfloat16 if path in BF16 else np.float32
    )
    for path, (shape, _) in LEAVES.items()
  }


# Gradients with a mean of 0.5 for GC to remove; the same values for every case.
PARAMS = _arrays(0, 0.0)
GRADS = [_arrays(1 + t, 0.5) for t in range(STEPS)]


def _step(params, opt_state, grads):
  """One optimizer step; also returns GC of the gradient, to check it on its own."""
  centred, _ = optax_gc.centralize(RULES).update(grads, optax.EmptyState())
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, centred


@dataclasses.dataclass
class Run:
  history: list  # (params, opt_state) before the first step and after each
  hlo: str  # the compiled step
  centred: dict  # {path: GC of the first gradient}


def _run(place) -> Run:
  """STEPS jitted steps on the arrays placed by ``place(path, value)``."""
  params = nest({p: place(p, v) for p, v in PARAMS.items()})
  grads = [nest({p: place(p, v) for p, v in g.items()}) for g in GRADS]
  # Eager init, as nnx.Optimizer and TrainState.create do: optax's zeros_like
  # lays the moments out like the parameters. (jax.jit(TX.init) under an Auto
  # mesh would need out_shardings: nothing ties its zeros to the inputs.)
  opt_state = TX.init(params)
  # One compilation: the HLO checked is the program that runs.
  step = jax.jit(_step).lower(params, opt_state, grads[0]).compile()
  history, centred = run_steps(step, params, opt_state, grads)
  return Run(history, step.as_text(), flat(centred[0]))


def _is_laid_out_as(leaf, sharding):
  return leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_the_tests_run_on_8_cpu_devices():
  assert jax.device_count() == 8, (
    f"found {jax.device_count()} devices: something imported jax before tests/conftest.py "
    "set XLA_FLAGS, or JAX_PLATFORMS names a platform without 8 devices"
  )


@pytest.fixture(scope="module")
def one_device():
  """The parameters after STEPS steps on one device, as NumPy arrays."""
  device = jax.devices()[0]
  run = _run(lambda path, value: jax.device_put(value, device))
  return flat(run.history[-1][0], numpy=True)


@pytest.fixture(scope="module", params=CASES, ids=[f"{a.name}-{layout}" for a, layout in CASES])
def case(request):
  """(layout, {path: NamedSharding}, Run) for one axis type and layout."""
  axis_type, layout = request.param
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  shardings = {path: NamedSharding(mesh, spec) for path, spec in SPECS[layout].items()}
  with jax.set_mesh(mesh):
    run = _run(lambda path, value: jax.device_put(value, shardings[path]))
  return layout, shardings, run


@pytest.mark.parametrize("path", LEAVES)
def test_gc_of_a_sharded_gradient_is_float64_gc_and_keeps_its_sharding(case, path):
  _, shardings, run = case
  got, grad = run.centred[path], GRADS[0][path]
  assert _is_laid_out_as(got, shardings[path]), got.sharding
  expected = np_centre(grad, LEAVES[path][1])
  rtol = 2.0**-8 if path in BF16 else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=1e-5)
  if LEAVES[path][1] is not None:
    # The mean removed is far above the tolerance: a GC that did nothing fails.
    assert np.max(np.abs(expected - np.asarray(grad, np.float64))) > 0.1


@pytest.mark.parametrize("path", LEAVES)
def test_parameters_after_sharded_steps_are_those_of_one_device(case, one_device, path):
  _, _, run = case
  got = np.asarray(flat(run.history[-1][0])[path], np.float64)
  want = np.asarray(one_device[path], np.float64)
  # One bfloat16 ulp (2**-7) for the bfloat16 leaf.
  rtol = 2.0**-7 if path in BF16 else 1e-5
  np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
  # The steps moved the parameters by far more than the tolerance.
  assert np.max(np.abs(want - np.asarray(PARAMS[path], np.float64))) > 1e-3


def test_parameters_and_adam_moments_keep_their_layout_across_steps(case):
  _, shardings, run = case
  adam = run.history[0][1][1][0]
  # adamw's moments are laid out like the parameters.
  for moment in ("mu", "nu"):
    for path, leaf in flat(getattr(adam, moment)).items():
      assert _is_laid_out_as(leaf, shardings[path]), f"{moment} of {path}: {leaf.sharding}"
  # Every leaf of (params, opt_state) keeps its layout at every step.
  initial = flat(run.history[0])
  for t, state in enumerate(run.history[1:], 1):
    for path, leaf in flat(state).items():
      assert _is_laid_out_as(leaf, initial[path].sharding), (
        f"step {t} changed {path} from {initial[path].sharding} to {leaf.sharding}"
      )


@pytest.mark.xla_cpu_internals
def test_the_compiled_step_only_all_reduces_and_only_where_the_fan_in_is_sharded(case):
  # Which collectives the SPMD partitioner emits, read from the HLO text.
  layout, _, run = case
  expected = [] if layout == "fan_out" else ["all-reduce"]
  assert collectives(run.hlo) == expected, [
    line.strip()[:240] for line in run.hlo.splitlines() if collectives(line)
  ]
