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

Where this differs from the reference implementation
(github.com/Yonghongwei/Gradient-Centralization; each difference has a float64
test in tests/test_reference.py):

- ``sgd_gc`` and ``adam_gc`` take its ``SGD_GC`` and ``Adam_GC`` steps
  (coupled L2, then GC, then the optimizer; tests/test_optimizers.py).
- ``adamw_gc`` takes ``optax.adamw``'s step on the centred gradient,
  ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``. The reference's
  ``AdamW_GC`` (its CIFAR code) takes
  ``p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * (m / (sqrt(v) + eps) + wd * p)``:
  the decoupled decay is scaled by ``sqrt(1 - b2**t) / (1 - b1**t)`` each step
  (below 1 throughout with the default betas: 0.32 at step 1, 0.15 at step 12,
  0.8 at step 1000), and ``eps`` sits outside the bias correction (it acts as
  ``eps / sqrt(1 - b2**t)`` against ``sqrt(v_hat)``). Its ``algorithm-GC`` AdamW takes
  ``p -= lr / (1 - b1**t) * (m / (sqrt(v / (1 - b2**t)) + eps) + wd * p)``: the
  decay is scaled by ``1 / (1 - b1**t)``. ``adamw_gc(..., reference="cifar")``
  and ``reference="algorithm_gc"`` take those steps, for reproducing its numbers.
- Its conv-only GC ("GCC") centres only tensors of more than 3 dims, so it
  skips Conv1d weights ``(out, in, k)``; ``preset="flax_conv"`` and
  ``"torch_conv"`` centre every conv kernel, 1-D ones included.
- Its GC centres every tensor of 2 or more dims: an embedding table loses each
  row's mean over the embedding dim, and a weight with a single input (fan-in
  1, ``(out, 1)``) gets a zero gradient, so it never trains. Both are left
  unchanged here on purpose: an embedding's row is not a neuron's fan-in
  (``rules_for`` gives Embed tables no GC, the ``"flax"`` preset centres only
  ``kernel`` and ``w`` leaves, ``"torch"`` leaves ``embed*/weight`` alone), and
  a leaf whose fan-in has one element is never centred.
"""

import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gc._src import rules as rules_lib
from optax_gc._src.transform import On, with_centralization

AdamWReference = Literal["cifar", "algorithm_gc"]
"""The reference implementation's AdamW steps ``adamw_gc(reference=...)`` can take."""


def _reference_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: ArrayLike,
  b2: ArrayLike,
  eps: ArrayLike,
  mu_dtype: Any | None,
  weight_decay: optax.ScalarOrSchedule,
  mask: Any,
  reference: AdamWReference,
) -> optax.GradientTransformation:
  """The reference's AdamW step, with ``optax.adamw``'s state: ``(adam, decay, lr)``.

  Its bias correction scales the decay too, so it is applied after optax's own
  ``add_decayed_weights`` (which brings masks and schedules), with Adam's count.
  The state is ``optax.adamw``'s, moments included, so a checkpoint restores
  across ``reference``.
  """
  adam = optax.scale_by_adam(b1, b2, eps, 0.0, mu_dtype)  # for its state only
  decay = optax.add_decayed_weights(weight_decay, mask)
  step = optax.scale_by_learning_rate(learning_rate)

  def init_fn(params):
    return (adam.init(params), decay.init(params), step.init(params))

  def update_fn(updates, state, params=None):
    adam_state, decay_state, step_state = state
    mu = optax.tree.update_moment(updates, adam_state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, adam_state.nu, b2, 2)
    count = optax.safe_increment(adam_state.count)
    bc1, bc2 = 1 - b1**count, 1 - b2**count
    if reference == "cifar":  # eps outside the bias correction
      scale = jnp.sqrt(bc2) / bc1
      direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    else:
      scale, root_bc2 = 1 / bc1, jnp.sqrt(bc2)
      direction = jax.tree.map(
        lambda m, v: m / (jnp.sqrt(v) / root_bc2.astype(v.dtype) + eps), mu, nu
      )
    direction, decay_state = decay.update(direction, decay_state, params)
    direction = jax.tree.map(lambda d: d * scale.astype(d.dtype), direction)
    direction, step_state = step.update(direction, step_state, params)
    adam_state = optax.ScaleByAdamState(
      count=count, mu=optax.tree.cast(mu, mu_dtype), nu=optax.tree.cast_like(nu, adam_state.nu)
    )
    return direction, (adam_state, decay_state, step_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_reference(reference, eps_root, nesterov) -> None:
  """The arguments ``adamw_gc(reference=...)`` cannot take, refused when it is built."""
  if reference not in (None, "cifar", "algorithm_gc"):
    raise ValueError(
      f"reference={reference!r}; use None (optax.adamw's step), 'cifar' (the reference's "
      "CIFAR AdamW_GC) or 'algorithm_gc' (its algorithm-GC AdamW)."
    )
  if reference is None:
    return
  if nesterov:
    raise ValueError(f"nesterov=True with reference={reference!r}: the reference has no Nesterov.")
  if not (isinstance(eps_root, numbers.Real) and eps_root == 0):
    raise ValueError(
      f"eps_root={eps_root!r} with reference={reference!r}: the reference has no eps_root; "
      "leave it at 0.0."
    )


def _gc(tx, weight_decay, mask, **gc) -> optax.GradientTransformationExtraArgs:
  """Coupled L2 (``g + wd * p``, the reference's order), then ``tx`` with GC."""
  tx = with_centralization(tx, **gc)
  if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
    return tx  # the optimizer state is then exactly the optax namesake's
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)


def sgd_gc(
  learning_rate: optax.ScalarOrSchedule,
  momentum: ArrayLike | None = None,
  nesterov: bool = False,
  accumulator_dtype: Any | None = None,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  rules: rules_lib.RulesLike = (),
  preset: rules_lib.Preset | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
  on: On = "gradient",
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
    rules, preset, strength, strict, on: as in :func:`optax_gc.with_centralization`
      (``preset="flax_conv"``: GCC; ``on="update"``: GC2).

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
  return _gc(
    tx, weight_decay, mask, rules=rules, preset=preset, strength=strength, strict=strict, on=on
  )


def adam_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.999,
  eps: ArrayLike = 1e-8,
  eps_root: ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  rules: rules_lib.RulesLike = (),
  preset: rules_lib.Preset | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
  on: On = "gradient",
) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` with Gradient Centralization: coupled L2, GC, then Adam.

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adam``.
    weight_decay: coupled L2 coefficient, added to the gradient before GC (the
      reference's ``Adam_GC``; its default is also 0).
    mask: which leaves weight decay applies to; None: all.
    rules, preset, strength, strict, on: as in :func:`optax_gc.with_centralization`
      (``on="update"``, GC2, keeps the fan-in mean of the weights fixed; GC on the
      gradient does not under Adam).

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
  return _gc(
    tx, weight_decay, mask, rules=rules, preset=preset, strength=strength, strict=strict, on=on
  )


def adamw_gc(
  learning_rate: optax.ScalarOrSchedule,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.999,
  eps: ArrayLike = 1e-8,
  eps_root: ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: Any = None,
  *,
  nesterov: bool = False,
  reference: AdamWReference | None = None,
  rules: rules_lib.RulesLike = (),
  preset: rules_lib.Preset | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
  on: On = "gradient",
) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` with Gradient Centralization: GC, Adam, then decoupled weight decay.

  The step is ``optax.adamw``'s, on the centred gradient, unless ``reference``
  asks for one of the reference implementation's (see the module's "Where this
  differs"). ``weight_decay`` keeps optax's default, 1e-4 (PyTorch's AdamW and
  the reference's ``AdamW_GC`` default to 1e-2).

  Args:
    learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
      nesterov: as in ``optax.adamw``.
    reference: None (default): ``optax.adamw``'s step. ``"cifar"``: the
      reference's ``AdamW_GC``, ``p -= lr * sqrt(1 - b2**t) / (1 - b1**t) *
      (m / (sqrt(v) + eps) + wd * p)``: decay scaled by the bias corrections,
      ``eps`` outside them. ``"algorithm_gc"``: its ``algorithm-GC`` AdamW,
      ``p -= lr / (1 - b1**t) * (m / (sqrt(v / (1 - b2**t)) + eps) + wd * p)``.
      Either keeps ``mask``, schedules and ``optax.adamw``'s state; neither
      takes ``nesterov=True`` or a nonzero ``eps_root`` (``ValueError``).
    rules, preset, strength, strict, on: as in :func:`optax_gc.with_centralization`
      (``on="update"``, GC2: decay included in what is centred, so the fan-in mean
      of the weights stays fixed).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state has
    ``optax.adamw``'s structure, whichever ``reference``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.adamw_gc(1e-3, weight_decay=0.1)
    >>> updates, _ = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> print(updates["kernel"][0])  # only the decay is left: -lr * wd * p
    [-0.0001 -0.0001]
    >>> tx = optax_gc.adamw_gc(1e-3, weight_decay=0.1, reference="cifar")
    >>> ref, _ = tx.update({"kernel": jnp.ones((3, 2))}, tx.init(params), params)
    >>> round(float(ref["kernel"][0, 0] / updates["kernel"][0, 0]), 4)  # sqrt(1 - b2) / (1 - b1)
    0.3162
  """
  _check_reference(reference, eps_root, nesterov)
  if reference is None:
    tx = optax.adamw(
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov
    )
  else:
    tx = _reference_adamw(learning_rate, b1, b2, eps, mu_dtype, weight_decay, mask, reference)
  return _gc(tx, 0.0, None, rules=rules, preset=preset, strength=strength, strict=strict, on=on)
