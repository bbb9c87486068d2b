"""Each parameter's axes read from the program: a walk over the jaxpr of the model's forward pass.

Every weight a neuron uses reaches it through a contraction, and the
contraction's dimension numbers say which of the weight's axes are summed
against the input (the fan-in), which reach the output (the fan-out) and which
are kept apart (batch, expert and stack axes). The walk follows each parameter
from its input variable through every operation that only moves, casts, slices
or combines it with other parameters (no data in it), and into every
sub-program, and records what each use says:

- a contraction with data (``dot_general``, a convolution, ``ragged_dot``), or
  a product with data summed over one of the parameter's axes (a convolution
  written as a sum of shifted products): the fan-in;
- a slice of one entry: a stack axis, kept, unless the contractions of
  several entries are added into the same outputs and none is fed by
  another's (``sum(x[k : k + t] @ w[k] for k)``, or a scan adding each tap to
  its carry): then the entries are summed, the fan-in;
- a lookup by data (a gather or dynamic slice at data-dependent indices, or a
  contraction against a value computed from integer data alone, such as a
  one-hot of token ids): a table;
- a contraction with constants or other parameters only: nothing (a learned
  token broadcast over a batch and projected is the projection's input);
- an opaque kernel (a Pallas call, a linear-algebra routine) that takes the
  parameter with data, or whose result multiplies data: nothing can be read.
  What it makes of the parameter alone and adds to data (a log-determinant
  added to a log-likelihood) decides nothing.

Values are labelled by what they depend on (parameters, integer data, float
data), so that a parameter stops being followed where it meets data: adding a
bias or scaling by a norm's scale is not a contraction. Uses whose result
reaches the output only through ``stop_gradient`` or integers decide only when
there are no others.
"""

import bisect
import dataclasses
import functools
import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import TypeVar

import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from optax_gc._src.rules import Kind

# What a value depends on, as bits: float data is data; integer data with a
# parameter in it (an embedding row looked up by a token id) is data too.
# DISCRETE marks a value computed from integers alone (a one-hot of positions).
PARAM, INT, FLOAT, DISCRETE = 1, 2, 4, 8


def is_data(label: int) -> bool:
  return bool(label & FLOAT or (label & INT and label & PARAM))


def is_int_data(label: int) -> bool:
  return not is_data(label) and bool(label & INT)


def is_discrete(label: int) -> bool:
  """Integer data, or a value computed from integers alone: what a one-hot is made of."""
  return not is_data(label) and bool(label & (INT | DISCRETE))


@dataclasses.dataclass(frozen=True)
class View:
  """A value computed from one parameter: for each of its axes, the parameter axes it spans.

  An axis that spans no parameter axis is new (a broadcast). ``stack`` holds
  ``(axis, entry)`` for each parameter axis taken one entry at a time (a scan,
  an index by a loop counter or a constant), ``entry`` telling which one;
  ``dead`` marks a view under ``stop_gradient``.
  """

  param: int
  axes: tuple[frozenset[int], ...]
  stack: frozenset[tuple[int, object]] = frozenset()
  dead: bool = False

  @property
  def stack_axes(self) -> frozenset[int]:
    return frozenset(a for a, _ in self.stack)

  def take(self, spans, entry) -> frozenset[tuple[int, object]]:
    """``stack`` with the parameter axes in ``spans`` taken at ``entry``."""
    return self.stack | {(a, entry) for a in spans}


@dataclasses.dataclass(frozen=True)
class Product:
  """Products of a parameter with data, added together: a contraction written by hand.

  ``view`` is the parameter's view in the product (its stack left out), and
  ``terms`` the stack of each term: an axis whose entries differ between terms
  is summed against the data.
  """

  view: View
  terms: frozenset[frozenset[tuple[int, object]]]

  def summed(self) -> frozenset[int]:
    """The parameter axes taken at different entries in different terms."""
    entries: dict[int, set] = {}
    for term in self.terms:
      for axis, entry in term:
        entries.setdefault(axis, set()).add(entry)
    return frozenset(a for a, seen in entries.items() if len(seen) > 1)

  def stack_axes(self) -> frozenset[int]:
    return frozenset(a for term in self.terms for a, _ in term)


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a parameter, as the program states it."""

  kind: str  # "contraction", "table", "constant", "input", "opaque", "mixed"
  op: str
  where: tuple[str, ...] = ()
  fan_in: frozenset[int] = frozenset()
  fan_out: frozenset[int] = frozenset()
  batch: frozenset[int] = frozenset()
  group: frozenset[int] = frozenset()
  stack: frozenset[int] = frozenset()
  conv: bool = False
  live: bool = True
  # The stack entries the parameter was taken at, and what the data it met
  # depends on (``Val.after``): a contraction of another of its entries (a layer
  # of a stack applied after the one before it), or a loop's carry.
  entries: frozenset[tuple[int, object]] = frozenset()
  depends: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Val:
  """What the walk knows of one variable: the parameter views it is, and what it depends on."""

  views: tuple[View, ...] = ()
  label: int = 0
  products: tuple[Product, ...] = ()
  # Axes along which a value free of data is constant, because it was broadcast
  # there: a learned token broadcast over the batch. Such a value is an input.
  replicated: frozenset[int] = frozenset()
  # Outputs of contractions of stack entries, as ``(param, use)``, that this
  # value is a plain sum of (added, negated, cast, moved): entries whose outputs
  # are added into the same neurons are summed, as a convolution's taps are.
  sums: frozenset[tuple[int, int]] = frozenset()
  # The parameters taken at stack entries whose contractions this value depends on.
  after: frozenset[int] = frozenset()
  # ``(param, op)``: a value free of data computed by an opaque kernel from the
  # parameter (a log-determinant). It decides nothing until it multiplies data.
  opaque: frozenset[tuple[int, str]] = frozenset()


EMPTY = Val()
_NOTHING: frozenset[int] = frozenset()

_IDENTITY = frozenset({
  "convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
  "mesh_cast", "reshard", "pvary", "pbroadcast", "optimization_barrier", "device_put", "rev",
  "stop_gradient",
})  # fmt: skip
_ELEMENTWISE = frozenset({
  "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1",
  "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
  "acosh", "atanh", "abs", "sign", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square",
  "max", "min", "select_n", "clamp", "erf", "erfc", "erf_inv", "lgamma", "digamma", "atan2",
  "rem", "floor", "ceil", "round", "nextafter", "is_finite", "real", "imag", "conj",
})  # fmt: skip
_SHAPE = frozenset({
  "split", "transpose", "reshape", "squeeze", "broadcast_in_dim", "slice", "concatenate", "pad",
  "stack", "unstack", "tile", "all_gather", "all_gather_invariant",
})  # fmt: skip
# Operations that consume a value without contracting it: a parameter's view ends there.
_ENDS = frozenset({
  "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
  "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
  "sort", "top_k", "approx_top_k", "eq", "ne", "lt", "le", "gt", "ge", "not", "and", "or",
  "xor", "dynamic_update_slice", "scatter", "scatter-add", "scatter_add", "scatter_mul",
  "scatter_min", "scatter_max", "reduce_window_sum", "reduce_window_max", "reduce_window_min",
  "reduce_window", "select_and_scatter_add", "bitcast_convert_type", "debug_callback",
  "iota", "random_bits", "random_wrap", "random_unwrap", "random_seed", "random_fold_in",
  "random_split", "threefry2x32",
})  # fmt: skip
_CONTRACTIONS = ("dot_general", "conv_general_dilated", "ragged_dot_general", "ragged_dot")
# Kernels whose sub-program (if any) is not a plain call: nothing in them can be read.
_OPAQUE = ("pallas", "ffi", "custom_call", "kernel_call", "mosaic", "callback")
# Sub-programs named in explain ("dot_general in scan body"); calls (jit,
# remat, custom derivatives) are not, they do not change what a use means.
_SCAN, _WHILE, _COND, _SHARD_MAP = "scan body", "while body", "cond branch", "shard_map"


@functools.cache
def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


@functools.cache
def _is_int(dtype) -> bool:
  if dtype is None:
    return False
  return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _floating(v) -> bool:
  """Whether a jaxpr variable (not a literal) holds floats: what a gradient can flow through."""
  dtype = getattr(v.aval, "dtype", None)
  return not isinstance(v, Literal) and dtype is not None and _is_float(dtype)


T = TypeVar("T")


def _union(sets: Iterable[frozenset[T]]) -> frozenset[T]:
  return frozenset().union(*sets)


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _reshape_axes(axes, src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[frozenset[int], ...]:
  """The parameter axes each axis of a reshaped value spans.

  Axes are grouped where the running products of both shapes meet: a split or
  a merge maps whole groups, so each new axis spans the parameter axes of its
  group. A size-1 axis is paired with a size-1 axis of the other shape at the
  same place where there is one; a size-1 axis removed otherwise joins the
  next group (a 1x1 conv kernel reshaped to a matrix keeps its spatial axes in
  the fan-in), and a size-1 axis added otherwise spans nothing.
  """
  if 0 in src or 0 in dst:
    return (_NOTHING,) * len(dst)
  cs = list(itertools.accumulate(src, operator.mul, initial=1))
  cd = list(itertools.accumulate(dst, operator.mul, initial=1))
  bounds = sorted(set(cs) & set(cd))
  last = max(len(bounds) - 2, 0)
  ones_src: dict[int, list[int]] = {}
  for a, n in enumerate(src):
    if n == 1:
      ones_src.setdefault(cs[a], []).append(a)
  out: list[frozenset[int] | None] = [None] * len(dst)
  for b, n in enumerate(dst):
    if n == 1:
      paired = ones_src.get(cd[b])
      out[b] = axes[paired.pop(0)] if paired else _NOTHING
  spans: dict[int, frozenset[int]] = {}
  unpaired = {a for left in ones_src.values() for a in left}
  for a in range(len(src)):
    if src[a] != 1 or a in unpaired:
      g = min(bisect.bisect_right(bounds, cs[a]) - 1, last)
      spans[g] = spans.get(g, _NOTHING) | axes[a]
  for b in range(len(dst)):
    if out[b] is None:
      out[b] = spans.get(min(bisect.bisect_right(bounds, cd[b]) - 1, last), _NOTHING)
  return tuple(a for a in out if a is not None)


def _sub_jaxprs(eqn) -> list:
  return [p for p in eqn.params.values() if isinstance(p, (ClosedJaxpr, Jaxpr))]


def _open(jaxpr) -> Jaxpr:
  """The open jaxpr of a closed or open one: its constants are constants to the walk."""
  return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


class Walk:
  """One walk over a program: the uses of each parameter, and what every value depends on."""

  def __init__(self, num_params: int):
    self.uses: list[list[Use]] = [[] for _ in range(num_params)]
    self.ends: list[set[str]] = [set() for _ in range(num_params)]
    self.stacked: list[set[int]] = [set() for _ in range(num_params)]  # where views ended
    self.summed: list[set[int]] = [set() for _ in range(num_params)]  # stack axes summed
    self.carries = itertools.count(1)  # -n marks a loop's carry in Val.sums and Val.after
    self.read = [False] * num_params
    self.recording = True
    self.where: tuple[str, ...] = ()

  # -- recording ------------------------------------------------------------

  def _use(self, param: int, use: Use) -> None:
    if self.recording:
      self.uses[param].append(use)

  def _end(self, vals: Sequence[Val], op: str) -> None:
    """The views in ``vals`` go no further: note where, for the reason ``explain`` gives."""
    if self.recording:
      for val in vals:
        for view in val.views:
          self.ends[view.param].add(op)
          self.stacked[view.param] |= view.stack_axes

  def _settle(self, product: Product, summed: frozenset[int], kept: Sequence[int], live: bool):
    """A product is summed over ``summed`` (and over its terms): record the contraction."""
    view = product.view
    fan_in = summed | product.summed()
    if not fan_in:  # scaled by the parameter, never summed over its axes: a norm's scale
      if self.recording:
        self.ends[view.param].add("mul")
        self.stacked[view.param] |= product.stack_axes()
      return
    fan_out = _union(view.axes[a] for a in kept)
    stack = product.stack_axes() - fan_in
    kind = "mixed" if fan_in & (fan_out | stack) else "contraction"
    self._use(
      view.param, Use(kind, "sum of products", self.where, fan_in, fan_out, stack=stack, live=live)
    )

  # -- the walk -------------------------------------------------------------

  def run(self, jaxpr, ins: Sequence[Val], live_out: Sequence[bool] | None = None) -> list[Val]:
    """Walks ``jaxpr`` (closed or open) given what its inputs are; returns its outputs'."""
    jaxpr = _open(jaxpr)
    env: dict = dict(zip(jaxpr.invars, ins, strict=True))
    if live_out is None:
      live_out = [True] * len(jaxpr.outvars)
    live = self._live(jaxpr, live_out)

    def read(v) -> Val:
      return EMPTY if isinstance(v, Literal) else env.get(v, EMPTY)

    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      if any(val.views or val.products or val.replicated for val in vals) or (
        # a one-hot made inside a jitted helper (jax.nn.one_hot): walk in for its label
        any(val.label & DISCRETE for val in vals) and _sub_jaxprs(eqn)
      ):
        for val in vals:
          for view in val.views:
            self.read[view.param] = True
        eqn_live = eqn.primitive.name != "stop_gradient" and any(v in live for v in eqn.outvars)
        outs = self._eqn(eqn, vals, eqn_live, live)
        self._drop_products(vals, outs, eqn_live)
      else:
        outs = self._plain(eqn, vals)
      if (
        eqn.primitive.name in _REPLICATING
        and not all(is_data(o.label) for o in outs)
        and not any(o.replicated for o in outs)
      ):
        outs = [
          dataclasses.replace(o, replicated=r) if r and not is_data(o.label) else o
          for o, r in zip(outs, _replicated(eqn, vals), strict=True)
        ]
      outs = self._flow(eqn, vals, outs)
      env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]

  def _flow(self, eqn, vals: Sequence[Val], outs: list[Val]) -> list[Val]:
    """Carries ``sums`` through sums and moves and ``after`` through everything."""
    name = eqn.primitive.name
    after = _union(val.after for val in vals)
    if name in _CONTRACTIONS:
      after |= {view.param for val in vals for view in val.views if view.stack}
    if name in _SUMS_OF_OUTPUTS and self.recording:
      self._summed_entries(vals)
    if name in _SUMS_OF_OUTPUTS or name in _MOVES:
      sums = _union(val.sums for val in vals)
      outs = [dataclasses.replace(o, sums=o.sums | sums) for o in outs]
    elif not (name in _CONTRACTIONS or _sub_jaxprs(eqn)):
      outs = [dataclasses.replace(o, sums=frozenset()) if o.sums else o for o in outs]
    opaque = _union(val.opaque for val in vals)
    if opaque:
      multiplies = name in ("mul", "div") or name in _CONTRACTIONS
      if any(is_data(val.label) for val in vals) and (
        multiplies or (name not in _KNOWN and not _sub_jaxprs(eqn))
      ):
        self._opaque_uses(opaque)  # expm(a) @ x: a's fan-in cannot be read
      # An opaque value added to data (a log-determinant to a loss) is done with.
      outs = [
        o if is_data(o.label) else dataclasses.replace(o, opaque=o.opaque | opaque) for o in outs
      ]
    if not after:
      return outs
    return [dataclasses.replace(o, after=o.after | after) for o in outs]

  def _summed_entries(self, vals: Sequence[Val]) -> None:
    """Outputs of a parameter's entries added together: those entries' axes are summed.

    ``x[k : k + t] @ w[k]`` added over ``k`` is a convolution whose taps are
    ``w``'s axis 0: its fan-in. Entries applied one after the other (a layer
    of a stack fed by the one before) are a stack, whatever is added.
    """
    for i, left in enumerate(vals):
      for right in vals[i + 1 :]:
        for p, u in left.sums:
          for q, w in right.sums:
            if p != q or p < 0 or u == w:  # p < 0: a loop's carry (_loop)
              continue
            a, b = self.uses[p][u], self.uses[p][w]
            if p in a.depends or p in b.depends or a.fan_in != b.fan_in:
              continue
            for axis in {x for x, _ in a.entries} & {x for x, _ in b.entries}:
              if {e for x, e in a.entries if x == axis} != {e for x, e in b.entries if x == axis}:
                self.summed[p].add(axis)

  def finish(self, outs: Sequence[Val]) -> None:
    """The program's outputs: products still open are settled here."""
    self._drop_products(outs, (), True)

  def _drop_products(self, vals: Sequence[Val], outs: Sequence[Val], live: bool) -> None:
    going_on = {p.view for out in outs for p in out.products}
    for val in vals:
      for product in val.products:
        if product.view not in going_on:
          self._settle(product, _NOTHING, range(len(product.view.axes)), live)

  def _live(self, jaxpr: Jaxpr, live_out: Sequence[bool]) -> set:
    """The float variables whose value reaches a live output other than through stop_gradient."""
    live = {v for v, on in zip(jaxpr.outvars, live_out, strict=True) if on and _floating(v)}
    for eqn in reversed(jaxpr.eqns):
      if eqn.primitive.name == "stop_gradient" or not any(v in live for v in eqn.outvars):
        continue
      live.update(v for v in eqn.invars if _floating(v))
    return live

  def _labels(self, eqn, vals: Sequence[Val]) -> list[int]:
    """What each output depends on: everything its inputs depend on, cut by its dtype."""
    label = 0
    for val in vals:
      label |= val.label
    # Integers, or values made of integers alone, with constants at most (a
    # one-hot scaled by 0.5 is still a one-hot).
    integral = [
      bool(val.label & DISCRETE) or _is_int(getattr(v.aval, "dtype", None))
      for v, val in zip(eqn.invars, vals, strict=True)
    ]
    discrete = (
      not label & (PARAM | FLOAT)
      and eqn.primitive.name in _INTEGRAL
      and any(integral)
      and all(i or not val.label for i, val in zip(integral, vals, strict=True))
    )
    label = (label & ~DISCRETE) | (DISCRETE if discrete else 0)
    if label & INT and not discrete:  # sin(t * freqs) of an integer t: float data now
      label = (label & ~INT) | FLOAT
    out = []
    for v in eqn.outvars:
      dtype = getattr(v.aval, "dtype", None)
      if dtype is None or not (_is_float(dtype) or _is_int(dtype)):  # keys, tokens
        out.append(0)
      elif _is_int(dtype):
        out.append((INT if label & (INT | FLOAT) else 0) | DISCRETE)
      else:
        out.append(label)
    return out

  def _plain(self, eqn, vals: Sequence[Val]) -> list[Val]:
    """An equation no parameter view reaches: only what its outputs depend on."""
    return [Val(label=label) for label in self._labels(eqn, vals)]

  def _opaque(self, eqn, vals: Sequence[Val]) -> list[Val]:
    """A kernel the walk cannot read: a use of each parameter in it, once it meets data."""
    name = eqn.primitive.name
    found = {(view.param, name) for val in vals for view in val.views}
    outs = self._plain(eqn, vals)
    if any(is_data(val.label) or is_int_data(val.label) for val in vals):
      self._opaque_uses(found)
      return outs
    return [dataclasses.replace(o, opaque=o.opaque | found) for o in outs]

  def _opaque_uses(self, found) -> None:
    for param, op in found:
      self._use(param, Use("opaque", op, self.where))

  def _eqn(self, eqn, vals: list[Val], live: bool, live_vars: set) -> list[Val]:
    name = eqn.primitive.name
    if name in _CONTRACTIONS:
      sums = self._contraction(eqn, vals, live)
      return [dataclasses.replace(o, sums=sums) for o in self._plain(eqn, vals)]
    if name == "scan":
      return self._scan(eqn, vals)
    if name == "while":
      return self._while(eqn, vals)
    if name == "cond":
      return self._cond(eqn, vals, live_vars)
    if any(word in name for word in _OPAQUE):
      return self._opaque(eqn, vals)
    if name == "xla_pmap":
      return self._pmap(eqn, vals, live_vars)
    subs = _sub_jaxprs(eqn)
    if subs:
      return self._call(eqn, vals, subs, live_vars)
    if name not in _KNOWN:  # linear algebra, FFTs, primitives of other libraries
      return self._opaque(eqn, vals)
    labels = self._labels(eqn, vals)
    if name in ("gather", "dynamic_slice"):
      return self._lookup(eqn, vals, labels, live)
    if name in _SUMS and any(val.products for val in vals):
      return self._sum(eqn, vals, labels, live)
    if name in _IDENTITY and vals[0].products:
      return [Val(vals[0].views, labels[0], vals[0].products)]
    if name == "mul" and self._starts_product(eqn, vals, labels):
      return [Val(label=labels[0], products=self._product(eqn, vals))]
    if any(is_data(label) or is_int_data(label) for label in labels):
      self._end(vals, name)  # the parameter met data: not a contraction
      return [Val(label=label) for label in labels]
    views = self._follow(eqn, vals)
    if views is None:
      self._end(vals, name)
      return [Val(label=label) for label in labels]
    return [Val(v, label) for v, label in zip(views, labels, strict=True)]

  # -- following a parameter ------------------------------------------------

  def _follow(self, eqn, vals: list[Val]) -> list[tuple[View, ...]] | None:
    """The views of each output of an operation that moves, casts or combines parameters."""
    name, p = eqn.primitive.name, eqn.params
    if name in _IDENTITY:
      dead = name == "stop_gradient"
      return [
        tuple(dataclasses.replace(view, dead=view.dead or dead) for view in val.views)
        for val in vals[: len(eqn.outvars)]
      ]
    if name in _ELEMENTWISE:
      return [self._elementwise(eqn, vals)]
    if name == "split":
      return [vals[0].views] * len(eqn.outvars)
    if name == "unstack":
      axis = p["axis"]
      return [
        tuple(
          dataclasses.replace(
            view,
            axes=view.axes[:axis] + view.axes[axis + 1 :],
            stack=view.take(view.axes[axis], k),
          )
          for view in vals[0].views
        )
        for k in range(len(eqn.outvars))
      ]
    (val, *_), out = vals, _shape(eqn.outvars[0])
    src = _shape(eqn.invars[0])
    if name == "transpose":
      return [_map(val, lambda axes: tuple(axes[i] for i in p["permutation"]))]
    if name == "reshape":
      order = p.get("dimensions") or tuple(range(len(src)))  # a transpose first
      moved = tuple(src[i] for i in order)
      return [_map(val, lambda axes: _reshape_axes(tuple(axes[i] for i in order), moved, out))]
    if name == "squeeze":
      dims = {d % len(src) for d in p["dimensions"]}
      return [
        tuple(
          dataclasses.replace(
            view,
            axes=tuple(a for i, a in enumerate(view.axes) if i not in dims),
            stack=view.take(_union(view.axes[i] for i in dims), 0),
          )
          for view in val.views
        )
      ]
    if name == "broadcast_in_dim":

      def broadcast(axes):
        new = [_NOTHING] * len(out)
        for i, d in enumerate(p["broadcast_dimensions"]):
          if src[i] == out[d]:
            new[d] = axes[i]
        return tuple(new)

      return [_map(val, broadcast)]
    if name == "slice":
      return [_sliced(val, src, out, p["start_indices"])]
    if name == "tile":  # a repeated axis keeps its span; a size-1 one repeated is new
      return [
        _map(val, lambda axes: tuple(a if src[i] > 1 else _NOTHING for i, a in enumerate(axes)))
      ]
    if name in ("all_gather", "all_gather_invariant"):  # a sharded parameter gathered whole
      if p["tiled"]:
        return [val.views]
      d = p["all_gather_dimension"]
      return [_map(val, lambda axes: (*axes[:d], _NOTHING, *axes[d:]))]
    if name in ("concatenate", "pad"):
      return [_dedupe(view for v in vals for view in v.views)]
    if name == "stack":
      axis = p["axis"]
      return [
        _dedupe(
          dataclasses.replace(view, axes=(*view.axes[:axis], _NOTHING, *view.axes[axis:]))
          for v in vals
          for view in v.views
        )
      ]
    return None

  @staticmethod
  def _elementwise(eqn, vals: list[Val]) -> tuple[View, ...]:
    """Arithmetic on parameters alone (weight norm, standardisation): views of the result's shape.

    An operand broadcast to a larger result, or one already broadcast over an
    axis of its own (a learned token over a batch), is not the weight of what
    follows: its view ends here.
    """
    out = _shape(eqn.outvars[0])
    views = []
    for v, val in zip(eqn.invars, vals, strict=True):
      shape = _shape(v)
      if shape != out:
        continue
      views += [
        view
        for view in val.views
        if all(span or n == 1 for span, n in zip(view.axes, shape, strict=True))
      ]
    return _dedupe(views)

  def _lookup(self, eqn, vals: list[Val], labels: list[int], live: bool) -> list[Val]:
    """A gather or dynamic slice: a lookup by data makes a table, by a constant a stack axis."""
    val, index = vals[0], vals[1:]
    src, out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    if any(is_data(i.label) or is_int_data(i.label) for i in index):
      for view in val.views:
        self._use(view.param, Use("table", eqn.primitive.name, self.where, live=live))
      return [Val(label=label) for label in labels]
    if eqn.primitive.name == "dynamic_slice":
      starts = tuple(_entry_of(v) for v in eqn.invars[1:])
      return [Val(_sliced(val, src, out, starts), labels[0])]
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    collapsed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    kept = [a for a in range(len(src)) if a not in collapsed]
    batch_dims = [d for d in range(len(out)) if d not in dn.offset_dims]
    single = all(out[d] == 1 for d in batch_dims)
    entry = _entry_of(eqn.invars[1])
    views = []
    for view in val.views:
      axes = [_NOTHING] * len(out)
      stack = view.stack
      for a, d in zip(kept, dn.offset_dims, strict=True):
        if sizes[a] == 1 and src[a] > 1:
          stack |= {(s, (entry, a)) for s in view.axes[a]}
        else:
          axes[d] = view.axes[a]
      spanned = _union(view.axes[a] for a in collapsed)
      if single:
        stack |= {(s, (entry, "collapsed")) for s in spanned}
      else:
        for d in batch_dims:
          axes[d] = spanned
      views.append(dataclasses.replace(view, axes=tuple(axes), stack=stack))
    return [Val(tuple(views), labels[0])]

  # -- contractions written by hand -----------------------------------------

  @staticmethod
  def _starts_product(eqn, vals: list[Val], labels: list[int]) -> bool:
    """``x * w``: a parameter view times data (no parameter in the data), same rank."""
    if len(vals) != 2 or not is_data(labels[0]):
      return False
    mine, other = (vals[0], vals[1]) if vals[0].views else (vals[1], vals[0])
    if mine.products:
      return False
    rank = len(_shape(eqn.outvars[0]))
    return (
      bool(mine.views)
      and not other.views
      and is_data(other.label)
      and all(len(_shape(v)) == rank for v in eqn.invars)
    )

  @staticmethod
  def _product(eqn, vals: list[Val]) -> tuple[Product, ...]:
    out = _shape(eqn.outvars[0])
    products = []
    for v, val in zip(eqn.invars, vals, strict=True):
      shape = _shape(v)
      for view in val.views:
        axes = tuple(a if shape[i] == out[i] else _NOTHING for i, a in enumerate(view.axes))
        bare = dataclasses.replace(view, axes=axes, stack=frozenset())
        products.append(Product(bare, frozenset({view.stack})))
    return tuple(products)

  def _sum(self, eqn, vals: list[Val], labels: list[int], live: bool) -> list[Val]:
    """A ``reduce_sum`` or an addition of products: the sum of a contraction written by hand.

    ``reduce_sum`` over axes a parameter spans contracts them. Products of one
    parameter added together (``x[t] * w[0] + x[t - 1] * w[1]``) stay one
    product whose terms are told apart by their stack entries; anything else
    added to it (activations, a bias) ends it.
    """
    if eqn.primitive.name == "reduce_sum":
      (val,) = vals
      reduced = set(eqn.params["axes"])
      for product in val.products:
        summed = _union(product.view.axes[a] for a in reduced)
        kept = [a for a in range(len(product.view.axes)) if a not in reduced]
        self._settle(product, summed, kept, live)
      return [Val(label=labels[0])]
    terms = [val for val in vals if val.products]
    rest = [val for val in vals if not val.products]
    out = _shape(eqn.outvars[0])
    self._end(rest, eqn.primitive.name)  # a bias the products are added to
    if any(is_data(val.label) or is_int_data(val.label) for val in rest) or any(
      len(_shape(v)) != len(out) for v, val in zip(eqn.invars, vals, strict=True) if val.products
    ):
      return [Val(label=labels[0])]
    merged: dict[View, Product] = {}
    for val in terms:
      for product in val.products:
        if product.view in merged:
          product = Product(product.view, merged[product.view].terms | product.terms)
        merged[product.view] = product
    return [Val(label=labels[0], products=tuple(merged.values()))]

  # -- contractions ---------------------------------------------------------

  def _contraction(self, eqn, vals: list[Val], live: bool) -> frozenset[tuple[int, int]]:
    """Records each parameter view's use; returns the ``sums`` of the output."""
    name, p = eqn.primitive.name, eqn.params
    sums = set()
    sides = [_dims(name, p, side, len(_shape(eqn.invars[side]))) for side in (0, 1)]
    for side in (0, 1):
      val, other = vals[side], vals[1 - side]
      if not val.views:
        continue
      contract, batch, group, free, conv = sides[side]
      if name == "conv_general_dilated" and side == 0:
        kind = "input"  # a parameter convolved by data: the data is the kernel
      elif is_data(other.label):
        kind = "contraction"
      elif is_discrete(other.label):
        kind = "table"  # against a one-hot of ids or positions
      elif other.replicated & set(sides[1 - side][3]) and not val.replicated & set(free):
        kind = "contraction"  # against a learned token broadcast over a batch
      elif val.replicated & set(free):
        kind = "input"
      else:
        kind = "constant"
      for view in val.views:
        fan_in = _union(view.axes[a] for a in contract)
        fan_out = _union(view.axes[a] for a in free)
        kept_batch = _union(view.axes[a] for a in batch)
        kept_group = _union(view.axes[a] for a in group)
        stack = view.stack_axes
        use_kind = kind
        if kind == "contraction" and (
          fan_in & (fan_out | kept_batch | kept_group | stack) or fan_out & (kept_batch | stack)
        ):
          use_kind = "mixed"
        use = Use(
          use_kind,
          name,
          self.where,
          fan_in,
          fan_out,
          kept_batch,
          kept_group,
          stack,
          conv,
          live and not view.dead,
          view.stack,
          other.after,
        )
        if self.recording and use_kind == "contraction" and view.stack:
          sums.add((view.param, len(self.uses[view.param])))
        self._use(view.param, use)
    return frozenset(sums)

  # -- sub-programs ---------------------------------------------------------

  def _inside(self, where: str | None, jaxpr, ins, live_out) -> list[Val]:
    saved = self.where
    if where is not None:
      self.where = (*saved, where)
    try:
      return self.run(jaxpr, ins, live_out)
    finally:
      self.where = saved

  def _call(self, eqn, vals: list[Val], subs: list, live_vars: set) -> list[Val]:
    """A call of a sub-program whose inputs and outputs are the equation's own."""
    jaxpr = _open(subs[0])
    if len(subs) != 1 or len(jaxpr.invars) != len(vals) or len(jaxpr.outvars) != len(eqn.outvars):
      return self._opaque(eqn, vals)
    where = _SHARD_MAP if eqn.primitive.name == "shard_map" else None
    live_out = [v in live_vars for v in eqn.outvars]
    return self._inside(where, subs[0], vals, live_out)

  def _cond(self, eqn, vals: list[Val], live_vars: set) -> list[Val]:
    live_out = [v in live_vars for v in eqn.outvars]
    outs = [self._inside(_COND, b, vals[1:], live_out) for b in eqn.params["branches"]]
    return [_merge(column) for column in zip(*outs, strict=True)]

  def _loop(self, body, consts: list[Val], carry: list[Val], xs: list[Val], where: str, entry=None):
    """Walks a loop body to a fixed point of what its carry is, then once more, recording.

    On that last walk each carry is marked: a carry that comes out as itself plus
    the output of a contraction of the entry each trip takes (``entry``, a
    scan's), whose input depends on no carry, sums the entries over the trips
    (an accumulated convolution); a stack feeds each layer the carry.
    """
    recording, self.recording = self.recording, False
    try:
      for _ in range(4):
        outs = self._inside(where, body, [*consts, *carry, *xs], None)
        new = [_carried(c, o) for c, o in zip(carry, outs[: len(carry)], strict=True)]
        if new == carry:
          break
        carry = new
      else:
        carry = [Val(label=c.label) for c in carry]
    finally:
      self.recording = recording
    marks = [-next(self.carries) for _ in carry]
    marked = [
      dataclasses.replace(c, sums=c.sums | {(m, 0)}, after=c.after | {m})
      for c, m in zip(carry, marks, strict=True)
    ]
    outs = self._inside(where, body, [*consts, *marked, *xs], None)
    self._drop_products(outs, (), True)
    for m, out in zip(marks, outs, strict=False):
      if entry is None or (m, 0) not in out.sums:
        continue
      for p, u in out.sums:
        use = self.uses[p][u] if p >= 0 else None
        if use is not None and not use.depends & set(marks):
          self.summed[p] |= {axis for axis, e in use.entries if e == entry}
    return carry, outs

  def _scan(self, eqn, vals: list[Val]) -> list[Val]:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry, xs = vals[:nc], vals[nc : nc + ncarry], vals[nc + ncarry :]
    # A parameter scanned over loses its leading axis in the body: a stack axis,
    # at one entry per trip.
    xs = [
      Val(
        tuple(
          dataclasses.replace(view, axes=view.axes[1:], stack=view.take(view.axes[0], id(eqn)))
          for view in val.views
        ),
        val.label,
      )
      for val in xs
    ]
    carry, outs = self._loop(p["jaxpr"], consts, carry, xs, _SCAN, id(eqn))
    return [*carry, *(Val(label=o.label) for o in outs[ncarry:])]

  def _pmap(self, eqn, vals: list[Val], live_vars: set) -> list[Val]:
    """``pmap``: a parameter mapped over an axis loses it inside, like a scan's."""
    inner = []
    for val, axis in zip(vals, eqn.params["in_axes"], strict=True):
      if axis is None:
        inner.append(val)
        continue
      views = tuple(
        dataclasses.replace(
          view,
          axes=view.axes[:axis] + view.axes[axis + 1 :],
          stack=view.take(view.axes[axis], id(eqn)),
        )
        for view in val.views
      )
      inner.append(Val(views, val.label))
    live_out = [v in live_vars for v in eqn.outvars]
    outs = self._inside("pmap", eqn.params["call_jaxpr"], inner, live_out)
    return [Val(label=o.label) for o in outs]

  def _while(self, eqn, vals: list[Val]) -> list[Val]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    consts, carry = vals[cn : cn + bn], vals[cn + bn :]
    carry, _ = self._loop(p["body_jaxpr"], consts, carry, [], _WHILE)
    return carry


_SUMS = ("add", "add_any", "sub", "reduce_sum")
# What a plain sum of contraction outputs stays one through (Val.sums).
_SUMS_OF_OUTPUTS = frozenset({"add", "add_any", "sub"})
_MOVES = frozenset({
  "neg", "convert_element_type", "copy", "copy_p", "reduce_precision", "reshape", "transpose",
  "squeeze", "broadcast_in_dim",
})  # fmt: skip
# Operations that keep integers integers: a float made of integers through them
# alone (a one-hot) is DISCRETE; through a cosine it is not.
_INTEGRAL = (_SHAPE | _ENDS | _IDENTITY) - {"reduce_precision"} | {
  "add", "sub", "mul", "neg", "max", "min", "select_n", "clamp", "abs", "sign", "rem",
  "floor", "ceil", "round", "integer_pow", "gather", "dynamic_slice",
}  # fmt: skip
_KNOWN = _IDENTITY | _ELEMENTWISE | _SHAPE | _ENDS | {"gather", "dynamic_slice"}


def _dims(name: str, p, side: int, ndim: int):
  """``(contracting, batch, group, free, conv)`` axes of one operand of a contraction."""
  conv = False
  group: Sequence[int] = ()
  if name == "conv_general_dilated":
    lhs_spec, rhs_spec, _ = p["dimension_numbers"]
    spec = rhs_spec if side == 1 else lhs_spec
    contract, batch, conv = (spec[1], *spec[2:]), (), side == 1
  elif name == "ragged_dot":  # (m, k) x (groups, k, n)
    contract, batch, group = (1,), (), ((0,) if side == 1 else ())
  else:
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
    else:
      dn = p["ragged_dot_dimension_numbers"]
      (lc, rc), (lb, rb) = dn.dot_dimension_numbers
      group = dn.rhs_group_dimensions if side == 1 else ()
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
  free = [a for a in range(ndim) if a not in (*contract, *batch, *group)]
  return tuple(contract), tuple(batch), tuple(group), free, conv


def _map(val: Val, fn) -> tuple[View, ...]:
  return tuple(dataclasses.replace(view, axes=fn(view.axes)) for view in val.views)


def _entry_of(v) -> object:
  """Which entry an index picks: a literal's value, or the variable itself."""
  return v.val.item() if isinstance(v, Literal) and hasattr(v.val, "item") else v


def _sliced(val: Val, src, out, starts) -> tuple[View, ...]:
  """A slice: an axis cut to one entry becomes a stack axis, any other keeps its span."""
  one = [i for i in range(len(src)) if out[i] == 1 and src[i] > 1]
  return tuple(
    dataclasses.replace(
      view,
      axes=tuple(_NOTHING if i in one else a for i, a in enumerate(view.axes)),
      stack=view.stack | {(s, starts[i]) for i in one for s in view.axes[i]},
    )
    for view in val.views
  )


def _dedupe(views) -> tuple[View, ...]:
  return tuple(dict.fromkeys(views))


def _merge(vals: Sequence[Val]) -> Val:
  label = 0
  for val in vals:
    label |= val.label
  return Val(
    _dedupe(view for val in vals for view in val.views),
    label,
    tuple(dict.fromkeys(p for val in vals for p in val.products)),
    frozenset.intersection(*(val.replicated for val in vals)),
    _union(val.sums for val in vals),
    _union(val.after for val in vals),
    _union(val.opaque for val in vals),
  )


def _carried(before: Val, after: Val) -> Val:
  """A loop carry's value after one more trip: what the body kept of what it was."""
  views = tuple(view for view in before.views if view in after.views)
  return Val(views, before.label | after.label, (), before.replicated & after.replicated)


def _replicated(eqn, vals: Sequence[Val]) -> list[frozenset[int]]:
  """The axes each output is constant along, by broadcasting (see ``Val.replicated``)."""
  name, p = eqn.primitive.name, eqn.params
  out = _shape(eqn.outvars[0])
  src = _shape(eqn.invars[0]) if eqn.invars else ()
  rep = vals[0].replicated if vals else _NOTHING
  if name == "broadcast_in_dim":
    dims = p["broadcast_dimensions"]
    kept = {d for i, d in enumerate(dims) if i in rep or src[i] < out[d]}
    return [frozenset(d for d in range(len(out)) if d not in dims and out[d] > 1) | kept]
  if name in _IDENTITY or name in _ELEMENTWISE:
    found = []
    for v, val in zip(eqn.invars, vals, strict=True):
      shape = _shape(v)
      if len(shape) != len(out):  # a scalar
        continue
      found.append(val.replicated | {i for i, n in enumerate(shape) if n < out[i]})
    every = frozenset.intersection(*found) if found else frozenset(range(len(out)))
    return [frozenset(every)] * len(eqn.outvars)
  if name == "transpose":
    return [frozenset(j for j, i in enumerate(p["permutation"]) if i in rep)]
  if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "squeeze"):
    gone = {d % len(src) for d in p["axes" if name != "squeeze" else "dimensions"]}
    remaining = [i for i in range(len(src)) if i not in gone]
    return [frozenset(j for j, i in enumerate(remaining) if i in rep)]
  if name == "reshape" and p.get("dimensions") is None:
    # Size-1 axes merged into a group do not make it vary (jnp.repeat of a token).
    spans = _reshape_axes(
      tuple(frozenset({i} if src[i] > 1 else ()) for i in range(len(src))), src, out
    )
    return [frozenset(j for j, span in enumerate(spans) if span and span <= rep)]
  if name == "tile":  # a size-1 axis tiled is constant along it
    return [rep | {i for i, r in enumerate(p["reps"]) if r > 1 and src[i] == 1}]
  if name in ("slice", "dynamic_slice", "pad", "rev"):
    return [rep]
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    left, right = vals[0].replicated, vals[1].replicated
    lhs, rhs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    axes = [lb[k] in left and rb[k] in right for k in range(len(lb))]
    axes += [a in left for a in range(len(lhs)) if a not in (*lc, *lb)]
    axes += [a in right for a in range(len(rhs)) if a not in (*rc, *rb)]
    return [frozenset(j for j, r in enumerate(axes) if r)]
  return [_NOTHING] * len(eqn.outvars)


_REPLICATING = (
  _IDENTITY
  | _ELEMENTWISE
  | {"broadcast_in_dim", "transpose", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod"}
  | {"squeeze", "reshape", "slice", "dynamic_slice", "pad", "rev", "tile", "dot_general"}
)


@dataclasses.dataclass(frozen=True)
class Reading:
  """What the program says of one parameter: the kind of use that decides it, and its axes."""

  kind: Kind
  how: str
  fan_in: tuple[int, ...] = ()
  fan_out: tuple[int, ...] = ()
  kept: tuple[int, ...] = ()
  conv: bool = False


def _axes_text(axes) -> str:
  return "(" + ", ".join(map(str, sorted(axes))) + ("," if len(axes) == 1 else "") + ")"


def _describe(use: Use, summed: frozenset[int] = frozenset()) -> str:
  text = use.op + (f" in {', '.join(use.where)}" if use.where else "")
  for role, axes in (("stack", use.stack - summed), ("batch", use.batch), ("expert", use.group)):
    if axes:
      text += f", {role} axis {', '.join(map(str, sorted(axes)))}"
  if summed:
    text += f", entries of axis {', '.join(map(str, sorted(summed)))} added"
  return text


def read(walk: Walk, param: int, ndim: int) -> Reading:
  """Resolves one parameter's uses into what decides it."""
  uses = walk.uses[param]
  opaque = [u for u in uses if u.kind == "opaque"]
  if opaque:
    return Reading("conflict", f"reached through {opaque[0].op}, which cannot be read")
  tables = [u for u in uses if u.kind == "table"]
  if tables:
    op = tables[0].op
    how = "contraction with integer data" if op in _CONTRACTIONS else f"{op} at data indices"
    return Reading("table", f"a table: {how}")
  deciding = [u for u in uses if u.kind in ("contraction", "mixed")]
  deciding = [u for u in deciding if u.live] or deciding
  if not deciding:
    if any(u.kind == "constant" for u in uses):
      op = next(u.op for u in uses if u.kind == "constant")
      return Reading("conflict", f"contracted only with constants or other parameters ({op})")
    if any(u.kind == "input" for u in uses):
      return Reading("untouched", "an input of a contraction, not its weight")
    if not walk.read[param]:
      return Reading("unread", "the forward pass never reads it")
    ends = sorted(walk.ends[param])
    shown = ", ".join(ends[:3]) + (", ..." if len(ends) > 3 else "")
    stack = tuple(sorted(walk.stacked[param]))
    how = "no contraction" + (f": {shown}" if ends else "")
    how += f", stack axis {', '.join(map(str, stack))}" if stack else ""
    return Reading("untouched", how, kept=stack)
  mixed = [u for u in deciding if u.kind == "mixed"]
  if mixed:
    return Reading(
      "conflict", f"{_describe(mixed[0])} mixes contracted and other axes of it (a reshape)"
    )
  fan_ins = list(dict.fromkeys(u.fan_in for u in deciding))
  if len(fan_ins) > 1:
    first = next(u for u in deciding if u.fan_in == fan_ins[0])
    second = next(u for u in deciding if u.fan_in == fan_ins[1])
    return Reading(
      "conflict",
      f"uses disagree: {_describe(first)} sums axes {_axes_text(fan_ins[0])}, "
      f"{_describe(second)} axes {_axes_text(fan_ins[1])}",
    )
  fan_in = fan_ins[0]
  kept = _union(u.batch | u.group | u.stack for u in deciding)
  if fan_in & kept:
    return Reading("conflict", "one use keeps apart an axis another contracts")
  # Stack entries whose outputs are added together are summed (a convolution's taps).
  summed = frozenset(walk.summed[param]) & _union(u.stack for u in deciding)
  fan_in, kept = fan_in | summed, kept - summed
  fan_out = _union(u.fan_out for u in deciding) - kept
  kept |= frozenset(range(ndim)) - fan_in - fan_out - kept
  how = _describe(deciding[0], summed) + (f" ({len(deciding)} uses)" if len(deciding) > 1 else "")
  return Reading(
    "contraction",
    how,
    tuple(sorted(fan_in)),
    tuple(sorted(fan_out)),
    tuple(sorted(kept)),
    any(u.conv for u in deciding),
  )
