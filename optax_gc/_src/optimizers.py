"""The paper's optimizers, drop-ins for their optax namesakes, in the reference's order.

Each takes its optax namesake's positional arguments, in optax's order and with
optax's defaults, so ``adamw_gc(1e-3, 0.9, 0.999, 1e-8, 0.0)`` is
``optax.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0)`` with GC; everything GC- or
paper-specific is keyword-only. GC is applied by
:func:`optax_gc.with_centralization`, so with no weight decay to couple the
optimizer state has exactly its optax namesake's structure.

Where GC goes (``on``):

- ``"gradient"`` (the paper's GC): centre the gradient, then let the
  optimizer see it. Under SGD, with or without momentum, every neuron's fan-in
  mean of the weights then stays at its initial value; under Adam it does not,
  because Adam rescales each coordinate of the centred gradient differently.
- ``"update"`` (the reference's "GC2"): centre the optimizer's final update,
  weight decay and learning rate included, so the fan-in mean of the weights is
  exactly fixed for any optimizer. Use it when that constraint is the point.

The reference's conv-only variant ("GCC") is ``preset="flax_conv"`` (or
``"torch_conv"``): conv kernels are centred; Dense and attention kernels are
not. Use it to reproduce the paper's GCC rows; GC on every kernel is its
default and usually the better choice.
"""

from typing import Any, TypedDict, Unpack

import jax
import optax

from optax_gc._src import rules as rules_lib
from optax_gc._src.transform import On, with_centralization


class GCOptions(TypedDict, total=False):
  """The keyword arguments every optimizer here passes to :func:`optax_gc.with_centralization`."""

  rules: rules_lib.RulesLike
  preset: rules_lib.Preset | None
  strength: float | jax.Array
  strict: bool
  on: On


def _gc(tx, weight_decay, mask, gc: GCOptions) -> optax.GradientTransformationExtraArgs:
  """Coupled L2 (``g + wd * p``, the reference's order), then ``tx`` with GC."""
  tx = with_centralization(tx, **gc)
  if not weight_decay:
    return tx
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)


def sgd_gc(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float | None = None,
  nesterov: bool = False,
  accumulator_dtype: Any | None = None,
  *,
  weight_decay: float = 0.0,
  mask: Any = None,
  **gc: Unpack[GCOptions],
) -> optax.GradientTransformationExtraArgs:
  """``optax.sgd`` with Gradient Centralization: coupled L2, GC, momentum, step.

  With ``on="gradient"`` every neuron's fan-in mean of the weights stays at its
  initial value throughout training (GC, momentum and the step are all linear).

  Args:
    learning_rate, momentum, nesterov, accumulator_dtype: as in ``optax.sgd``.
    weight_decay: coupled L2 coefficient, added to the gradient before GC (the
      reference's order; its default is also 0).
    mask: which leaves weight decay applies to (a pytree or a callable of the
      params, as in ``optax.add_decayed_weights``); None: all.
    **gc: ``rules``, ``preset``, ``strength``, ``strict``, ``on``, as in
      :func:`optax_gc.with_centralization` (``preset="flax_conv"``: GCC;
      ``on="update"``: GC2).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.sgd_gc(0.1, 0.9)
    >>> grads = {"kernel": jnp.array([[1., 0.], [2., 1.], [6., 5.]])}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(updates["kernel"])  # -0.1 * (each column minus its mean)
    [[ 0.2  0.2]
     [ 0.1  0.1]
     [-0.3 -0.3]]

  References:
    Yong et al, `Gradient Centralization: A New Optimization Technique for Deep
    Neural Networks <https://arxiv.org/abs/2004.01461>`_, 2020.
  """
  tx = optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype)
  return _gc(tx, weight_decay, mask, gc)


def adam_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  mask: Any = None,
  **gc: Unpack[GCOptions],
) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` with Gradient Centralization: coupled L2, GC, then Adam.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adam``.
    weight_decay: coupled L2 coefficient, added to the gradient before GC (the
      reference's ``Adam_GC``; its default is also 0).
    mask: which leaves weight decay applies to; None: all.
    **gc: ``rules``, ``preset``, ``strength``, ``strict``, ``on``, as in
      :func:`optax_gc.with_centralization` (``on="update"``, GC2, keeps the
      fan-in mean of the weights fixed; GC on the gradient does not under Adam).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.adam_gc(1e-3, weight_decay=1e-4)
    >>> updates, state = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> float(abs(updates["kernel"]).max())  # a constant gradient has nothing left after GC
    0.0
  """
  tx = optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  return _gc(tx, weight_decay, mask, gc)


def adamw_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: Any = None,
  *,
  nesterov: bool = False,
  **gc: Unpack[GCOptions],
) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` with Gradient Centralization: GC, Adam, then decoupled weight decay.

  The step is ``optax.adamw``'s, on the centred gradient. ``weight_decay``
  keeps optax's default, 1e-4 (PyTorch's AdamW and the reference's
  ``AdamW_GC`` default to 1e-2).

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
      nesterov: as in ``optax.adamw``.
    **gc: ``rules``, ``preset``, ``strength``, ``strict``, ``on``, as in
      :func:`optax_gc.with_centralization` (``on="update"``, GC2: decay included
      in what is centred, so the fan-in mean of the weights stays fixed).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state has
    ``optax.adamw``'s structure.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.adamw_gc(1e-3, weight_decay=0.1)
    >>> updates, _ = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> print(updates["kernel"][0])  # only the decay is left: -lr * wd * p
    [-0.0001 -0.0001]
  """
  tx = optax.adamw(
    learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov
  )
  return _gc(tx, 0.0, None, gc)
