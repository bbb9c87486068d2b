"""The paper's optimizers, in the order its reference implementation runs them.

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

from typing import Literal

import optax

from optax_gc._src import rules as rules_lib
from optax_gc._src.transform import centralize

On = Literal["gradient", "update"]


def _assemble(before, after, rules, preset, on: On) -> optax.GradientTransformation:
  """Chains ``before``, GC, ``after`` (``on="gradient"``) or GC last (``"update"``)."""
  gc = centralize(rules, preset=preset)
  if on == "gradient":
    return optax.chain(*before, gc, *after)
  if on == "update":
    return optax.chain(*before, *after, gc)
  raise ValueError(
    f'on={on!r}; use "gradient" (the paper\'s GC) or "update" (GC2: centre the final update).'
  )


def sgd_gc(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.0,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  *,
  mask=None,
  rules: rules_lib.RulesLike = (),
  preset: str | None = "flax",
  on: On = "gradient",
) -> optax.GradientTransformation:
  """SGD with Gradient Centralization: L2 (``g + wd * p``), GC, momentum, step.

  With ``on="gradient"`` every neuron's fan-in mean of the weights stays at its
  initial value throughout training (GC, momentum and the step are all linear).

  Args:
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum (``optax.trace``); 0 disables it.
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 coefficient, added to the gradient before GC.
    mask: which leaves weight decay applies to (a pytree or a callable of the
      params, as in ``optax.add_decayed_weights``); None: all.
    rules, preset: which axes are each leaf's fan-in, as in
      :func:`optax_gc.centralize`; ``preset="flax_conv"`` gives the conv-only
      variant (GCC).
    on: ``"gradient"`` (GC) or ``"update"`` (GC2).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.sgd_gc(0.1, momentum=0.9)
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
  before = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
  after = [optax.trace(momentum, nesterov)] if momentum else []
  after.append(optax.scale_by_learning_rate(learning_rate))
  return _assemble(before, after, rules, preset, on)


def adam_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  mask=None,
  rules: rules_lib.RulesLike = (),
  preset: str | None = "flax",
  on: On = "gradient",
) -> optax.GradientTransformation:
  """Adam with Gradient Centralization: L2 (``g + wd * p``), GC, then Adam's moments.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: as in ``optax.adam``.
    weight_decay: coupled L2 coefficient, added to the gradient before GC.
    mask: which leaves weight decay applies to; None: all.
    rules, preset: as in :func:`optax_gc.centralize`; ``"flax_conv"``: GCC.
    on: ``"gradient"`` (GC) or ``"update"`` (GC2, which keeps the fan-in
      mean of the weights fixed; GC on the gradient does not under Adam).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.adam_gc(1e-3, weight_decay=1e-4)
    >>> updates, state = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> float(abs(updates["kernel"]).max())  # a constant gradient has nothing left after GC
    0.0
  """
  before = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
  after = [optax.scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)]
  return _assemble(before, after, rules, preset, on)


def adamw_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  *,
  mask=None,
  rules: rules_lib.RulesLike = (),
  preset: str | None = "flax",
  on: On = "gradient",
) -> optax.GradientTransformation:
  """AdamW with Gradient Centralization: GC, Adam, then decoupled weight decay.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps: as in ``optax.adamw``.
    weight_decay: decoupled decay coefficient (``optax.adamw``'s default).
    mask: which leaves weight decay applies to; None: all.
    rules, preset: as in :func:`optax_gc.centralize`; ``"flax_conv"``: GCC.
    on: ``"gradient"`` (GC) or ``"update"`` (GC2: decay included in what is
      centred, so the fan-in mean of the weights stays fixed).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.adamw_gc(1e-3, weight_decay=0.1)
    >>> updates, _ = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> print(updates["kernel"][0])  # only the decay is left: -lr * wd * p
    [-0.0001 -0.0001]
  """
  before = []
  after = [
    optax.scale_by_adam(b1, b2, eps),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  ]
  return _assemble(before, after, rules, preset, on)
