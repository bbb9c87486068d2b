"""Each leaf's axis roles, exported as the arguments of other shape-aware optimizers.

:func:`optax_gc.rules_for` reads, for every contracted parameter, the axes a
contraction sums against the input (the fan-in), those that reach the output
(the fan-out) and those kept apart (a stack of layers, experts, a batch of
heads). Muon, GaLore, Adafactor, PSGD and muP each need these roles, and their
users write them by hand, leaf by leaf, for every way a model is stacked. The
exporters here turn the rules into each optimizer's own argument: a callable
of the parameter tree, returning a tree of the same structure, so that it
works on whatever tree the optimizer is handed (``nnx.Optimizer`` gives
``init`` Variables and ``update`` plain arrays; linen boxes its parameters;
an Equinox tree holds None; optax's wrappers hand masked trees). Every leaf is
decided by :func:`optax_gc._src.tree.decide_leaves`, as GC decides it.
Adafactor's factored moment, a transform of its own, is in
:mod:`optax_gc._src.factored`.
"""

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

from optax_gc._src import rules as rules_lib
from optax_gc._src import tree as tree_lib
from optax_gc._src.paths import path_string
from optax_gc._src.rules import Decision, LayerRule, RulesLike

_FROM_RULES_FOR = (
  "pass the rules optax_gc.rules_for(model, *inputs) derives: the roles are read from the "
  "model's program"
)


def _compile(rules: RulesLike, where: str) -> tuple[rules_lib.Rule, ...]:
  """The rules, checked now: they must hold rules_for's, which alone carry the roles."""
  compiled = rules_lib.compile_rules(rules, preset=None)
  if not any(rule.table is not None for rule in compiled):
    raise ValueError(f"{where}: the rules hold no rule from optax_gc.rules_for; {_FROM_RULES_FOR}.")
  return compiled


def _contraction(decision: Decision) -> LayerRule | None:
  """The rule of a leaf a contraction decided, with its fan-in; None for every other leaf.

  A leaf a user rule decided has no roles (``derived`` is None): a user rule
  ``(pattern, None)`` placed before the derived rules takes a leaf out.
  """
  rule = decision.derived
  if rule is None or rule.kind != "contraction" or not rule.axes:
    return None
  return rule


def _matrix(decision: Decision) -> LayerRule | None:
  """The rule of a contracted leaf with both a fan-in and a fan-out: a matrix per kept index."""
  rule = _contraction(decision)
  return rule if rule is not None and rule.fan_out else None


def _roles_text(rule: LayerRule) -> str:
  return f"fan-in {rule.axes}, fan-out {rule.fan_out}, kept {rule.kept} ({rule.how})"


def _masked_paths(tree) -> list[str]:
  """Paths of the leaves an optax wrapper masked out: they hold no array, but a path."""
  flat = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )[0]
  return [path_string(keypath) for keypath, x in flat if isinstance(x, optax.MaskedNode)]


def _export(
  tree,
  compiled: tuple[rules_lib.Rule, ...],
  where: str,
  fn: Callable[[tree_lib.Leaf, Decision], Any],
  extra: tuple[rules_lib.Rule, ...] = (),
):
  """``fn(leaf, decision)`` for every leaf, as a tree of the same structure as ``tree``.

  A box (an ``nnx.Variable``, a linen ``LogicallyPartitioned``) keeps its
  place, with the result as its value; None and ``optax.MaskedNode`` hold no
  leaf and stay as they are. ``extra`` rules are tried first, and each must
  match a leaf (or a masked leaf's path).
  """
  leaves, values, treedef = tree_lib.flatten(tree)
  decisions = tree_lib.decide_leaves(leaves, extra + compiled)
  unknown = [
    f"  {leaf.path!r} {leaf.shape}"
    for leaf, d in zip(leaves, decisions, strict=True)
    if d.rule is None
    and len(leaf.shape) >= 2
    and math.prod(leaf.shape) > 0
    and jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  if unknown:
    raise ValueError(
      f"{where}: no rule knows these leaves:\n"
      + "\n".join(unknown)
      + f"\nDerive the rules from the model whose parameters this tree holds ({_FROM_RULES_FOR}),"
      " or give each leaf a rule of your own before them: [(r'<path>$', None), *rules]."
    )
  used = {d.rule for d in decisions}
  masked = _masked_paths(tree) if extra else []
  unused = [
    rule.name
    for rule in extra
    if rule not in used and not any(rule.pattern and rule.pattern.search(p) for p in masked)
  ]
  if unused:
    shown = ", ".join(repr(leaf.path) for leaf in leaves[:3])
    raise ValueError(
      f"{where}: {', '.join(unused)} matched no leaf of the tree (its paths: {shown}, ...). "
      "Patterns are regular expressions searched in each leaf's path; fix or remove it."
    )
  out = [fn(leaf, d) for leaf, d in zip(leaves, decisions, strict=True)]
  boxes = tree_lib.box_types()
  out = [
    jax.tree.map(lambda _, o=o: o, x) if boxes and isinstance(x, boxes) else o
    for x, o in zip(values, out, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


def _pattern_rules(patterns: Iterable[str], name: str) -> tuple[rules_lib.Rule, ...]:
  if isinstance(patterns, (str, bytes)) or isinstance(patterns, Mapping):
    raise ValueError(
      f"{name}={patterns!r}: pass a sequence of path patterns, e.g. {name}=[r'head/kernel$']."
    )
  compiled = []
  for i, pattern in enumerate(patterns):
    where = f"{name}[{i}]"
    regex = rules_lib._compile_pattern(pattern, where)
    compiled.append(rules_lib.Rule(regex, None, f"{where} {regex.pattern!r}"))
  return tuple(compiled)


def muon_dimension_numbers(rules: RulesLike, *, adam: Iterable[str] = ()) -> Callable[[Any], Any]:
  """Muon's dimension numbers for every leaf, from the axes' roles the rules read.

  A contracted leaf gets ``MuonDimensionNumbers(reduction_axis=fan-in,
  output_axis=fan-out)``; Muon takes every axis it is not given as a batch axis,
  so a stacked layer's stack axis (and an expert axis) is orthogonalized entry
  by entry: each layer of a stack is updated as it would be alone. Every other
  leaf gets None, which sends it to Muon's Adam: biases, norm scales, tables
  (embeddings), leaves no contraction decides, and the leaves ``adam`` names
  (a model's output head, say).

  Args:
    rules: the rules of :func:`optax_gc.rules_for`, optionally after rules of
      your own; a leaf a rule of your own decides goes to Adam.
    adam: regular expressions searched in each leaf's path (as rules' patterns
      are); the leaves they match go to Adam. An invalid pattern raises
      ``ValueError`` here; one that matches no leaf raises it when the tree
      is first seen.

  Returns:
    A callable of the parameter tree, for
    ``optax.contrib.muon(..., muon_weight_dimension_numbers=...)``: a tree of
    the same structure holding a ``MuonDimensionNumbers`` or None per leaf.

  Raises:
    ValueError: here, for rules without :func:`optax_gc.rules_for`'s or an
      invalid pattern; on a tree, for a leaf no rule knows or an ``adam``
      pattern that matches no leaf.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import optax_gc
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return nn.Dense(4)(x), None
    >>> Stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
    >>> x = jnp.ones((2, 4))
    >>> rules = optax_gc.rules_for(Stack(), x, None)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), x, None)["params"]
    >>> numbers = optax_gc.muon_dimension_numbers(rules)(params)
    >>> numbers["Dense_0"]["kernel"]  # (in, layers, out): axis 1 is a batch axis
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(2,))
    >>> print(numbers["Dense_0"]["bias"])
    None
    >>> tx = optax.contrib.muon(
    ...   1e-3, muon_weight_dimension_numbers=optax_gc.muon_dimension_numbers(rules))
    >>> state = jax.eval_shape(tx.init, params)
  """
  where = "muon_dimension_numbers"
  compiled = _compile(rules, where)
  to_adam = _pattern_rules(adam, "adam")

  def leaf_numbers(leaf: tree_lib.Leaf, decision: Decision) -> MuonDimensionNumbers | None:
    del leaf
    rule = _matrix(decision)
    return None if rule is None else MuonDimensionNumbers(rule.axes, rule.fan_out)

  def dimension_numbers(tree):
    return _export(tree, compiled, where, leaf_numbers, to_adam)

  return dimension_numbers


def galore_dimension_numbers(rules: RulesLike) -> Callable[[Any], Any]:
  """GaLore's dimension numbers for every contracted leaf, from the axes' roles.

  optax's GaLore projects a leaf as one ``(reduction, output)`` matrix and has
  no batch axes: every axis must be a reduction or an output axis. A
  contracted leaf with nothing kept apart gets ``GaLoreDimensionNumbers(fan-in,
  fan-out)``; other leaves get None (GaLore's base optimizer, unprojected). A
  contracted leaf with a kept axis (a stack of layers, experts) cannot be
  expressed, and raises: projecting the stack as one matrix would mix layers.

  Args:
    rules: the rules of :func:`optax_gc.rules_for`, optionally after rules of
      your own; a leaf a rule of your own decides gets None.

  Returns:
    A callable of the parameter tree, for
    ``optax.contrib.galore(..., weight_dimension_numbers=...)``: a tree of the
    same structure holding a ``GaLoreDimensionNumbers`` or None per leaf.

  Raises:
    ValueError: on a tree, naming each leaf with a kept axis, its roles and the
      fix; and for a leaf no rule knows.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import optax_gc
    >>> model = nn.DenseGeneral((2, 3))  # kernel (in, heads, head_dim)
    >>> x = jnp.ones((2, 4))
    >>> rules = optax_gc.rules_for(model, x)
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    >>> optax_gc.galore_dimension_numbers(rules)(params)["kernel"]
    GaLoreDimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
    >>> tx = optax.contrib.galore(1e-3, rank=2,
    ...                           weight_dimension_numbers=optax_gc.galore_dimension_numbers(rules))
    >>> state = jax.eval_shape(tx.init, params)
  """
  where = "galore_dimension_numbers"
  compiled = _compile(rules, where)

  def leaf_numbers(leaf: tree_lib.Leaf, decision: Decision) -> GaLoreDimensionNumbers | None:
    rule = _matrix(decision)
    if rule is None:
      return None
    if rule.kept:
      raise ValueError(
        f"{where}: leaf {leaf.path!r} {leaf.shape} has {_roles_text(rule)}. optax's GaLore "
        "projects each leaf as one (reduction, output) matrix, with no axis kept apart, so "
        f"it would mix the entries of axes {rule.kept} (layers of a stack, experts). Unroll "
        "the stack, or leave the leaf unprojected with a rule of your own before the derived "
        f"ones: [(r'{leaf.path}$', None), *rules]."
      )
    return GaLoreDimensionNumbers(rule.axes, rule.fan_out)

  def dimension_numbers(tree):
    return _export(tree, compiled, where, leaf_numbers)

  return dimension_numbers


def scanned_layers(rules: RulesLike) -> Callable[[Any], Any]:
  """PSGD's ``scanned_layers`` flags: True where a leaf is a stack of layers at axis 0.

  PSGD (Kron) preconditions each entry of axis 0 of a flagged leaf as its own
  layer. A leaf with one kept axis, axis 0 (a stacked kernel, or the bias or
  norm scale of a stacked layer), is flagged; one with nothing kept is not. A
  kept axis elsewhere (``nn.scan`` with the params at axis 1), or two kept
  axes, cannot be expressed and raises.

  Args:
    rules: the rules of :func:`optax_gc.rules_for`.

  Returns:
    A callable of the parameter tree returning a tree of the same structure
    with a bool per leaf.

  Raises:
    ValueError: on a tree, naming each leaf kept apart along another axis than
      0, its axes and the fix; and for a leaf no rule knows.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_gc
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return nn.Dense(4)(x), None
    >>> Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    >>> x = jnp.ones((2, 4))
    >>> rules = optax_gc.rules_for(Stack(), x, None)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), x, None)["params"]
    >>> optax_gc.scanned_layers(rules)(params)
    {'Dense_0': {'bias': True, 'kernel': True}}
  """
  where = "scanned_layers"
  compiled = _compile(rules, where)

  def flag(leaf: tree_lib.Leaf, decision: Decision) -> bool:
    rule = decision.derived  # a stacked bias or norm scale is flagged with its kernels
    if rule is None or not rule.kept:
      return False
    if rule.kept != (0,):
      raise ValueError(
        f"{where}: leaf {leaf.path!r} {leaf.shape} keeps axes {rule.kept} apart "
        f"({rule.how}). PSGD's "
        "scanned_layers treats axis 0, and only it, as the stack of layers. Put the stack at "
        "axis 0: nn.scan(..., variable_axes={'params': 0}), nnx.vmap(..., out_axes=0), or "
        "jnp.moveaxis on the stacked leaves."
      )
    return True

  def flags(tree):
    return _export(tree, compiled, where, flag)

  return flags


def fan_sizes(rules: RulesLike) -> Callable[[Any], Any]:
  """Each contracted leaf's fan-in and fan-out sizes, per layer: for muP-style scaling.

  The sizes are the products of the fan-in and of the fan-out axes of one
  entry of the kept axes: a stack of layers has the sizes of one layer, an
  attention kernel ``(d_model, heads, head_dim)`` a fan-out of
  ``heads * head_dim``.

  Args:
    rules: the rules of :func:`optax_gc.rules_for`.

  Returns:
    A callable of the parameter tree returning a tree of the same structure
    with ``(fan_in, fan_out)`` per contracted leaf and None for every other
    leaf. Map over it with the parameters first:
    ``jax.tree.map(f, params, sizes)`` hands ``f`` each leaf's tuple whole.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_gc
    >>> model = nn.DenseGeneral(4, axis=(-2, -1))  # kernel (heads, head_dim, out)
    >>> x = jnp.ones((2, 2, 3))
    >>> rules = optax_gc.rules_for(model, x)
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    >>> optax_gc.fan_sizes(rules)(params)
    {'bias': None, 'kernel': (6, 4)}
  """
  where = "fan_sizes"
  compiled = _compile(rules, where)

  def sizes(leaf: tree_lib.Leaf, decision: Decision) -> tuple[int, int] | None:
    rule = _contraction(decision)
    if rule is None:
      return None
    size = lambda axes: math.prod(leaf.shape[a] for a in axes)  # noqa: E731
    return size(rule.axes), size(rule.fan_out)

  def fans(tree):
    return _export(tree, compiled, where, sizes)

  return fans
