"""Training one config with and without GC over several seeds."""

import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_gc
from optax_gc.experiments import config as config_lib
from optax_gc.experiments import data, models

VARIANTS = ("baseline", "gc")


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
  """The selected optimizer's learning rate, constant or cosine-decayed over ``num_steps``."""
  lr = config[config.optimizer].learning_rate
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, config.num_steps)
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


def init_model(config: ml_collections.ConfigDict, ds: data.Dataset, seed: int):
  """Builds the config's model for ``seed``; returns ``(graphdef, params, rest)``."""
  kwargs = {k: v for k, v in config.model.items() if k != "kind"}
  model = models.make(config.model.kind, ds.x_train.shape[1:], ds.num_classes, seed, **kwargs)
  return nnx.split(model, nnx.Param, ...)


def gc_rules(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple:
  """The config's ``gc_rules``, then the rules ``optax_gc.rules_for`` derives from its model."""
  kwargs = {k: v for k, v in config.model.items() if k != "kind"}
  model = nnx.eval_shape(
    lambda: models.make(config.model.kind, ds.x_train.shape[1:], ds.num_classes, 0, **kwargs)
  )
  return (*config.gc_rules, *optax_gc.rules_for(model))


def make_functions(graphdef, tx: optax.GradientTransformation):
  """Jitted ``train_chunk`` (a ``lax.scan`` over a block of steps) and ``evaluate``."""

  def loss_and_logits(params, rest, x, y):
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  @jax.jit
  def train_chunk(params, opt_state, rest, x, y, idx):
    def step(carry, batch):
      params, opt_state = carry
      (loss, _), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(
        params, rest, x[batch], y[batch]
      )
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state, losses.mean()

  @jax.jit
  def evaluate(params, rest, x, y):
    loss, logits = loss_and_logits(params, rest, x, y)
    return loss, (logits.argmax(-1) == y).mean()

  return train_chunk, evaluate


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


def compare(config: ml_collections.ConfigDict, ds: data.Dataset) -> dict:
  """Trains every seed with and without GC; returns the curves, ready for JSON.

  Each seed's initial weights and batch order are shared by both variants, so
  the two runs of a seed differ only by GC. The test set is evaluated every
  ``eval_every`` steps and at the end; ``train_loss`` at an evaluation is the
  mean minibatch loss since the previous one.
  """
  seeds = list(range(config.first_seed, config.first_seed + config.seeds))
  bounds = list(range(0, config.num_steps, config.eval_every)) + [config.num_steps]
  chunks = list(zip(bounds[:-1], bounds[1:], strict=False))
  arrays = [jnp.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)]
  x, y, x_test, y_test = arrays
  graphdef = init_model(config, ds, seeds[0])[0]
  rules = gc_rules(config, ds)
  optimizers = {v: make_optimizer(config, v == "gc", rules) for v in VARIANTS}
  functions = {v: make_functions(graphdef, optimizers[v]) for v in VARIANTS}
  curves: dict[str, dict[str, list]] = {
    v: {"train_loss": [], "test_loss": [], "test_accuracy": [], "wall_s": []} for v in VARIANTS
  }

  label = optimizer_label(config)
  bar = tqdm(
    total=len(seeds) * len(VARIANTS) * config.num_steps,
    unit="step",
    file=sys.stderr,
    disable=not config.progress,
    dynamic_ncols=True,
  )
  with bar:
    for i, seed in enumerate(seeds):
      _, params0, rest = init_model(config, ds, seed)
      idx = jnp.asarray(batch_indices(len(ds.y_train), config.batch_size, config.num_steps, seed))
      for variant in VARIANTS:
        name = f"{label}{' + GC' if variant == 'gc' else ''}"
        bar.set_description(f"{name}, seed {i + 1}/{len(seeds)}")
        train_chunk, evaluate = functions[variant]
        params, opt_state = params0, optimizers[variant].init(params0)
        run: dict[str, list[float]] = {k: [] for k in ("train_loss", "test_loss", "test_accuracy")}
        start_time = time.perf_counter()
        for start, stop in chunks:
          params, opt_state, loss = train_chunk(params, opt_state, rest, x, y, idx[start:stop])
          test_loss, accuracy = evaluate(params, rest, x_test, y_test)
          run["train_loss"].append(float(loss))
          run["test_loss"].append(float(test_loss))
          run["test_accuracy"].append(float(accuracy))
          bar.set_postfix(test_acc=f"{float(accuracy):.3f}")
          bar.update(stop - start)
        curves[variant]["wall_s"].append(time.perf_counter() - start_time)
        for k, v in run.items():
          curves[variant][k].append(v)
  return {"steps": bounds[1:], "seeds": seeds, "label": label, "variants": curves}
