"""Training one config with and without GC: every seed at once, divergence recorded.

The seeds of a run train together: their parameters are stacked and one
jitted, vmapped program steps them all, which on a CPU costs little more than
one seed. A seed whose training loss goes non-finite has diverged: the step is
recorded and its metrics from then on are what a diverged model gives (its
test accuracy is measured as it is; its losses are NaN).
"""

import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import optax_gc
from optax_gc.experiments import config as config_lib
from optax_gc.experiments import data, models

VARIANTS = ("baseline", "gc")


class Interrupted(Exception):
  """Raised between two chunks of training steps after Ctrl-C (see ``cli``)."""


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
  """The selected optimizer's learning rate: constant, cosine-decayed, or stepped.

  ``"step"`` multiplies it by 0.1 at half and at three quarters of the steps.

  Example:
    >>> from optax_gc.experiments.config import base_config
    >>> c = base_config()
    >>> c.optimizer, c.schedule, c.num_steps = "sgd", "step", 100
    >>> schedule = learning_rate(c)
    >>> [round(float(schedule(t)), 4) for t in (0, 49, 50, 75)]
    [0.1, 0.1, 0.01, 0.001]
  """
  lr = config[config.optimizer].learning_rate
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, config.num_steps)
  if config.schedule == "step":
    bounds = {config.num_steps // 2: 0.1, (3 * config.num_steps) // 4: 0.1}
    return optax.piecewise_constant_schedule(lr, bounds)
  return lr


def make_optimizer(
  config: ml_collections.ConfigDict, gc: bool, rules=None
) -> optax.GradientTransformation:
  """The config's optimizer: the paper's ``optax_gc.sgd_gc``/``adam_gc``, or the same without GC.

  Both apply coupled L2 (``g + weight_decay * p``) first, as the paper does;
  with GC the gradient is then centralized before momentum or Adam's moments.
  ``rules`` (default: the config's ``gc_rules``) decide the fan-in axes; the
  runner passes :func:`gc_rules`'s, derived from the model.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_gc.experiments.config import base_config
    >>> c = base_config()
    >>> c.optimizer, c.weight_decay = "sgd", 0.0
    >>> params = {"kernel": jnp.ones((2, 1))}
    >>> grads = {"kernel": jnp.array([[1.0], [3.0]])}
    >>> for gc in (False, True):
    ...   tx = make_optimizer(c, gc)
    ...   print(tx.update(grads, tx.init(params), params)[0]["kernel"].ravel())
    [-0.1 -0.3]
    [ 0.1 -0.1]
  """
  lr, wd = learning_rate(config), config.weight_decay
  l2 = [optax.add_decayed_weights(wd)] if wd else []
  rules = tuple(config.gc_rules) if rules is None else rules
  gc_args = {"rules": rules, "preset": config_lib.preset(config)}
  if config.optimizer == "sgd":
    o = config.sgd
    if gc:
      return optax_gc.sgd_gc(lr, o.momentum or None, o.nesterov, weight_decay=wd, **gc_args)
    return optax.chain(*l2, optax.sgd(lr, o.momentum or None, o.nesterov))
  o = config.adam
  if gc:
    return optax_gc.adam_gc(lr, o.b1, o.b2, o.eps, weight_decay=wd, **gc_args)
  return optax.chain(*l2, optax.adam(lr, o.b1, o.b2, o.eps))


def optimizer_label(config: ml_collections.ConfigDict) -> str:
  """A short name for the config's optimizer: ``"SGD-momentum"``, ``"SGD"`` or ``"Adam"``."""
  if config.optimizer == "sgd":
    return "SGD-momentum" if config.sgd.momentum else "SGD"
  return "Adam"


def batch_indices(n: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
  """The ``(num_steps, batch_size)`` example indices: one reshuffle per pass over the data.

  Example:
    >>> idx = batch_indices(4, 2, 4, seed=0)
    >>> idx.shape, sorted(idx[:2].ravel().tolist())
    ((4, 2), [0, 1, 2, 3])
  """
  rng = np.random.default_rng(seed)
  passes = -(-num_steps * batch_size // n)
  order = np.concatenate([rng.permutation(n) for _ in range(passes)])
  return order[: num_steps * batch_size].reshape(num_steps, batch_size).astype(np.int32)


def build_model(config: ml_collections.ConfigDict, ds: data.Dataset, seed: int) -> nnx.Module:
  """The config's model, initialised from ``seed``."""
  kwargs = {k: v for k, v in config.model.items() if k != "kind"}
  return models.make(config.model.kind, ds.x_train.shape[1:], ds.num_classes, seed, **kwargs)


def init_model(config: ml_collections.ConfigDict, ds: data.Dataset, seed: int):
  """Builds the config's model for ``seed``; returns ``(graphdef, params, rest)``."""
  return _split(build_model(config, ds, seed))


def gc_rules(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple:
  """The config's ``gc_rules``, then the rules ``optax_gc.rules_for`` derives from its model."""
  model = nnx.eval_shape(lambda: build_model(config, ds, 0))
  x = jax.ShapeDtypeStruct((2, *ds.x_train.shape[1:]), ds.x_train.dtype)
  return (*config.gc_rules, *optax_gc.rules_for(model, x))


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def init_seeds(config: ml_collections.ConfigDict, ds: data.Dataset, seeds: list[int]):
  """``(train_graph, eval_graph, params, rest)``, params and rest stacked over ``seeds``.

  The eval graph runs batch norm on its running averages (``model.eval()``).
  """
  built = [build_model(config, ds, s) for s in seeds]
  splits = [_split(m) for m in built]
  built[0].eval()
  return (
    splits[0][0],
    _split(built[0])[0],
    _stack([split[1] for split in splits]),
    _stack([split[2] for split in splits]),
  )


def _split(model: nnx.Module) -> tuple:
  """``(graphdef, params, rest)``: the parameters apart from everything else (batch statistics)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
  return graphdef, params, rest


def make_functions(train_graph, eval_graph, tx: optax.GradientTransformation):
  """Jitted, vmapped over seeds: ``train_chunk`` (a scan over steps) and ``evaluate``.

  ``train_chunk(params, opt_state, rest, x, y, idx)`` returns the new params,
  optimizer state and model state (batch statistics) and every step's loss.
  """

  def loss_fn(params, rest, x, y):
    model = nnx.merge(train_graph, params, rest, copy=True)  # its batch stats change here
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, _split(model)[2]

  def chunk(params, opt_state, rest, x, y, idx):
    def step(carry, batch):
      params, opt_state, rest = carry
      (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest, x[batch], y[batch]
      )
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, rest), loss

    (params, opt_state, rest), losses = jax.lax.scan(step, (params, opt_state, rest), idx)
    return params, opt_state, rest, losses

  def evaluate(params, rest, x, y):
    logits = nnx.merge(eval_graph, params, rest, copy=True)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  train_chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, None, 0)))
  return train_chunk, jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None)))


def prepare(config: ml_collections.ConfigDict):
  """Loads the data and checks the GC rules against the model, before any training.

  Returns ``(dataset, plan)``; raises :class:`~optax_gc.experiments.config.UsageError`
  when a GC rule names an axis a parameter lacks or matches no parameter.
  """
  ds = data.load(config.dataset, **config.data)
  _, params, _ = init_model(config, ds, config.first_seed)
  rules = gc_rules(config, ds)
  try:
    plan = optax_gc.explain(params, rules, preset=config_lib.preset(config))
  except ValueError as e:
    raise config_lib.UsageError(f"--config.gc_rules: {e}") from e
  if plan.unused_rules:
    names = ", ".join(r.name for r in plan.unused_rules)
    raise config_lib.UsageError(
      f"--config.gc_rules: {names} matched no parameter; fix the pattern "
      f"(paths look like {plan.rows[0].path!r})"
    )
  return ds, plan


def _first_nonfinite(losses: np.ndarray) -> int | None:
  bad = np.flatnonzero(~np.isfinite(losses))
  return int(bad[0]) if bad.size else None


def train_arm(
  config: ml_collections.ConfigDict,
  ds: data.Dataset,
  seeds: list[int],
  initial: tuple,
  tx: optax.GradientTransformation,
  on_chunk: Callable[[int, float], None] = lambda steps, accuracy: None,
  interrupt: Callable[[], bool] = lambda: False,
) -> dict:
  """Trains every seed with ``tx`` from ``initial`` (:func:`init_seeds`'s); returns the curves.

  The curves have one list per seed, and each seed's divergence step.
  ``on_chunk(steps, mean test accuracy)`` is called after each block of
  ``eval_every`` steps; ``interrupt()`` is asked before each, and raises
  :class:`Interrupted` when it says so.
  """
  train_graph, eval_graph, params, rest = initial
  train_chunk, evaluate = make_functions(train_graph, eval_graph, tx)
  x, y, x_test, y_test = (jnp.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
  idx = np.stack(
    [batch_indices(len(ds.y_train), config.batch_size, config.num_steps, s) for s in seeds]
  )
  opt_state = jax.vmap(tx.init)(params)
  curves: dict = {k: [[] for _ in seeds] for k in ("train_loss", "test_loss", "test_accuracy")}
  diverged: list[int | None] = [None] * len(seeds)
  start_time = time.perf_counter()
  for start in range(0, config.num_steps, config.eval_every):
    if interrupt():
      raise Interrupted(f"step {start} of {config.num_steps}")
    stop = min(start + config.eval_every, config.num_steps)
    params, opt_state, rest, losses = train_chunk(
      params, opt_state, rest, x, y, jnp.asarray(idx[:, start:stop])
    )
    test_loss, accuracy = evaluate(params, rest, x_test, y_test)
    losses, test_loss, accuracy = (np.asarray(a) for a in (losses, test_loss, accuracy))
    for i in range(len(seeds)):
      first = _first_nonfinite(losses[i])
      if diverged[i] is None and first is not None:
        diverged[i] = start + first + 1
      curves["train_loss"][i].append(float(losses[i].mean()))
      curves["test_loss"][i].append(float(test_loss[i]))
      curves["test_accuracy"][i].append(float(accuracy[i]))
    on_chunk(stop - start, float(accuracy.mean()))
  curves["diverged_at"] = diverged
  curves["wall_s"] = time.perf_counter() - start_time
  return curves


def compare(config: ml_collections.ConfigDict, ds: data.Dataset, bar=None, interrupt=None) -> dict:
  """Trains every seed with and without GC; returns the curves, ready for JSON.

  Each seed's initial weights and batch order are shared by both variants, so
  the two runs of a seed differ only by GC. The test set is evaluated every
  ``eval_every`` steps and at the end; ``train_loss`` at an evaluation is the
  mean minibatch loss since the previous one. ``bar`` (a tqdm bar) advances by
  the steps trained; ``interrupt()`` stops training between evaluations.
  """
  seeds = list(range(config.first_seed, config.first_seed + config.seeds))
  bounds = range(0, config.num_steps, config.eval_every)
  steps = [min(s + config.eval_every, config.num_steps) for s in bounds]
  rules = gc_rules(config, ds)
  initial = init_seeds(config, ds, seeds)  # both variants start from the same weights
  label = optimizer_label(config)
  curves = {}
  for variant in VARIANTS:
    tx = make_optimizer(config, variant == "gc", rules)

    def on_chunk(n, accuracy, variant=variant):
      if bar is not None:
        bar.set_description(f"{config.name}: {label}{' + GC' if variant == 'gc' else ''}")
        bar.set_postfix(test_acc=f"{accuracy:.3f}")
        bar.update(n)

    curves[variant] = train_arm(
      config, ds, seeds, initial, tx, on_chunk, interrupt or (lambda: False)
    )
  return {"steps": steps, "seeds": seeds, "label": label, "variants": curves}


def progress_bar(total: int, disable: bool):
  """One tqdm bar over ``total`` training steps, on stderr."""
  from tqdm import tqdm

  return tqdm(total=total, unit="step", file=sys.stderr, disable=disable, dynamic_ncols=True)


def steps_of(config: ml_collections.ConfigDict) -> int:
  """Training steps of one comparison (both variants, all seeds at once), for a progress bar."""
  return len(VARIANTS) * config.num_steps
