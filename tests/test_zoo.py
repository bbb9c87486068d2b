"""optax_gc on the zoo of tests/zoo.py: every leaf against a fan-in table written by hand."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import flat, np_centre
from zoo import CASES, UNDECIDED, normalise, rules_for_case

import optax_gc

DERIVED = CASES
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
    if plan[path].axes != axes and not (allow_guess and _flagged(plan[path]))
  }


def _flagged(row):
  """The plan says it guessed, or that the model does not decide this leaf."""
  return row.guess or getattr(row, "undecided", False)


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
    # strict mode lists floating leaves of 2 or more dimensions: only those can be UNDECIDED.
    assert (
      axes is None
      or (axes is UNDECIDED and np.ndim(leaf) >= 2)
      or (axes and list(axes) == sorted(set(axes)) and all(0 <= a < np.ndim(leaf) for a in axes))
    ), f"{path} {np.shape(leaf)}: {axes}"
  _want(case.expected, case.params())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_zoo_model_runs_its_forward(case):
  assert jax.tree.leaves(case.forward())


@pytest.mark.parametrize("case", DERIVED, ids=_ids)
def test_rules_for_matches_the_table(case):
  for tree, expected in _tree_forms(case):
    plan = optax_gc.explain(tree, _rules(case), preset=case.preset)
    wrong = _wrong(plan, _want(expected, tree))
    assert not wrong, wrong


@pytest.mark.parametrize("case", DERIVED, ids=_ids)
def test_strict_lists_exactly_the_undecided_leaves(case):
  tree = case.params()
  if case.framework == "nnx":
    tree = nnx.to_pure_dict(tree)
  tx = optax_gc.centralize(_rules(case), preset=case.preset, strict=True)
  undecided = case.undecided()
  if not undecided:
    tx.init(tree)
    return
  with pytest.raises(ValueError) as info:
    tx.init(tree)
  # A path counts as listed where it stands whole, not inside a longer path.
  listed = {
    path
    for path in flat(tree)
    if re.search(rf"(?<![\w/~.-]){re.escape(path)}(?![\w/~.-])", str(info.value))
  }
  assert listed == undecided, str(info.value)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_preset_alone_is_right_or_says_it_guessed(case):
  tree = case.params()
  plan = optax_gc.explain(tree, preset=case.preset)
  want = _want(case.expected, tree)
  want = {path: axes for path, axes in want.items() if path not in case.preset_blind}
  wrong = _wrong(plan, want, allow_guess=True)
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
  out = flat(jax.jit(tx.update)(grads, tx.init(grads))[0])
  for path, g in flat(grads).items():
    g = np.asarray(g)
    np.testing.assert_allclose(
      np.asarray(out[path], np.float64),
      np_centre(g, want[path]),
      atol=1e-5 * np.abs(g).max(),
      err_msg=f"{path} {g.shape} axes {want[path]}",
    )
