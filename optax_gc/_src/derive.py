"""``rules_for``: each parameter's fan-in read from the model's own layers.

A reader per framework lists every parameter with the layer that owns it
(``layers.read`` says what that layer defines); then the stack axes (the
difference between the stored leaf and one layer's) are found, and the layer's
fan-in is mapped onto the stored leaf with the stack axes kept.
"""

import collections
import dataclasses
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from optax_gc._src import layers, tree
from optax_gc._src.paths import path_string
from optax_gc._src.rules import LayerRule, LayerRules


@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter as a reader found it."""

  path: str
  owner: tuple  # the owning layer's path, for grouping the leaves of one stack
  group: str  # the collection or variable type: a stack's axis is the same within one
  shape: tuple[int, ...]
  names: tuple | None  # logical axis names of the stored leaf
  layer: layers.Layer | None  # None: no known layer defines it
  rank: int | None = None  # one layer's rank of this leaf
  one_layer: tuple[int, ...] | None = None  # one layer's shape of this leaf, where known
  fan_in: tuple[int, ...] | None = None  # one layer's fan-in axes (None: unchanged)


def _one_layer(module, layer: layers.Layer | None, name: object):
  """``(one layer's shape or None, fan-in)`` of a parameter, from what its layer holds."""
  if layer is None:
    return None, None
  if name == layer.kernel:
    return layer.shape, layer.fan_in
  if layer.kernel is not None and layer.shape is not None and layers.is_bias(name):
    # A bias holds the kernel's axes that are not its fan-in.
    return tuple(n for i, n in enumerate(layer.shape) if i not in layer.fan_in), None
  if layer.kernel is None and hasattr(module, "num_embeddings"):
    return (module.num_embeddings, getattr(module, "features", None)), None
  if layer.kernel is None and isinstance(getattr(module, "num_features", None), int):
    return (module.num_features,), None
  return None, None


def _candidates(p: Param) -> tuple[int, set | None]:
  """``(k, positions)``: how many stack axes, and their possible positions (None: unknown)."""
  if p.rank is None:
    return 0, None if p.fan_in is None else set()
  k = len(p.shape) - p.rank
  if k <= 0:
    return k, {()} if k == 0 else set()
  named = tree.stack_axes(p.names)
  if len(named) == k:
    return k, {named}
  combos = itertools.combinations(range(len(p.shape)), k)
  if p.one_layer is None:
    return k, set(combos)
  return k, {c for c in combos if tuple(np.delete(p.shape, c)) == p.one_layer}


def _stack_root(owner: tuple, stacked: dict, total: dict) -> tuple:
  """The outermost layer above ``owner`` under which every parameter is stacked."""
  for i in range(len(owner) + 1):
    if stacked[owner[:i]] == total[owner[:i]]:
      return owner[:i]
  return owner


def resolve(params: list[Param]) -> LayerRules:
  """Finds the stack axes of every parameter and maps each layer's fan-in onto the leaf.

  All leaves of one stack share its axes (``nn.scan``'s ``variable_axes``,
  ``nnx.vmap``'s ``out_axes``): where one leaf fits several positions (a stack
  as long as a neighbouring axis), the others settle it. Where none does, the
  first position is assumed (Flax's default) and the rule says so.
  """
  found = {p.path: _candidates(p) for p in params}
  stacked: collections.Counter[tuple] = collections.Counter()
  total: collections.Counter[tuple] = collections.Counter()
  for p in params:
    k, positions = found[p.path]
    if positions:
      for i in range(len(p.owner) + 1):
        total[p.owner[:i]] += 1
        stacked[p.owner[:i]] += k > 0
  groups = collections.defaultdict(list)
  for p in params:
    k, positions = found[p.path]
    if k > 0 and positions:
      groups[_stack_root(p.owner, stacked, total), k, p.group].append(positions)
  shared = {key: set.intersection(*sets) for key, sets in groups.items()}
  rules = []
  for p in params:
    k, positions = found[p.path]
    if p.layer is None or positions == set():
      why = "no known layer defines it" if p.layer is None else f"does not fit {p.layer.label}"
      rules.append(LayerRule(p.path, p.shape, None, why, known=False))
      continue
    label, guess, stack = p.layer.label, False, ()
    if k > 0 and positions:
      common = shared[_stack_root(p.owner, stacked, total), k, p.group] & positions
      options = sorted(common or positions)
      stack, guess = options[0], len(options) > 1
      axis = ", ".join(map(str, stack))
      label += f", stacked at axis {axis}" + (" (assumed: nothing in the model tells)" * guess)
    kept = [i for i in range(len(p.shape)) if i not in stack]
    axes = None if p.fan_in is None else tuple(kept[a] for a in p.fan_in)
    rules.append(LayerRule(p.path, p.shape, axes, label, True, guess, p.layer.conv))
  return LayerRules(rules)


def _leaf(x):
  """``(shape, logical names, floating)`` of a stored leaf, boxed or not."""
  (leaf,), _, _ = tree.flatten(x)
  return leaf.shape, leaf.names, jnp.issubdtype(leaf.dtype, jnp.floating)


def _read_linen(model, args, rngs, method, kwargs) -> list[Param]:
  """Traces ``model.init`` abstractly; each layer's own variables show one layer's shapes."""
  import flax.linen as nn

  seen: dict[tuple, tuple] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if module.scope is not None:
      strings = [a for a in (*call_args, *call_kwargs.values()) if isinstance(a, str)]
      own = {
        (col, name): tuple(np.shape(nn.unbox(v)))
        for col, values in module.variables.items()
        for name, v in values.items()
        if not hasattr(v, "items")  # a sublayer's variables
      }
      strings += seen.get(module.scope.path, (None, {}, []))[2]
      seen[module.scope.path] = (module, own, strings)
    return out

  init = functools.partial(model.init, method=method, **kwargs)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(init, jax.random.key(0) if rngs is None else rngs, *args)
  owners = {}
  for scope, (module, own, strings) in seen.items():
    ranks = {name: len(shape) for (col, name), shape in own.items() if col == "params"}
    layer = layers.read(module, ranks, strings)
    for col, name in own:
      owners["/".join((col, *scope, name))] = (scope, layer, own[col, name])
  params = []
  for leaf in tree.flatten(variables)[0]:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    col, name = leaf.path.split("/")[0], leaf.path.rsplit("/", 1)[-1]
    scope, layer, one = owners.get(leaf.path, ((), None, None))
    fan_in = layer.fan_in if layer is not None and name == layer.kernel else None
    rank = None if one is None else len(one)
    params.append(Param(leaf.path, scope, col, leaf.shape, leaf.names, layer, rank, one, fan_in))
  return params


def _read_nnx(model) -> list[Param]:
  """Walks the module graph: every Param and BatchStat with the layer that holds it."""
  from flax import nnx

  nodes = dict(nnx.iter_graph(model))
  params = []
  for path, node in nodes.items():
    if not isinstance(node, (nnx.Param, nnx.BatchStat)):
      continue
    shape, names, floating = _leaf(node)
    if not floating:
      continue
    owner, name = path[:-1], path[-1]
    module = nodes.get(owner)
    layer = None
    if isinstance(module, nnx.Module):
      own = [k for k, v in vars(module).items() if isinstance(v, nnx.Param)]
      layer = layers.read(module, dict.fromkeys(own))
    one, fan_in = _one_layer(module, layer, name)
    rank = layer.rank if layer is not None and name == layer.kernel else None
    rank = len(one) if one is not None else rank
    group = type(node).__name__
    params.append(
      Param("/".join(map(str, path)), owner, group, shape, names, layer, rank, one, fan_in)
    )
  return params


def _read_equinox(model) -> list[Param]:
  """Walks the module tree: weights in PyTorch layout ``(out, in, ...)``."""
  import equinox as eqx

  params = []

  def walk(module, prefix):
    is_sub = lambda x: x is not module and isinstance(x, eqx.Module)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_sub)[0]
    own = [
      kp[0].name
      for kp, x in flat
      if len(kp) == 1 and hasattr(kp[0], "name") and not is_sub(x) and _leaf(x)[2]
    ]
    layer = layers.read(module, dict.fromkeys(own), torch=True)
    for kp, x in flat:
      if is_sub(x):
        walk(x, (*prefix, *kp))
        continue
      shape, names, floating = _leaf(x)
      if not floating:
        continue
      name = kp[0].name if len(kp) == 1 and hasattr(kp[0], "name") else None
      one, fan_in = _one_layer(module, layer, name)
      if one is not None and isinstance(module, eqx.nn.Conv) and name == "bias":
        one = (module.out_channels,) + (1,) * module.num_spatial_dims
      rank = len(one) if one is not None else None
      path = path_string((*prefix, *kp))
      params.append(
        Param(path, prefix, "", shape, names, layer if name else None, rank, one, fan_in)
      )

  walk(model, ())
  return params


def _framework(model) -> str | None:
  for name, module, attr in (
    ("linen", "flax.linen", "Module"),
    ("nnx", "flax.nnx", "Module"),
    ("equinox", "equinox", "Module"),
  ):
    lib = sys.modules.get(module)
    if lib is not None and isinstance(model, getattr(lib, attr)):
      return name
  return None


def rules_for(model, *args, rngs=None, method=None, **kwargs) -> LayerRules:
  """Derives every parameter's fan-in from the model's own layers: rules for ``centralize``.

  A path says little about a layer (a stacked Dense kernel ``(L, in, out)``
  looks like a 1-D conv kernel, an einsum kernel may hold its input axis
  anywhere); the model knows. Each parameter a known layer defines gets a rule
  for its exact path with the fan-in that layer defines; stack axes (``nn.scan``,
  ``nn.vmap``, ``nnx.vmap``, ``nnx.scan``, ``eqx.filter_vmap``) are kept. A
  parameter no known layer defines gets no rule: the preset decides it, and
  :func:`optax_gc.explain` says so.

  - linen ``nn.Module``: ``model.init(rngs, *args, method=method, **kwargs)`` is
    traced with ``jax.eval_shape``; nothing is allocated. ``rngs`` defaults to
    one key, which linen hands to every stream the model asks for.
  - nnx ``nnx.Module`` (real, or from ``nnx.eval_shape``): its module graph.
  - Equinox ``eqx.Module``: its module tree (use ``preset="torch"`` beside it).

  Known layers: Dense/Linear, DenseGeneral/LinearGeneral (``axis``, batch
  axes), Conv/ConvTranspose (``transpose_kernel``)/ConvLocal of any rank and
  group count, Einsum (the kernel's indices missing from the output), the
  attention projections (built from these), Embed and every norm; and a
  layer of your own that holds what those hold (an ``einsum_str``;
  ``features`` and ``axis``; ``in_features_shape`` and ``out_features_shape``).
  The rules read the model; they never change it.

  Args:
    model: a linen, nnx or Equinox module.
    *args: linen only: example inputs for ``init`` (arrays or
      ``jax.ShapeDtypeStruct``).
    rngs: linen only: ``init``'s rngs (a key or a dict of keys).
    method: linen only: the method ``init`` calls.
    **kwargs: linen only: keyword arguments for that method (``train=False``).

  Returns:
    :class:`optax_gc.LayerRules`: pass it as ``rules=`` to ``centralize``,
    ``with_centralization``, ``explain`` or the optimizers. Its rules match the
    leaves of the variables dict, of its ``"params"`` collection, and of
    ``nnx.state(model, nnx.Param)``.

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
    >>> print(rules)
    params/Dense_0/bias (3, 4): unchanged (nn.Dense, stacked at axis 0)
    params/Dense_0/kernel (3, 4, 4): axes (1,) (nn.Dense, stacked at axis 0)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), x, None)
    >>> optax_gc.explain(params, rules)["params/Dense_0/kernel"].axes
    (1,)
  """
  framework = _framework(model)
  if framework is None:
    raise TypeError(
      f"rules_for reads Flax linen, Flax nnx and Equinox modules; got {type(model).__name__}. "
      "For a Haiku model, or parameters without their model, use the presets "
      "(optax_gc.explain(params) shows what they decide) or write rules yourself."
    )
  if framework != "linen" and (args or kwargs or rngs is not None or method is not None):
    raise TypeError(
      f"rules_for reads an {framework} model from the model itself: pass only the model "
      f"(got {len(args)} inputs, {sorted(kwargs)} keywords). Inputs are for linen's init."
    )
  if framework == "linen":
    params = _read_linen(model, args, rngs, method, kwargs)
  elif framework == "nnx":
    params = _read_nnx(model)
  else:
    params = _read_equinox(model)
  return resolve(params)
