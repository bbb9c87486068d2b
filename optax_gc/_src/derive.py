"""``rules_for``: each parameter's axes read from the program the model runs.

Every framework comes down to one JAX function ``fn(params, state, arrays)``:
linen's ``apply`` on the variables its ``init`` makes, an nnx module merged
from its state, an Equinox module combined from its arrays, or the user's own
function. ``jax.make_jaxpr`` of it on abstract values (nothing is allocated)
is walked by :mod:`optax_gc._src.trace`, and each parameter's reading becomes
a :class:`~optax_gc.LayerRule` for its exact path.
"""

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gc._src import trace, tree
from optax_gc._src.rules import LayerRule, LayerRules


@dataclasses.dataclass(frozen=True)
class _Program:
  """The forward pass as ``fn(params, state, arrays)`` and the trees it is traced on.

  ``state`` holds what is not a parameter (batch statistics, caches, RNG
  state); ``state_labels`` says what each of its leaves is to the walk.
  """

  fn: Callable
  params: Any
  state: Any
  state_labels: list[int]


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _split_inputs(args: tuple, kwargs: dict):
  """``(arrays, rebuild)``: the inputs' array leaves are traced, everything else held static."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  arrays = [x for x in leaves if _is_array(x)]

  def rebuild(traced) -> tuple[tuple, dict]:
    it = iter(traced)
    return jax.tree.unflatten(treedef, [next(it) if _is_array(x) else x for x in leaves])

  return arrays, rebuild


def _call(module, method, args, kwargs):
  """Calls a module as linen's ``apply`` does: ``method`` a name, a function, or None."""
  if method is None:
    return module(*args, **kwargs)
  if isinstance(method, str):
    return getattr(module, method)(*args, **kwargs)
  return method(module, *args, **kwargs)


def _labels(state, rng=frozenset()) -> list[int]:
  """What each leaf of ``state`` is to the walk.

  Float state (batch statistics, a power iteration's estimate) changes slowly
  and is not the input: a constant, so a kernel scaled by a norm estimated
  from it is still the kernel. Integer state (a cache index) is data: a row
  looked up by it is a table row. RNG state is nothing: a dropout mask is no
  data.
  """
  labels = []
  for leaf in tree.flatten(state)[0]:
    integer = jnp.issubdtype(leaf.dtype, jnp.integer) or jnp.issubdtype(leaf.dtype, jnp.bool_)
    labels.append(trace.INT | trace.DISCRETE if integer and leaf.path not in rng else 0)
  return labels


def _input_label(dtype) -> int:
  """The model's inputs are data: floats, or integers (token ids); PRNG keys are nothing."""
  if jnp.issubdtype(dtype, jnp.inexact):
    return trace.FLOAT
  if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
    return trace.INT | trace.DISCRETE
  return 0


def _linen(model, arrays, rebuild, rngs, method, mutable=None) -> _Program:
  """linen's ``apply`` on the variables ``init`` makes; ``mutable`` is apply's.

  By default every collection but the parameters is mutable (batch statistics
  in training, a decoding cache); a ``mutable=`` keyword goes to ``apply``
  alone.
  """
  from flax.core import DenyList

  if rngs is None:
    rngs = jax.random.key(0)  # linen hands the params stream's key to every stream
  if mutable is None:
    mutable = DenyList("params")

  def init(arrays):
    args, kwargs = rebuild(arrays)
    kwargs.pop("mutable", None)
    return model.init(rngs, *args, method=method, **kwargs)

  variables = jax.eval_shape(init, arrays)
  params = {k: v for k, v in variables.items() if k == "params"}
  state = {k: v for k, v in variables.items() if k != "params"}
  apply_rngs = rngs if isinstance(rngs, dict) else {"params": rngs}

  def fn(params, state, arrays):
    args, kwargs = rebuild(arrays)
    kwargs = {**kwargs, "mutable": kwargs.get("mutable", mutable)}
    return model.apply({**params, **state}, *args, rngs=apply_rngs, method=method, **kwargs)

  return _Program(fn, params, state, _labels(state))


def _nnx(model, rebuild, method) -> _Program:
  from flax import nnx

  graphdef, params, state = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
  rng = {leaf.path for leaf in tree.flatten(nnx.state(model, nnx.RngState))[0]}

  def fn(params, state, arrays):
    args, kwargs = rebuild(arrays)
    return _call(nnx.merge(graphdef, params, state), method, args, kwargs)

  return _Program(fn, params, state, _labels(state, rng))


def _equinox(model, rebuild, method) -> _Program:
  import equinox as eqx

  def is_param(x) -> bool:
    return (eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)) and jnp.issubdtype(
      x.dtype, jnp.inexact
    )

  params, static = eqx.partition(model, is_param)

  def fn(params, state, arrays):
    del state
    args, kwargs = rebuild(arrays)
    return _call(eqx.combine(params, static), method, args, kwargs)

  return _Program(fn, params, None, [])


def _function(fn, params, rebuild) -> _Program:
  def run(params, state, arrays):
    del state
    args, kwargs = rebuild(arrays)
    return fn(params, *args, **kwargs)

  return _Program(run, params, None, [])


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


# Added to an error raised while tracing an Equinox module's call.
_EQUINOX_HINT = (
  "rules_for traces model(*inputs) as given. An Equinox module usually takes one example: "
  "pass one (optax_gc.rules_for(model, jnp.ones((3,)))), or a batch with "
  "method=lambda m, x: jax.vmap(m)(x). A stateful one (eqx.nn.State) takes its state "
  "after the inputs: optax_gc.rules_for(eqx.nn.inference_mode(model), x, state)."
)


def _trace(program: _Program, arrays: list, what: str, given: int, hint: str | None = None):
  try:
    return jax.make_jaxpr(program.fn)(program.params, program.state, arrays)
  except Exception as e:
    if not isinstance(e, TypeError) or given or "argument" not in str(e):
      if hint:
        e.add_note(hint)
      raise
    raise TypeError(
      f"rules_for traces {what}'s forward pass and needs its inputs ({e}). Pass example "
      "inputs after the model (arrays or jax.ShapeDtypeStruct; a batch of 2 or more), "
      "e.g. optax_gc.rules_for(model, jnp.ones((2, 28, 28, 1))), and keyword arguments "
      "for the call after them (train=False)."
    ) from e


def _rules(program: _Program, closed) -> LayerRules:
  """Walks the traced program and turns each parameter's reading into a rule."""
  params = tree.flatten(program.params)[0]
  state = tree.flatten(program.state)[0]
  n_data = len(closed.jaxpr.invars) - len(params) - len(state)
  ins = [
    trace.Val((trace.View(i, tuple(frozenset({a}) for a in range(len(leaf.shape)))),), trace.PARAM)
    for i, leaf in enumerate(params)
  ]
  ins += [trace.Val(label=label) for label in program.state_labels]
  for v in closed.jaxpr.invars[len(ins) : len(ins) + n_data]:
    ins.append(trace.Val(label=_input_label(v.aval.dtype)))
  walk = trace.Walk(len(params))
  walk.finish(walk.run(closed, ins))
  rules = []
  for i, leaf in enumerate(params):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    reading = trace.read(walk, i, len(leaf.shape))
    rules.append(
      LayerRule(
        leaf.path,
        leaf.shape,
        reading.fan_in or None if reading.kind == "contraction" else None,
        reading.kind,
        reading.how,
        reading.fan_out,
        reading.kept,
        reading.conv,
      )
    )
  for leaf in state:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      rules.append(LayerRule(leaf.path, leaf.shape, None, "untouched", "not a parameter"))
  return LayerRules(rules)


def rules_for(model, *inputs, method=None, rngs=None, **kwargs) -> LayerRules:
  """Reads every parameter's fan-in from the model's computation: rules for ``centralize``.

  A path says little about a layer and a layer's class little about its
  kernel (a scanned Dense kernel ``(L, in, out)`` looks like a 1-D conv kernel;
  a custom layer may store its kernel ``(out, in)`` and transpose it when
  called). The computation knows: every weight reaches its neurons through a
  contraction, whose dimension numbers say which of the weight's axes are
  summed against the input. ``rules_for`` traces the forward pass with
  ``jax.make_jaxpr`` on abstract values (nothing is allocated) and follows each
  parameter through casts, transposes, reshapes, broadcasts, slices and
  arithmetic on parameters alone, into every sub-program (``jit``, ``remat``,
  custom derivatives, ``cond``, ``while``, ``scan``, ``shard_map``), to the
  operations that use it:

  - ``dot_general``: its contracting dimensions are the fan-in, its batch
    dimensions kept; a convolution: the kernel's input-feature and spatial
    dimensions; ``ragged_dot``: the expert axis kept; a product with data
    summed over a parameter axis (a convolution written by hand) likewise;
  - a slice of one entry (a scan over stacked layers, an index by a loop
    counter) makes a stack axis, kept, unless the contractions of its entries
    are added into the same outputs (a convolution's taps as slices), which
    sums it;
  - a lookup of rows by data (a gather at token ids, a contraction against a
    one-hot of ids) makes a table: unchanged;
  - anything else (adding a bias, scaling by a norm's scale) is no contraction:
    unchanged.

  A parameter whose contractions disagree, one reached only through an opaque
  kernel (a Pallas call) or only contracted with constants or other
  parameters, and one the forward pass never reads is left unchanged with the
  reason; :func:`optax_gc.explain` shows it and ``strict=True`` lists it. Never
  a guess.

  - linen ``nn.Module``: ``model.init(rngs, *inputs, method=method, **kwargs)``
    is traced with ``jax.eval_shape`` for the variables, then
    ``model.apply`` on them with every collection but the parameters mutable
    (or none, where that fails, as ``nn.map_variables(..., init=True)`` does;
    a ``mutable=`` keyword goes to ``apply`` alone). ``rngs`` (a key or a
    dict of keys) defaults to one key, which linen hands to every stream.
  - nnx ``nnx.Module`` (real, or from ``nnx.eval_shape``): the module merged
    from its state and called on ``inputs``.
  - Equinox ``eqx.Module``: ``model(*inputs, **kwargs)``.
  - Any JAX function (a Haiku ``apply``, plain JAX):
    ``rules_for(fn, params, *inputs)`` traces ``fn(params, *inputs, **kwargs)``
    and gives rules for the leaves of ``params``.

  Args:
    model: a linen, nnx or Equinox module, or a function of ``(params, *inputs)``.
    *inputs: example inputs of the forward pass: arrays or
      ``jax.ShapeDtypeStruct`` (a batch of 2 or more where the model takes a
      batch; one example for an Equinox module that takes one); other values
      (flags, None) are passed as they are. For a function, its params come
      first.
    method: the method to call, as linen's ``apply`` takes it: a name, or a
      function ``f(model, *inputs)``; None calls the model.
    rngs: linen only: the rngs of ``init`` and ``apply``.
    **kwargs: keyword arguments of the call (``train=False``).

  Returns:
    :class:`optax_gc.LayerRules`, one rule per floating leaf: pass it as
    ``rules=`` to ``centralize``, ``with_centralization``, ``explain`` or the
    optimizers. The rules match the leaves of a linen variables dict and of its
    ``"params"`` collection, of ``nnx.state(model, nnx.Param)``, of
    ``eqx.filter(model, eqx.is_inexact_array)``, and of a function's params.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_gc
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return nn.Dense(4)(x), None
    >>> Stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
    >>> x = jnp.ones((2, 4))
    >>> rules = optax_gc.rules_for(Stack(), x, None)
    >>> print(rules)
    params/Dense_0/bias (4, 3): unchanged (no contraction: add, stack axis 1)
    params/Dense_0/kernel (4, 3, 4): axes (0,) (dot_general in scan body, stack axis 1)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), x, None)
    >>> optax_gc.explain(params, rules)["params/Dense_0/kernel"].axes
    (0,)
  """
  framework = _framework(model)
  if framework is None and not callable(model):
    hint = ""
    if hasattr(model, "apply") and hasattr(model, "init"):  # a Haiku Transformed
      hint = (
        " For a Haiku model, pass its apply and params: rules_for(model.apply, params, None, x)."
      )
    raise TypeError(
      f"rules_for reads Flax linen, Flax nnx and Equinox modules, and functions of "
      f"(params, *inputs); got {type(model).__name__}.{hint}"
    )
  if framework != "linen" and rngs is not None:
    raise TypeError(
      f"rngs= is linen's (init and apply); a {framework or 'function'} model gets its "
      "randomness from its own state or inputs."
    )
  if framework is None:
    if not inputs:
      raise TypeError(
        "rules_for(fn, params, *inputs): give the parameters the function takes first, "
        "then its example inputs, e.g. optax_gc.rules_for(model.apply, params, None, x)."
      )
    params, *inputs_list = inputs
    arrays, rebuild = _split_inputs(tuple(inputs_list), kwargs)
    program = _function(model, params, rebuild)
    given = len(inputs_list)
  else:
    arrays, rebuild = _split_inputs(inputs, kwargs)
    given = len(inputs)
    if framework == "linen":
      program = _linen(model, arrays, rebuild, rngs, method)
    elif framework == "nnx":
      program = _nnx(model, rebuild, method)
    else:
      program = _equinox(model, rebuild, method)
  note = _EQUINOX_HINT if framework == "equinox" else None
  try:
    closed = _trace(program, arrays, type(model).__name__, given, note)
  except Exception as error:
    if framework != "linen" or "mutable" in kwargs:
      raise
    # Some transforms (nn.map_variables(..., init=True)) take any mutable
    # collection for an init: apply as a user does, with nothing mutable.
    program = _linen(model, arrays, rebuild, rngs, method, mutable=False)
    try:
      closed = _trace(program, arrays, type(model).__name__, given)
    except Exception:
      raise error from None
  return _rules(program, closed)
