"""`explain`: the per-leaf plan, shown before training."""

import dataclasses
import difflib
import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from optax_gc._src import rules as rules_lib
from optax_gc._src import tree as tree_lib


@dataclasses.dataclass(frozen=True)
class Row:
  """One leaf of a :class:`Plan`."""

  path: str
  shape: tuple[int, ...]
  dtype: Any  # a NumPy dtype, or an extended one (PRNG keys)
  axes: tuple[int, ...] | None
  decided_by: str
  guess: bool = False  # a preset guessed the layout: neither path nor tree settled it
  undecided: bool = False  # left unchanged: nothing could say what the leaf is
  rule: rules_lib.Rule | None = dataclasses.field(default=None, repr=False, compare=False)
  derived: rules_lib.LayerRule | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def fan_out(self) -> tuple[int, ...] | None:
    """The axes that reach the output, where :func:`optax_gc.rules_for` read a contraction."""
    return self.derived.fan_out if self.derived and self.derived.kind == "contraction" else None

  @property
  def kept(self) -> tuple[int, ...] | None:
    """The stack, batch and expert axes, where :func:`optax_gc.rules_for` read a contraction."""
    return self.derived.kept if self.derived and self.derived.kind == "contraction" else None


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
  """What GC does to each leaf of a tree; ``str(plan)`` is a table.

  Index a plan by path (``plan["params/Dense_0/kernel"].axes``) or iterate over
  its rows. ``unmatched`` lists the floating leaves with 2 or more dimensions
  that no rule decided; ``guesses`` the leaves whose layout a preset guessed
  (their axes marked ``?`` in the table); ``undecided`` the leaves of 2 or more
  dimensions left unchanged because neither the model's program nor the preset
  could say what they are (marked ``?``); ``unused_rules`` the user rules that
  decided no leaf. ``strict=True`` refuses all four.
  """

  rows: tuple[Row, ...]
  rules: tuple[rules_lib.Rule, ...]
  roles: bool = False  # str() shows the fan-out and kept axes too
  _by_path: dict[str, Row] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "_by_path", {row.path: row for row in self.rows})

  def __iter__(self) -> Iterator[Row]:
    return iter(self.rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, path: str) -> Row:
    row = self._by_path.get(path)
    if row is None:
      close = difflib.get_close_matches(str(path), self._by_path, n=3)
      hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
      raise KeyError(f"no leaf with path {path!r} among {len(self.rows)} leaves{hint}")
    return row

  @property
  def unmatched(self) -> tuple[Row, ...]:
    return tuple(
      r
      for r in self.rows
      if r.rule is None
      and not r.undecided
      and r.size > 0
      and jnp.issubdtype(r.dtype, jnp.floating)
      and len(r.shape) >= 2
    )

  @property
  def guesses(self) -> tuple[Row, ...]:
    return tuple(r for r in self.rows if r.guess)

  @property
  def undecided(self) -> tuple[Row, ...]:
    return tuple(r for r in self.rows if r.undecided)

  @property
  def unused_rules(self) -> tuple[rules_lib.Rule, ...]:
    used = {r.rule for r in self.rows}
    return tuple(rule for rule in self.rules if rule.user and rule not in used)

  def __repr__(self) -> str:
    centred = sum(r.axes is not None for r in self.rows)
    guessed = f", {len(self.guesses)} guessed" if self.guesses else ""
    unchanged = len(self.rows) - centred
    return f"Plan({len(self.rows)} leaves: {centred} centred, {unchanged} unchanged{guessed})"

  def __str__(self) -> str:
    roles = ("fan-out", "kept") if self.roles else ()
    header = ("path", "shape", "dtype", "axes", *roles, "decided by")
    cells = [header] + [
      (
        r.path or "<root>",
        str(r.shape),
        str(r.dtype),
        ("?" if r.undecided else "-") if r.axes is None else str(r.axes) + "?" * r.guess,
        *((str(r.fan_out or "-"), str(r.kept or "-")) if self.roles else ()),
        r.decided_by,
      )
      for r in self.rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = [
      "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
      for row in cells
    ]
    centred = [r for r in self.rows if r.axes is not None]
    size = sum(r.size for r in centred)
    lines.append(
      f"{len(self.rows)} leaves: {len(centred)} centred ({size:,} parameters), "
      f"{len(self.rows) - len(centred)} unchanged"
    )
    derived = any(r.table is not None for r in self.rules)
    fix = "give them rules of your own" if derived else "optax_gc.rules_for(model) reads them"
    if self.guesses:
      lines.append(
        f"(axes)?: {len(self.guesses)} layouts guessed (strict=True refuses them; {fix})"
      )
    if self.undecided:
      lines.append(
        f"?: {len(self.undecided)} leaves left unchanged, undecided (strict=True lists them; {fix})"
      )
    return "\n".join(lines)


def make_plan(tree, rules: tuple[rules_lib.Rule, ...], roles: bool = False) -> Plan:
  """Decides every leaf of ``tree`` (arrays, ShapeDtypeStructs, Flax boxes, scalars, keys)."""
  leaves, _, _ = tree_lib.flatten(tree)
  decisions = tree_lib.decide_leaves(leaves, rules)
  rows = tuple(
    Row(
      leaf.path, leaf.shape, leaf.dtype, d.axes, d.reason, d.guess, d.undecided, d.rule, d.derived
    )
    for leaf, d in zip(leaves, decisions, strict=True)
  )
  return Plan(rows, rules, roles)


def explain(
  tree,
  rules: rules_lib.RulesLike = (),
  *,
  preset: rules_lib.Preset | None = "flax",
  roles: bool = False,
) -> Plan:
  """Shows, for every leaf of ``tree``, which axes GC averages over and why.

  ``centralize`` decides each leaf through the same function, so the plan is
  exactly what training will do. Leaves may be arrays or
  ``jax.ShapeDtypeStruct``, so a model can be planned through
  ``jax.eval_shape`` without allocating it.

  Args:
    tree: a pytree of parameters or gradients (or their shapes).
    rules: ordered ``(pattern, axes)`` pairs and :func:`optax_gc.rules_for`'s
      rules, tried before the preset's; the plan names the layer each derived
      rule came from.
    preset: ``"flax"``, ``"torch"`` or None, as in :func:`optax_gc.centralize`.
    roles: also show, for each leaf :func:`optax_gc.rules_for` read a
      contraction of, the axes that reach the output (fan-out) and those kept
      apart (stack, batch, expert axes); ``plan[path].fan_out`` and
      ``.kept`` hold them whatever this says.

  Returns:
    A :class:`Plan`; ``print(plan)`` shows a table, ``plan[path].axes`` one leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
    ...           "Embed_0": {"embedding": jnp.zeros((10, 4))}}
    >>> print(optax_gc.explain(params))
    path               shape    dtype    axes  decided by
    Dense_0/bias       (4,)     float32  -     flax: not a kernel
    Dense_0/kernel     (3, 4)   float32  (0,)  flax: (in, out) kernel
    Embed_0/embedding  (10, 4)  float32  -     flax: not a kernel
    3 leaves: 1 centred (12 parameters), 2 unchanged
  """
  return make_plan(tree, rules_lib.compile_rules(rules, preset), roles)
