"""centralize: properties of the projection, numerics, the rule language, bad input."""

import math
import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fan_in_sums, flat, np_centre
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_gc
from optax_gc._src.fan_in import _DOT_MIN_SIZE, _dot_applies, _fan_in_dot
from optax_gc._src.transform import centre

GC = optax_gc.centralize()


def gc(tree, tx=GC):
  return tx.update(tree, tx.init(tree))[0]


# A random kernel and a random choice of fan-in axes, named by rule.
@st.composite
def kernel_and_axes(draw):
  shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5))
  axes = draw(st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape)))
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
  g = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale
  return g, tuple(sorted(axes))


# Each example compiles its own shapes: 30 random kernels and axes per property.
PROPS = settings(max_examples=30, deadline=None)


@PROPS
@given(kernel_and_axes())
def test_matches_float64_numpy_reference(case):
  g, axes = case
  out = gc({"w": g}, optax_gc.centralize([("w", axes)]))["w"]
  if np.prod([g.shape[a] for a in axes]) == 1:
    np.testing.assert_array_equal(out, g)  # a fan-in of one is left alone
    return
  scale = np.abs(g).max()
  np.testing.assert_allclose(out, np_centre(g, axes), rtol=0, atol=2e-6 * scale)


@PROPS
@given(kernel_and_axes())
def test_projection_properties(case):
  g, axes = case
  if np.prod([g.shape[a] for a in axes]) == 1:
    return
  tx = optax_gc.centralize([("w", axes)])
  once = gc({"w": g}, tx)["w"]
  twice = gc({"w": once}, tx)["w"]
  scale = np.abs(g).max()
  # Zero fan-in sum for every output unit.
  n = np.prod([g.shape[a] for a in axes])
  np.testing.assert_allclose(fan_in_sums(once, axes), 0.0, atol=4e-6 * scale * n)
  # Idempotent: a projection.
  np.testing.assert_allclose(twice, once, rtol=0, atol=2e-6 * scale)
  # Orthogonal projection: the norm never grows.
  assert np.linalg.norm(once) <= np.linalg.norm(g) * (1 + 1e-6)


@PROPS
@given(kernel_and_axes(), st.floats(0.0, 1.0))
def test_strength_jit_and_eager_agree(case, strength):
  g, axes = case
  tx = optax_gc.centralize([("w", axes)], strength=strength)
  eager = gc({"w": g}, tx)["w"]
  jitted = jax.jit(lambda t: tx.update(t, optax.EmptyState())[0])({"w": g})["w"]
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6 * np.abs(g).max())
  if np.prod([g.shape[a] for a in axes]) > 1:
    want = np_centre(g, axes, strength)
    np.testing.assert_allclose(eager, want, rtol=0, atol=2e-6 * np.abs(g).max())


def test_strength_zero_is_exactly_the_identity():
  g = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
  np.testing.assert_array_equal(gc({"kernel": g}, optax_gc.centralize(strength=0.0))["kernel"], g)


def test_strength_scheduled_by_inject_hyperparams():
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=2)
  tx = optax.inject_hyperparams(optax_gc.centralize)(strength=schedule)
  g = {"kernel": np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)}
  state = tx.init(g)
  step = jax.jit(tx.update)
  outs = []
  for _ in range(3):
    out, state = step(g, state)
    outs.append(out["kernel"])
  for out, s in zip(outs, [0.0, 0.5, 1.0], strict=True):
    np.testing.assert_allclose(out, np_centre(g["kernel"], (0,), s), atol=1e-6)


def test_jit_compiles_once_per_structure():
  tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
  params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state):
    return tx.update(g, state, params)

  for i in range(3):
    step(jax.tree.map(lambda x, i=i: x * i, params), state)


@pytest.mark.xla_cpu_internals
def test_no_rank_promotion_and_no_reshape():
  """Reductions keep dims (no implicit broadcasting), and the HLO has no reshape."""
  g = {"kernel": jnp.ones((3, 3, 4, 8))}
  with jax.numpy_rank_promotion("raise"):
    gc(g)
  hlo = jax.jit(lambda t: GC.update(t, optax.EmptyState())[0]).lower(g).as_text()
  assert "reshape" not in hlo


# Numerics.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_mean_taken_in_float32(dtype):
  rng = np.random.default_rng(0)
  x = (1.3 + 0.01 * rng.normal(size=(256, 16))).astype(dtype)
  out = gc({"kernel": x})["kernel"]
  assert out.dtype == dtype
  ref = np_centre(np.asarray(x, np.float64), (0,))
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=eps, atol=1e-6)
  # What the float32 computation avoids: the low-precision mean is badly off.
  naive = np.asarray(x - x.mean(axis=0, keepdims=True), np.float64)
  assert np.abs(naive - ref).max() > 10 * np.abs(np.asarray(out, np.float64) - ref).max()


def test_huge_finite_inputs_stay_finite_and_accurate():
  x = (1e37 * (1 + np.random.default_rng(0).random((64, 8)))).astype(np.float32)
  assert not np.isfinite(jnp.mean(jnp.asarray(x), axis=0)).all()  # jnp.mean overflows
  out = gc({"kernel": x})["kernel"]
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, np_centre(x, (0,)), rtol=0, atol=1e-6 * 2e37)


def test_unrepresentable_result_saturates_instead_of_inf():
  big = float(np.finfo(np.float32).max)
  x = np.array([[big], [-big], [-big]], np.float32)
  out = np.asarray(gc({"kernel": x})["kernel"])
  assert np.isfinite(out).all()
  assert out[0, 0] == big  # the exact 4/3 * max is not representable


# The rule language.


def test_user_rules_first_then_preset_first_match_wins():
  tree = {"attn": {"out": {"kernel": np.zeros((2, 4, 8), np.float32)}}}
  plan = optax_gc.explain(tree, [("out/kernel", (-1,)), ("out", None)])
  assert plan["attn/out/kernel"].axes == (2,)
  assert plan["attn/out/kernel"].decided_by == "rules[0] 'out/kernel'"
  assert optax_gc.explain(tree)["attn/out/kernel"].axes == (0, 1)


def test_rules_accept_a_dict_and_lists():
  tree = {"a": np.zeros((3, 4), np.float32)}
  assert optax_gc.explain(tree, {"a": [1]})["a"].axes == (1,)


def test_negative_axes_keep_a_stacked_layer_axis():
  tree = {"layers": {"Dense_0": {"kernel": np.zeros((6, 3, 4), np.float32)}}}
  assert optax_gc.explain(tree)["layers/Dense_0/kernel"].axes == (0, 1)  # wrong: mixes layers
  plan = optax_gc.explain(tree, [(r"layers/Dense_\d+/kernel$", (-2,))])
  assert plan["layers/Dense_0/kernel"].axes == (1,)


def test_passthrough_leaves_unchanged():
  tree = {
    "none": None,
    "masked": optax.MaskedNode(),
    "int": jnp.arange(6).reshape(2, 3),
    "bool": jnp.ones((2, 3), bool),
    "empty": jnp.zeros((0, 3)),
    "complex": jnp.ones((2, 3), jnp.complex64),
    "fan_in_one": jnp.arange(3.0).reshape(1, 3),
  }
  out = jax.jit(lambda t: GC.update(t, optax.EmptyState())[0])(tree)
  assert out["none"] is None and out["masked"] == optax.MaskedNode()
  for k in ("int", "bool", "empty", "complex", "fan_in_one"):
    assert out[k].dtype == tree[k].dtype
    np.testing.assert_array_equal(out[k], tree[k])


def test_torch_preset_is_all_but_first():
  w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
  tx = optax_gc.centralize(preset="torch")
  out = gc({"conv": {"weight": w, "bias": w[:, 0, 0, 0]}}, tx)
  np.testing.assert_allclose(out["conv"]["weight"], np_centre(w, (1, 2, 3)), atol=1e-6)
  np.testing.assert_array_equal(out["conv"]["bias"], w[:, 0, 0, 0])


def test_preset_none_only_uses_user_rules():
  tree = {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.float32)}
  plan = optax_gc.explain(tree, [("a", (0,))], preset=None)
  assert plan["a"].axes == (0,) and plan["b"].axes is None
  assert plan["b"].decided_by == "no rule matched"


def test_with_centralization_keeps_the_state_structure():
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape) * 1.0), params)
  adamw = optax.adamw(1e-2)
  wrapped = optax_gc.with_centralization(adamw)
  assert jax.tree.structure(wrapped.init(params)) == jax.tree.structure(adamw.init(params))
  chained = optax.chain(optax_gc.centralize(), adamw)
  u1, _ = wrapped.update(grads, wrapped.init(params), params)
  u2, _ = chained.update(grads, chained.init(params), params)
  chex.assert_trees_all_close(u1, u2)


def test_with_centralization_on_update_centres_the_final_update():
  params = {"kernel": jnp.ones((5, 3))}
  grads = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)}
  tx = optax_gc.with_centralization(optax.adamw(1e-2, weight_decay=0.5), on="update")
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(fan_in_sums(updates["kernel"], (0,)), 0.0, atol=1e-7)


# Bad input: a ValueError that names the problem and the fix, as early as possible.


@pytest.mark.parametrize(
  "rules, match",
  [
    ([("(unclosed", (0,))], r"rules\[0\]: invalid regular expression '\(unclosed'"),
    ([("kernel", 0)], r"bare int; write a tuple: \(0,\)"),
    ([("kernel", "all_but_one")], r"invalid axes 'all_but_one'"),
    ([("kernel", ())], r"invalid axes \(\)"),
    ([("kernel", (True,))], r"invalid axes \(True,\)"),
    ([("kernel", (0.5,))], r"invalid axes \(0.5,\)"),
    ([("kernel",)], r"must be a \(pattern, axes\) pair"),
    ([(3, (0,))], r"must be a regular expression string"),
    ("kernel", r"pass a sequence of \(pattern, axes\) pairs"),
  ],
)
def test_bad_rules_fail_at_construction(rules, match):
  with pytest.raises(ValueError, match=match):
    optax_gc.centralize(rules)
  with pytest.raises(ValueError, match=match):
    optax_gc.explain({}, rules)


def test_bad_preset_strength_strict_and_on_fail_at_construction():
  with pytest.raises(ValueError, match=r"Unknown preset 'linen'; use one of"):
    optax_gc.centralize(preset="linen")
  with pytest.raises(TypeError, match=r"preset=\['flax'\]: give one name"):
    optax_gc.centralize(preset=["flax"])
  with pytest.raises(ValueError, match=r"strength=1.5 is outside \[0, 1\]"):
    optax_gc.centralize(strength=1.5)
  for bad in ("high", True, jnp.ones(2), jnp.ones((), int)):
    with pytest.raises(TypeError, match=r"strength=.*give a float in \[0, 1\]"):
      optax_gc.centralize(strength=bad)
  with pytest.raises(TypeError, match=r"strict='yes': give True or False"):
    optax_gc.centralize(strict="yes")
  with pytest.raises(ValueError, match=r"on='grads'"):
    optax_gc.with_centralization(optax.sgd(1.0), on="grads")
  with pytest.raises(TypeError, match=r"tx is a function"):
    optax_gc.with_centralization(optax.sgd)
  assert optax_gc.centralize(strength=jnp.float32(0.5)).init({}) == optax.EmptyState()


def test_plan_repr_is_one_line_and_lookup_suggests_paths():
  tree = {
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    "conv": {"kernel": jnp.ones((3, 2, 4))},
  }
  plan = optax_gc.explain(tree)
  assert repr(plan) == "Plan(3 leaves: 2 centred, 1 unchanged, 1 guessed)"
  assert str(plan).count("\n") == 5  # header, 3 rows, the totals and the guess line
  with pytest.raises(KeyError, match=r"did you mean 'Dense_0/kernel'"):
    plan["Dense_0/kernal"]


def test_axis_out_of_range_names_path_shape_and_rule():
  tx = optax_gc.centralize([("kernel", (-3,))])
  with pytest.raises(ValueError) as e:
    gc({"Dense_0": {"kernel": jnp.ones((3, 4))}}, tx)
  msg = str(e.value)
  assert "'Dense_0/kernel'" in msg and "(3, 4)" in msg and "rules[0] 'kernel'" in msg
  assert "no axis -3" in msg


def test_axis_named_twice():
  with pytest.raises(ValueError, match=r"name the same axis twice"):
    optax_gc.explain({"w": np.ones((3, 4), np.float32)}, [("w", (0, -2))])


def test_strict_lists_unmatched_leaves_and_unused_rules():
  tree = {"lin": {"kernel": jnp.ones((3, 4))}, "other": jnp.ones((2, 2)), "b": jnp.ones(3)}
  tx = optax_gc.centralize([("lin/kernel$", (0,)), ("lni/kernel$", (0,))], preset=None, strict=True)
  with pytest.raises(ValueError) as e:
    tx.init(tree)
  msg = str(e.value)
  assert "leaf 'other' (2, 2) float32: no rule decided it" in msg
  assert "rules[1] 'lni/kernel$': matched no leaf" in msg
  assert "'b'" not in msg and "rules[0]" not in msg
  ok = optax_gc.centralize([("lin/kernel$", (0,)), ("other", None)], preset=None, strict=True)
  assert ok.init(tree) == optax.EmptyState()


def test_flattened_tree_is_refused():
  tx = optax.chain(optax.flatten(optax.chain(optax_gc.centralize(), optax.sgd(1.0))))
  with pytest.raises(ValueError, match=re.escape("put GC outside it")):
    tx.init({"kernel": jnp.ones((3, 4))})


# explain.


def test_explain_accepts_eval_shape_and_agrees_with_centralize():
  rng = np.random.default_rng(0)
  tree = {
    "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
    "attn": {
      "query": {"kernel": rng.normal(size=(8, 2, 4)), "bias": rng.normal(size=(2, 4))},
      "out": {"kernel": rng.normal(size=(2, 4, 8))},
    },
    "LayerNorm_0": {"scale": rng.normal(size=8)},
    "Embed_0": {"embedding": rng.normal(size=(10, 8))},
  }
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  plan = optax_gc.explain(jax.eval_shape(lambda: tree))
  out = flat(gc(tree))
  for path, leaf in flat(tree).items():
    np.testing.assert_allclose(out[path], np_centre(leaf, plan[path].axes), atol=1e-6)
  text = str(plan)
  assert "attn/out/kernel" in text and "(0, 1)" in text
  # Conv 3*3*2*4 + query 8*2*4 + out 2*4*8 = 200 centred parameters.
  assert text.splitlines()[-1] == "7 leaves: 3 centred (200 parameters), 4 unchanged"


# The large-leaf path of the transform (BENCHMARKS.md)
# (a dot with a constant vector, for leaves of 2**16 elements or more) must
# centre exactly as the reduction does for small leaves.
LARGE = [
  ((512, 256), (0,)),  # Dense (in, out)
  ((3, 3, 64, 128), (0, 1, 2)),  # Conv (kh, kw, in, out)
  ((4, 256, 8, 32), (1,)),  # scanned attention q/k/v (L, in, heads, head_dim)
  ((4, 8, 32, 256), (1, 2)),  # scanned attention out (L, heads, head_dim, out)
  ((256, 3, 3, 64), (1, 2, 3)),  # torch Conv (out, in, kh, kw)
]


@pytest.mark.parametrize(("shape", "axes"), LARGE, ids=[str(s) for s, _ in LARGE])
def test_large_leaf_path_matches_float64(shape, axes):
  assert math.prod(shape) >= _DOT_MIN_SIZE
  g = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  assert _dot_applies(jnp.asarray(g), axes)
  out = np.asarray(jax.jit(centre, static_argnums=1)(jnp.asarray(g), axes))
  np.testing.assert_allclose(out, np_centre(g, axes), rtol=0, atol=2e-6 * np.abs(g).max())
  huge = (1e37 * (1 + np.abs(g))).astype(np.float32)
  assert np.isfinite(np.asarray(centre(jnp.asarray(huge), axes))).all()


@pytest.mark.parametrize(("shape", "axes"), LARGE, ids=[str(s) for s, _ in LARGE])
def test_large_bf16_leaf_is_summed_in_float32(shape, axes):
  # bf16 gradients near 1.3 that differ by about 1%: a bf16 sum would be off by
  # a few percent; the float32 one agrees with float64 to 1e-5.
  g = (1.3 + 0.01 * np.random.default_rng(0).normal(size=shape)).astype(jnp.bfloat16)
  g64 = np.asarray(g, np.float64)
  assert _dot_applies(jnp.asarray(g), axes)
  total = _fan_in_dot(jnp.asarray(g), axes, 2.0**-3)
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(total, g64.sum(axes) * 2.0**-3, rtol=1e-5)
  out = np.asarray(jax.jit(centre, static_argnums=1)(jnp.asarray(g), axes), np.float64)
  want = np_centre(g64, axes)
  assert np.all(np.abs(out - want) <= 2.0**-8 * np.abs(want) + 1e-6)


@pytest.mark.xla_cpu_internals
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_the_dot_is_for_xla_cpu_alone_other_backends_reduce(dtype):
  # Lowered for each platform without its hardware (jax.export): XLA:CPU gets
  # the dot, GPUs and TPUs the reduction their XLA fuses.
  leaf = jax.ShapeDtypeStruct((512, 256), dtype)
  step = jax.jit(lambda g: centre(g, (0,)))
  for platform, dot in (("cpu", True), ("cuda", False), ("rocm", False), ("tpu", False)):
    text = jax.export.export(step, platforms=[platform])(leaf).mlir_module()
    assert ("stablehlo.dot_general" in text, "stablehlo.reduce" in text) == (dot, not dot)


# Temporaries of a jitted GC+adamw step, in leaves: float32 stays far below
# one. For bf16, XLA:CPU computes the centred gradient once for adamw's two
# moment updates instead of in each: one leaf, as for any elementwise GC (the
# plain jnp.mean one keeps two); a reduction's float32 copy would add two more.
TEMP_LEAVES = {jnp.float32: 0.25, jnp.bfloat16: 1.5}


@pytest.mark.xla_cpu_internals
@pytest.mark.parametrize("dtype", list(TEMP_LEAVES), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(("shape", "axes"), LARGE, ids=[str(s) for s, _ in LARGE])
def test_large_leaf_update_writes_no_full_size_temporary(shape, axes, dtype):
  # GC's only necessary cost is one more read of the gradient.
  params = {"w": jnp.zeros(shape, dtype)}
  tx = optax.chain(optax_gc.centralize([("w", axes)], preset=None), optax.adamw(1e-3))

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  leaf_bytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  assert compiled.memory_analysis().temp_size_in_bytes < TEMP_LEAVES[dtype] * leaf_bytes
