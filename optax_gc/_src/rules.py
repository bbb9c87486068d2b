"""Axis rules, and the one function that decides each leaf's fan-in axes."""

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import jax.numpy as jnp
import numpy as np

from optax_gc._src import presets
from optax_gc._src.presets import NO_HINT, Hint

Axes = tuple[int, ...] | Literal["all_but_last", "all_but_first"] | None
Preset = Literal["flax", "torch", "flax_conv", "torch_conv"]

_NAMED_AXES = ("all_but_last", "all_but_first")
_AXES_HELP = (
  'axes must be a tuple of ints such as (-2,), "all_but_last", "all_but_first", '
  "or None to leave the leaf unchanged"
)


Kind = Literal["contraction", "table", "untouched", "conflict", "unread"]


@dataclasses.dataclass(frozen=True)
class LayerRule:
  """What :func:`optax_gc.rules_for` read of one leaf: its axes' roles and how it is used.

  ``axes`` is the fan-in GC averages over (None: unchanged): the axes a
  contraction sums against the input. ``fan_out`` holds the axes that reach the
  output, ``kept`` those kept apart (stack, batch, expert axes): together with
  the fan-in they are every axis of a contracted leaf. ``kind`` says what
  decided it: ``"contraction"``, ``"table"`` (looked up by data),
  ``"untouched"`` (no contraction uses it: biases, scales), ``"conflict"``
  (uses that disagree, an opaque kernel, contractions with constants only) or
  ``"unread"`` (the forward pass never reads it); the last two are
  :attr:`undecided`. ``how`` names the operation and where it stands.
  """

  path: str
  shape: tuple[int, ...]
  axes: tuple[int, ...] | None
  kind: Kind = "contraction"
  how: str = ""
  fan_out: tuple[int, ...] = ()
  kept: tuple[int, ...] = ()
  conv: bool = False  # a conv kernel: what the conv-only presets keep

  @property
  def undecided(self) -> bool:
    """Whether the program could not say: left unchanged, and ``strict=True`` lists it."""
    return self.kind in ("conflict", "unread")

  def __str__(self) -> str:
    axes = "unchanged" if self.axes is None else f"axes {self.axes}"
    return f"{self.path} {self.shape}: {'undecided, ' * self.undecided}{axes} ({self.how})"


class LayerRules(tuple):
  """The rules :func:`optax_gc.rules_for` derived: a tuple of :class:`LayerRule`.

  Pass it as ``rules=`` anywhere, alone or after rules of your own
  (``[(r"head/kernel$", None), *rules]``). ``print(rules)`` shows one line a rule.
  """

  def __str__(self) -> str:
    return "\n".join(map(str, self))

  def __repr__(self) -> str:
    centred = sum(r.axes is not None for r in self)
    undecided = sum(r.undecided for r in self)
    return f"LayerRules({len(self)} leaves: {centred} with a fan-in, {undecided} undecided)"


RulesLike = Mapping[str, Axes] | Iterable[tuple[str, Axes] | LayerRule]


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
  """A compiled rule: leaves whose path matches ``pattern`` average over ``axes``.

  A rule built from :class:`LayerRule` entries has a ``table`` instead: it
  decides exactly the leaves whose path is a key of the table.
  """

  pattern: re.Pattern | None
  axes: Axes | Callable[[str, tuple[int, ...], Hint], presets.Layout]
  name: str
  preset: str | None = None  # None: the user's rule
  table: Mapping[str, LayerRule] | None = None

  @property
  def user(self) -> bool:
    return self.preset is None


@dataclasses.dataclass(frozen=True)
class Decision:
  """What :func:`decide` chose for one leaf: the axes (None: unchanged) and why.

  ``guess`` marks axes that neither the path nor the tree settled;
  ``undecided`` a leaf left unchanged because nothing could say what it is;
  ``derived`` is the :class:`LayerRule` that decided it, with its axes' roles.
  """

  axes: tuple[int, ...] | None
  reason: str
  rule: Rule | None = None
  guess: bool = False
  undecided: bool = False
  derived: LayerRule | None = None


def _is_int(a) -> bool:
  return isinstance(a, int | np.integer) and not isinstance(a, bool | np.bool_)


def _check_axes(axes, where: str) -> Axes:
  """The axes of a rule, checked; NumPy integers become ints (True and 1.0 are refused)."""
  if axes is None or (isinstance(axes, str) and axes in _NAMED_AXES):
    return axes  # type: ignore[return-value]  # one of the named axes
  if isinstance(axes, list):
    axes = tuple(axes)
  if _is_int(axes):
    raise ValueError(f"{where}: axes {axes!r} is a bare int; write a tuple: ({axes},).")
  if not isinstance(axes, tuple) or not axes or not all(_is_int(a) for a in axes):
    raise ValueError(f"{where}: invalid axes {axes!r}; {_AXES_HELP}.")
  return tuple(int(a) for a in axes)


def _compile_pattern(pattern, where: str) -> re.Pattern:
  if isinstance(pattern, re.Pattern):
    return pattern
  if not isinstance(pattern, str):
    raise ValueError(f"{where}: the pattern must be a regular expression string, got {pattern!r}.")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(
      f"{where}: invalid regular expression {pattern!r} ({e}). Patterns are Python "
      r"regular expressions matched with re.search, e.g. r'attn/out/kernel$'."
    ) from None


def _table(entries: list[LayerRule], where: str) -> Rule:
  """One rule that looks derived rules up by path.

  A linen model's rules are keyed by the variables dict's paths
  (``params/Dense_0/kernel``); the ``params`` collection given alone has them
  without that prefix, so both are keys.
  """
  table = {r.path: r for r in entries}
  for r in entries:
    short = r.path.removeprefix("params/")
    table.setdefault(short, r)
  return Rule(None, None, f"{where} rules_for", table=table)


@functools.lru_cache(maxsize=256)
def _compile(rules: tuple, preset: str | None) -> tuple[Rule, ...]:
  compiled, layer_rules = [], []
  for i, item in enumerate(rules):
    where = f"rules[{i}]"
    if isinstance(item, LayerRule):
      layer_rules.append(item)
      continue
    if layer_rules:
      compiled.append(_table(layer_rules, f"rules[{i - len(layer_rules)}:{i}]"))
      layer_rules = []
    if not (isinstance(item, tuple) and len(item) == 2):
      raise ValueError(
        f"{where} is {item!r}; each rule must be a (pattern, axes) pair, "
        'e.g. (r"layers/.*/kernel$", (-2,)).'
      )
    pattern, axes = item
    regex = _compile_pattern(pattern, where)
    name = f"{where} {regex.pattern!r}"
    compiled.append(Rule(regex, _check_axes(axes, name), name))
  if layer_rules:
    compiled.append(_table(layer_rules, f"rules[{len(rules) - len(layer_rules)}:]"))
  if preset is not None:
    for pattern, axes, label in presets.PRESETS[preset]:
      compiled.append(Rule(re.compile(pattern), axes, f"{preset}: {label}", preset))
  return tuple(compiled)


def compile_rules(rules: RulesLike = (), preset: Preset | None = "flax") -> tuple[Rule, ...]:
  """Validates user rules and appends the preset's; raises ``ValueError`` on bad input.

  Example:
    >>> [r.name for r in compile_rules([(r"lin/kernel$", (0,))], preset=None)]
    ["rules[0] 'lin/kernel$'"]
  """
  if preset is not None and not isinstance(preset, str):
    raise TypeError(
      f"preset={preset!r}: give one name, one of {sorted(presets.PRESETS)}, or None (only "
      "your own rules)."
    )
  if preset is not None and preset not in presets.PRESETS:
    raise ValueError(
      f"Unknown preset {preset!r}; use one of {sorted(presets.PRESETS)} or None (only your "
      "own rules)."
    )
  if isinstance(rules, (str, bytes)):
    raise ValueError(
      f"rules is the string {rules!r}; pass a sequence of (pattern, axes) pairs, "
      f"e.g. rules=[({rules!r}, (-2,))]."
    )
  if rules is None:
    rules = ()
  if isinstance(rules, Mapping):
    rules = rules.items()
  if not isinstance(rules, Iterable):
    raise TypeError(
      f"rules={rules!r}: give a sequence of (pattern, axes) pairs, e.g. "
      'rules=[(r"layers/.*/kernel$", (-2,))], the rules of optax_gc.rules_for(model, x), '
      "or () for none."
    )
  # The axes are checked before the cache: (True,) and (1,) are equal keys to it.
  items = tuple(
    (item[0], _check_axes(item[1], f"rules[{i}] {item[0]!r}"))
    if isinstance(item, (tuple, list)) and len(item) == 2
    else item
    for i, item in enumerate(rules)
  )
  try:
    return _compile(items, preset)
  except TypeError:  # an unhashable pattern or axes: compile without the cache
    return _compile.__wrapped__(items, preset)


def _resolve(rule: Rule, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  ndim = len(shape)
  if rule.axes == "all_but_last":
    return tuple(range(ndim - 1))
  if rule.axes == "all_but_first":
    return tuple(range(1, ndim))
  assert isinstance(rule.axes, tuple)  # checked by _check_axes
  bad = [a for a in rule.axes if not -ndim <= a < ndim]
  if bad:
    raise ValueError(
      f"Leaf {path!r} with shape {shape} has no axis {bad[0]} (asked by {rule.name} "
      f"with axes {rule.axes}). Give that leaf a rule of its "
      "own before this one, or anchor the pattern so it does not match it."
    )
  axes = tuple(sorted({a % ndim for a in rule.axes}))
  if len(axes) != len(rule.axes):
    raise ValueError(
      f"{rule.name}: axes {rule.axes} name the same axis twice "
      f"for leaf {path!r} with shape {shape}; list each axis once."
    )
  return axes


def _from_layer(rule: Rule, derived: LayerRule, path: str, shape, conv_only: bool) -> Decision:
  if derived.shape != shape:
    raise ValueError(
      f"Leaf {path!r} has shape {shape}, but rules_for derived its rule from a leaf of "
      f"shape {derived.shape} ({derived.how}). Derive the rules from the model whose "
      "parameters this tree holds."
    )
  if conv_only and derived.axes is not None and not derived.conv:
    return Decision(None, f"{derived.how}: not a conv kernel, unchanged", rule, derived=derived)
  return Decision(derived.axes, derived.how, rule, undecided=derived.undecided, derived=derived)


def decide(
  path: str, shape: tuple[int, ...], dtype, rules: tuple[Rule, ...], hint: Hint = NO_HINT
) -> Decision:
  """Decides the axes GC averages over for one leaf. Every caller goes through here.

  Args:
    path: the leaf's path string (see :func:`optax_gc._src.paths.path_string`).
    shape: the leaf's shape.
    dtype: the leaf's dtype.
    rules: compiled rules, user rules first (see :func:`compile_rules`).
    hint: what the tree shows around the leaf (for the presets).

  Returns:
    A :class:`Decision`: non-negative, sorted axes to average over, or None to
    leave the leaf unchanged, with the reason.

  Example:
    >>> import numpy as np
    >>> d = decide("params/Dense_0/kernel", (3, 4), np.dtype("float32"), compile_rules())
    >>> d.axes, d.reason, d.guess
    ((0,), 'flax: (in, out) kernel', False)
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    return Decision(None, f"{dtype} leaf: never centred")
  if jnp.dtype(dtype).itemsize < 2:
    # float8 and narrower: jax promotes them to nothing wider implicitly.
    return Decision(None, f"{dtype} leaf: GC takes float16 or wider, unchanged", undecided=True)
  if math.prod(shape) == 0:
    return Decision(None, "empty leaf: never centred")
  conv_only = any(r.preset in presets.CONV_ONLY for r in rules)
  for rule in rules:
    if rule.table is not None:
      derived = rule.table.get(path)
      if derived is None:
        continue
      decision = _from_layer(rule, derived, path, shape, conv_only)
    elif rule.pattern is None or not rule.pattern.search(path):
      continue
    elif callable(rule.axes):
      layout = rule.axes(path, shape, hint)
      axes = layout.axes if layout.conv or rule.preset not in presets.CONV_ONLY else None
      label = layout.label if axes is not None or layout.axes is None else "not a conv kernel"
      decision = Decision(
        axes,
        f"{rule.preset}: {label}",
        rule,
        layout.guess and axes is not None,
        layout.undecided and len(shape) >= 2,
      )
    elif rule.axes is None:
      decision = Decision(None, rule.name, rule)
    else:
      decision = Decision(_resolve(rule, path, shape), rule.name, rule)
    if decision.axes is not None and len(decision.axes) == 0:
      reason = f"{decision.reason} (no fan-in axis: unchanged)"
      return dataclasses.replace(decision, axes=None, reason=reason)
    if decision.axes is not None and math.prod(shape[a] for a in decision.axes) == 1:
      # A fan-in of one element is its own mean: GC would zero the gradient.
      reason = f"{decision.reason} (fan-in of size 1: unchanged)"
      return dataclasses.replace(decision, axes=None, reason=reason, guess=False)
    return decision
  return Decision(None, "no rule matched")
