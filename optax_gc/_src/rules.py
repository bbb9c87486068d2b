"""Axis rules, and the one function that decides each leaf's fan-in axes."""

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Literal

import jax.numpy as jnp
import numpy as np

from optax_gc._src.presets import PRESETS

Axes = tuple[int, ...] | Literal["all_but_last", "all_but_first"] | None
RulesLike = Mapping[str, Axes] | Iterable[tuple[str, Axes]]

_NAMED_AXES = ("all_but_last", "all_but_first")
_AXES_HELP = (
  'axes must be a tuple of ints such as (-2,), "all_but_last", "all_but_first", '
  "or None to leave the leaf unchanged"
)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A compiled rule: leaves whose path matches ``pattern`` average over ``axes``."""

  pattern: re.Pattern
  axes: Axes
  name: str
  min_ndim: int = 0
  preset: str | None = None  # None: the user's rule

  @property
  def user(self) -> bool:
    return self.preset is None


@dataclasses.dataclass(frozen=True)
class Decision:
  """What :func:`decide` chose for one leaf: the axes (None: unchanged) and why."""

  axes: tuple[int, ...] | None
  reason: str
  rule: Rule | None = None


def _check_axes(axes, where: str) -> Axes:
  if axes is None or axes in _NAMED_AXES:
    return axes
  if isinstance(axes, list):
    axes = tuple(axes)
  if isinstance(axes, int) and not isinstance(axes, bool):
    raise ValueError(f"{where}: axes {axes!r} is a bare int; write a tuple: ({axes},).")
  if (
    not isinstance(axes, tuple)
    or not axes
    or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
  ):
    raise ValueError(f"{where}: invalid axes {axes!r}; {_AXES_HELP}.")
  return axes


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


@functools.lru_cache(maxsize=256)
def _compile(rules: tuple, preset: str | None) -> tuple[Rule, ...]:
  compiled = []
  for i, item in enumerate(rules):
    where = f"rules[{i}]"
    if not (isinstance(item, tuple) and len(item) == 2):
      raise ValueError(
        f"{where} is {item!r}; each rule must be a (pattern, axes) pair, "
        'e.g. (r"layers/.*/kernel$", (-2,)).'
      )
    pattern, axes = item
    regex = _compile_pattern(pattern, where)
    name = f"{where} {regex.pattern!r}"
    compiled.append(Rule(regex, _check_axes(axes, name), name))
  if preset is not None:
    for pattern, axes, label, min_ndim in PRESETS[preset]:
      compiled.append(Rule(re.compile(pattern), axes, f"{preset}: {label}", min_ndim, preset))
  return tuple(compiled)


def _hashable(axes):
  return tuple(axes) if isinstance(axes, list) else axes


def compile_rules(rules: RulesLike = (), preset: str | None = "flax") -> tuple[Rule, ...]:
  """Validates user rules and appends the preset's; raises ``ValueError`` on bad input.

  Example:
    >>> [r.name for r in compile_rules([(r"lin/kernel$", (0,))], preset=None)]
    ["rules[0] 'lin/kernel$'"]
  """
  if preset is not None and preset not in PRESETS:
    raise ValueError(
      f"Unknown preset {preset!r}; use one of {sorted(PRESETS)} or None (only your own rules)."
    )
  if isinstance(rules, (str, bytes)):
    raise ValueError(
      f"rules is the string {rules!r}; pass a sequence of (pattern, axes) pairs, "
      f"e.g. rules=[({rules!r}, (-2,))]."
    )
  if isinstance(rules, Mapping):
    rules = rules.items()
  items = tuple(
    (item[0], _hashable(item[1])) if isinstance(item, (tuple, list)) and len(item) == 2 else item
    for item in rules
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
  bad = [a for a in rule.axes if not -ndim <= a < ndim]
  if bad:
    raise ValueError(
      f"Leaf {path!r} with shape {shape} has no axis {bad[0]} (asked by {rule.name} "
      f"{rule.pattern.pattern!r} with axes {rule.axes}). Give that leaf a rule of its "
      "own before this one, or anchor the pattern so it does not match it."
    )
  axes = tuple(sorted({a % ndim for a in rule.axes}))
  if len(axes) != len(rule.axes):
    raise ValueError(
      f"{rule.name}: axes {rule.axes} name the same axis twice "
      f"for leaf {path!r} with shape {shape}; list each axis once."
    )
  return axes


@functools.lru_cache(maxsize=65536)
def decide(path: str, shape: tuple[int, ...], dtype: np.dtype, rules: tuple[Rule, ...]) -> Decision:
  """Decides the axes GC averages over for one leaf. Every caller goes through here.

  Args:
    path: the leaf's path string (see :func:`optax_gc._src.paths.path_string`).
    shape: the leaf's shape.
    dtype: the leaf's dtype.
    rules: compiled rules, user rules first (see :func:`compile_rules`).

  Returns:
    A :class:`Decision`: non-negative, sorted axes to average over, or None to
    leave the leaf unchanged, with the reason.

  Example:
    >>> import numpy as np
    >>> d = decide("params/Dense_0/kernel", (3, 4), np.dtype("float32"), compile_rules())
    >>> d.axes, d.reason
    ((0,), 'flax: (..., in, out) kernel')
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    return Decision(None, f"{dtype} leaf: never centred")
  if math.prod(shape) == 0:
    return Decision(None, "empty leaf: never centred")
  for rule in rules:
    if len(shape) < rule.min_ndim or not rule.pattern.search(path):
      continue
    if rule.axes is None:
      return Decision(None, rule.name, rule)
    axes = _resolve(rule, path, shape)
    if not axes:
      where = rule.preset or rule.name
      return Decision(None, f"{where}: fewer than 2 dims, unchanged", rule)
    if math.prod(shape[a] for a in axes) == 1:
      # A fan-in of one element is its own mean: GC would zero the gradient.
      return Decision(None, f"{rule.name} (fan-in of size 1: unchanged)", rule)
    return Decision(axes, rule.name, rule)
  return Decision(None, "no rule matched")
