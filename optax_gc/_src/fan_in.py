"""The fan-in sum of one leaf, ``sum(g * scale, axes)`` in float32 or wider, per backend.

GPUs and TPUs fuse a plain reduction into one read of the leaf. XLA:CPU does
not: its reduction writes a full-size temporary, an extra pass over
memory, so on XLA:CPU large leaves take the sum as a dot with a constant. The
choice is made at lowering time (``lax.platform_dependent``), so a step
exported or compiled ahead of time for a TPU from a CPU host gets the TPU form.
"""

from functools import partial

import jax
import jax.numpy as jnp

# Leaves at least this large (in elements) sum their fan-in with a dot; smaller
# ones, which stay in cache, keep the reduction (it traces and compiles faster).
_DOT_MIN_SIZE = 2**16
# Rows of the dot's constant operand, all equal: XLA:CPU hands a dot with 2 or
# more rows to YNNPACK, its faster kernel here; the extra row costs arithmetic,
# not memory traffic. Batched float32 dots (a scan's layer axis) keep 1 row,
# where YNNPACK is the slower one; batched bfloat16 dots keep 2, because with 1
# XLA:CPU converts the leaf to float32 first (docs/benchmark-notes.md has the
# measurements).
_ROWS = 2


def fan_in_sum(g: jax.Array, axes: tuple[int, ...], scale: float) -> jax.Array:
  """``sum(g * scale, axes)``, accumulated in float32 (or the leaf's wider dtype).

  ``scale`` must be a power of two (exact in any dtype). The result has the
  kept axes, in order. On XLA:CPU, float32, float64 and bfloat16 leaves of
  2**16 elements or more with contiguous fan-in axes (every common layout) take
  the dot of :func:`_fan_in_dot`; other leaves and backends the reduction.

  Example:
    >>> import jax.numpy as jnp
    >>> print(fan_in_sum(jnp.array([[1.0, 4.0], [3.0, 0.0]]), (0,), 0.5))
    [2. 2.]
  """
  compute = jnp.promote_types(g.dtype, jnp.float32)

  def reduction(g):
    return jnp.sum((g if g.dtype == compute else g.astype(compute)) * scale, axis=axes)

  if not _dot_applies(g, axes):
    return reduction(g)
  return jax.lax.platform_dependent(
    g, cpu=partial(_fan_in_dot, axes=axes, scale=scale), default=reduction
  )


def _dot_applies(g: jax.Array, axes: tuple[int, ...]) -> bool:
  """Whether ``_fan_in_dot`` takes this leaf's fan-in sum on XLA:CPU.

  float32, float64 and bfloat16 leaves of ``_DOT_MIN_SIZE`` elements or more
  whose fan-in axes are contiguous (every preset layout). float16 keeps the
  reduction: its ``2**-k`` is subnormal, which XLA:CPU flushes to zero, for
  fan-ins over 2**14. A leaf sharded on an ``AxisType.Explicit`` mesh keeps the
  reduction, whose sharding rule needs no gather (a dot with a replicated
  constant would add one).
  """
  return (
    g.dtype in (jnp.float32, jnp.float64, jnp.bfloat16)
    and axes == tuple(range(axes[0], axes[-1] + 1))
    and g.size >= _DOT_MIN_SIZE
    and not any(s is not None for s in getattr(jax.typeof(g).sharding, "spec", ()))
  )


def _fan_in_dot(g: jax.Array, axes: tuple[int, ...], scale: float) -> jax.Array:
  """``sum(g * scale, axes)`` as one dot with a constant: XLA:CPU's fast form.

  A dot of the leaf with a constant of ``scale`` reads the leaf once and writes
  nothing of its size. ``jnp.sum(g * scale, axes)`` does not on XLA:CPU (jax
  0.10): it becomes a fusion that writes a full-size temporary (a float32 copy
  for bfloat16 leaves), an extra pass over memory. Kept axes before the fan-in
  become batch axes, so no operand is transposed. ``scale`` (a power of two) is
  exact in the constant, the products are exact, and the accumulation is in
  float32 or the leaf's wider dtype at ``Precision.HIGHEST``; the result has the
  kept axes in order. For the leaves ``_dot_applies`` accepts.
  """
  lead, fan = axes[0], tuple(g.shape[a] for a in axes)
  dot = partial(
    jax.lax.dot_general,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.promote_types(g.dtype, jnp.float32),
  )
  if axes[-1] == g.ndim - 1:  # (kept..., fan-in...): a matrix times vectors
    weights = jnp.full(fan + (_ROWS,), scale, g.dtype)
    return dot(g, weights, ((axes, tuple(range(len(axes)))), ((), ())))[..., 0]
  # (batch..., fan-in..., out...): (batched) vectors times a matrix.
  rows = _ROWS if lead == 0 or g.dtype == jnp.bfloat16 else 1
  weights = jnp.full(g.shape[:lead] + (rows,) + fan, scale, g.dtype)
  batch = tuple(range(lead))
  dims = ((tuple(range(lead + 1, lead + 1 + len(axes))), axes), (batch, batch))
  total = dot(weights, g, dims)
  return jax.lax.index_in_dim(total, 0, axis=lead, keepdims=False)
