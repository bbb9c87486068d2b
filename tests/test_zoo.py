"""optax_gc on the zoo of tests/zoo.py: every leaf against a fan-in table written by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import flat, np_centre
from zoo import CASES, normalise, rules_for_case

import optax_gc

DERIVED = [case for case in CASES if case.framework != "haiku"]
NUMERIC = [case for case in CASES if case.numeric]


def _ids(case):
  return case.name


@functools.cache
def _rules(case):
  return rules_for_case(optax_gc, case)


def _want(expected, tree):
  """The table, normalised against the leaves' shapes; it must name exactly the tree's leaves."""
  leaves = flat(tree)
  assert set(leaves) == set(expected), f"table and tree differ: {set(leaves) ^ set(expected)}"
  return {path: normalise(expected[path], np.shape(leaf)) for path, leaf in leaves.items()}


def _wrong(plan, want, *, allow_guess=False):
  return {
    path: f"{plan[path].shape}: got {plan[path].axes} ({plan[path].decided_by}), want {axes}"
    for path, axes in want.items()
    if plan[path].axes != axes and not (allow_guess and plan[path].guess)
  }


def _tree_forms(case):
  """(tree, table) for every form of the params a user may hand to the optimizer."""
  if case.framework == "linen":
    return [(case.variables, case.expected_variables()), (case.params(), case.expected)]
  if case.framework == "nnx":
    state = case.params()
    return [(state, case.expected), (nnx.to_pure_dict(state), case.expected)]
  return [(case.params(), case.expected)]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_zoo_table_names_every_leaf_with_axes_in_range(case):
  for path, leaf in flat(case.params()).items():
    axes = case.expected.get(path, ())
    assert axes is None or (
      axes and list(axes) == sorted(set(axes)) and all(0 <= a < np.ndim(leaf) for a in axes)
    ), f"{path} {np.shape(leaf)}: {axes}"
  _want(case.expected, case.params())


@pytest.mark.parametrize("case", DERIVED, ids=_ids)
def test_rules_for_matches_the_table(case):
  for tree, expected in _tree_forms(case):
    plan = optax_gc.explain(tree, _rules(case), preset=case.preset)
    wrong = _wrong(plan, _want(expected, tree))
    assert not wrong, wrong


def test_rules_for_refuses_haiku():
  (case,) = [case for case in CASES if case.framework == "haiku"]
  with pytest.raises((TypeError, ValueError)):
    optax_gc.rules_for(case.model, *case.args)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_preset_alone_is_right_or_says_it_guessed(case):
  tree = case.params()
  plan = optax_gc.explain(tree, preset=case.preset)
  wrong = _wrong(plan, _want(case.expected, tree), allow_guess=True)
  assert not wrong, wrong


@pytest.mark.parametrize("case", NUMERIC, ids=_ids)
def test_centralize_with_rules_for_applies_the_table(case):
  tree = case.params()
  if case.framework == "nnx":
    tree = nnx.to_pure_dict(tree)
  want = _want(case.expected, tree)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(
    lambda leaf: jnp.asarray(rng.standard_normal(np.shape(leaf)), jnp.float32), tree
  )
  tx = optax_gc.centralize(_rules(case), preset=case.preset)
  out = flat(tx.update(grads, tx.init(grads))[0])
  for path, g in flat(grads).items():
    g = np.asarray(g)
    np.testing.assert_allclose(
      np.asarray(out[path], np.float64),
      np_centre(g, want[path]),
      atol=1e-5 * np.abs(g).max(),
      err_msg=f"{path} {g.shape} axes {want[path]}",
    )
