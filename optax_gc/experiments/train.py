"""Training one config with and without GC: every seed at once, divergence recorded.

The seeds of a run train together: their parameters are stacked and one
jitted, vmapped program steps them all, which on a CPU costs little more than
one seed. A seed whose training loss goes non-finite has diverged: the step is
recorded and its metrics from then on are what a diverged model gives (its
test accuracy is measured as it is; its losses are NaN).
"""

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
# Training runs in calls of about this many seconds each: a stop asked for (Ctrl-C, SIGTERM)
# is acted on between two calls, never inside XLA.
SECONDS_PER_CALL = 0.25


class Interrupted(Exception):
  """Training stopped when asked to (Ctrl-C, SIGTERM; see ``cli``), between two calls into XLA.

  ``results`` is what :func:`compare` returns, cut at the last evaluation both
  variants reached, with ``stopped`` saying where; None if none was reached.
  """

  def __init__(self, where: str, results: dict | None = None):
    super().__init__(where)
    self.results = results


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
  if config.optimizer == "muon":
    o = config.muon
    dims = optax_gc.muon_dimension_numbers(rules) if o.dims == "derived" else None
    muon = optax.contrib.muon(
      lr,
      beta=o.beta,
      adam_learning_rate=o.adam_learning_rate,
      muon_weight_dimension_numbers=dims,
    )
    return optax.chain(*l2, optax_gc.with_centralization(muon, **gc_args) if gc else muon)
  o = config.adam
  if gc:
    return optax_gc.adam_gc(lr, o.b1, o.b2, o.eps, weight_decay=wd, **gc_args)
  return optax.chain(*l2, optax.adam(lr, o.b1, o.b2, o.eps))


def optimizer_label(config: ml_collections.ConfigDict) -> str:
  """A short name for the optimizer: ``"SGD-momentum"``, ``"Adam"``, ``"Muon (derived)"``..."""
  if config.optimizer == "sgd":
    return "SGD-momentum" if config.sgd.momentum else "SGD"
  if config.optimizer == "muon":
    return f"Muon ({config.muon.dims})"
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
  """Jitted, vmapped over seeds: ``train_steps`` and ``evaluate``.

  ``train_steps(params, opt_state, rest, x, y, idx, start, stop)`` takes the
  steps ``start`` to ``stop - 1`` of ``idx``, each a row of example indices.
  ``start`` and ``stop`` are traced, so every range runs one compiled program.
  It returns the new params, optimizer state and model state (batch
  statistics), the sum of the steps' losses and the first step whose loss is
  not finite (-1: none).
  """

  def loss_fn(params, rest, x, y):
    model = nnx.merge(train_graph, params, rest, copy=True)  # its batch stats change here
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, _split(model)[2]

  def steps(params, opt_state, rest, x, y, idx, start, stop):
    def step(i, carry):
      params, opt_state, rest, total, bad = carry
      (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest, x[idx[i]], y[idx[i]]
      )
      updates, opt_state = tx.update(grads, opt_state, params)
      bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), i, bad)
      return optax.apply_updates(params, updates), opt_state, rest, total + loss, bad

    carry = (params, opt_state, rest, jnp.float32(0), jnp.int32(-1))
    return jax.lax.fori_loop(start, stop, step, carry)

  def evaluate(params, rest, x, y):
    logits = nnx.merge(eval_graph, params, rest, copy=True)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  train_steps = jax.jit(jax.vmap(steps, in_axes=(0, 0, 0, None, None, 0, None, None)))
  return train_steps, jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None)))


def prepare(config: ml_collections.ConfigDict):
  """Loads the data and checks the config against it and the model, before any training.

  Returns ``(dataset, plan)``; raises :class:`~optax_gc.experiments.config.UsageError`
  for a data or model field out of range, a batch larger than the training set,
  or a GC rule that names an axis a parameter lacks or matches no parameter.
  """
  try:
    ds = data.load(config.dataset, **config.data)
  except ValueError as e:
    raise config_lib.UsageError(f"--config.data.{e}") from None
  if config.batch_size > len(ds.y_train):
    raise config_lib.UsageError(
      f"--config.batch_size={config.batch_size}: larger than the training set "
      f"({len(ds.y_train)} examples); pass e.g. --config.batch_size={min(100, len(ds.y_train))}"
    )
  try:
    _, params, _ = init_model(config, ds, config.first_seed)
  except ValueError as e:
    raise config_lib.UsageError(f"--config.model.{e}") from None
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


def settings(config: ml_collections.ConfigDict) -> dict:
  """The fields that training depends on: two configs with the same ones train alike.

  Example:
    >>> from optax_gc.experiments.config import base_config
    >>> a, b = base_config(), base_config()
    >>> b.name, b.sgd.learning_rate = "other", 0.5  # the config trains with adam
    >>> settings(a) == settings(b)
    True
  """
  unused = {"name", "workdir", "progress", "target_loss"} | (
    set(config_lib.OPTIMIZERS) - {config.optimizer}
  )
  return {k: v for k, v in config.to_dict().items() if k not in unused}


def eval_steps(config: ml_collections.ConfigDict) -> list[int]:
  """The steps after which the test set is evaluated: every ``eval_every``, and the last.

  Example:
    >>> from optax_gc.experiments.config import base_config
    >>> c = base_config()
    >>> c.num_steps, c.eval_every = 25, 10
    >>> eval_steps(c)
    [10, 20, 25]
  """
  starts = range(0, config.num_steps, config.eval_every)
  return [min(s + config.eval_every, config.num_steps) for s in starts]


class _Arm:
  """One variant's training of every seed: its state, and its curves up to the last evaluation."""

  def __init__(self, initial: tuple, tx: optax.GradientTransformation, num_seeds: int):
    train_graph, eval_graph, self.params, self.rest = initial
    self.train_steps, self.evaluate = make_functions(train_graph, eval_graph, tx)
    self.opt_state = jax.vmap(tx.init)(self.params)
    self.curves: dict = {
      k: [[] for _ in range(num_seeds)] for k in ("train_loss", "test_loss", "test_accuracy")
    }
    self.diverged: list[int | None] = [None] * num_seeds
    self.wall_s = 0.0
    self.seconds_per_step = math.inf  # measured from each call (the first also compiles)

  def block(self, arrays: tuple, idx, start: int, count: int, interrupt, bar) -> bool:
    """Trains the ``count`` steps from ``start`` (rows of ``idx``), then evaluates.

    Returns False, leaving the curves as they were, if ``interrupt()`` says stop first.
    """
    x, y, x_test, y_test = arrays
    began = time.perf_counter()
    total, bad, done = np.zeros(len(self.diverged)), np.full(len(self.diverged), -1), 0
    while done < count:
      if interrupt():
        return False
      n = min(count - done, max(1, int(SECONDS_PER_CALL / self.seconds_per_step)))
      call = time.perf_counter()
      self.params, self.opt_state, self.rest, losses, first = _finish(
        self.train_steps, self.params, self.opt_state, self.rest, x, y, idx, done, done + n
      )
      self.seconds_per_step = (time.perf_counter() - call) / n
      total += np.asarray(losses, np.float64)
      bad = np.where(bad < 0, np.asarray(first), bad)
      done += n
      if bar is not None:
        bar.update(n)
    test_loss, accuracy = _finish(self.evaluate, self.params, self.rest, x_test, y_test)
    for i in range(len(self.diverged)):
      if self.diverged[i] is None and bad[i] >= 0:
        self.diverged[i] = start + int(bad[i]) + 1
      self.curves["train_loss"][i].append(float(total[i] / count))
      self.curves["test_loss"][i].append(float(test_loss[i]))
      self.curves["test_accuracy"][i].append(float(accuracy[i]))
    self.wall_s += time.perf_counter() - began
    return True

  def results(self, evaluations: int) -> dict:
    curves = {k: [run[:evaluations] for run in runs] for k, runs in self.curves.items()}
    return curves | {"diverged_at": list(self.diverged), "wall_s": self.wall_s}


def _finish(fn, *args):
  """``fn(*args)``, computed, on a helper thread.

  The main thread only waits, and a thread waiting on a lock still runs Python's
  signal handlers: a Ctrl-C is answered at once, where a wait inside XLA would
  hold it until the call returned.
  """
  with ThreadPoolExecutor(1) as pool:
    return pool.submit(lambda: jax.block_until_ready(fn(*args))).result()


def compare(config: ml_collections.ConfigDict, ds: data.Dataset, bar=None, interrupt=None) -> dict:
  """Trains every seed with and without GC; returns the curves, ready for JSON.

  Each seed's initial weights and batch order are shared by both variants, so
  the two runs of a seed differ only by GC. The variants take turns, a block of
  ``eval_every`` steps each, and the test set is evaluated after each block;
  ``train_loss`` at an evaluation is the mean minibatch loss since the previous
  one. ``bar`` (a tqdm bar) advances by the steps trained. ``interrupt()`` is
  asked about every :data:`SECONDS_PER_CALL` seconds; when it says stop,
  :class:`Interrupted` is raised with the curves up to the last evaluation.
  """
  interrupt = interrupt or (lambda: False)
  seeds = list(range(config.first_seed, config.first_seed + config.seeds))
  steps = eval_steps(config)
  rules = gc_rules(config, ds)
  initial = init_seeds(config, ds, seeds)  # both variants start from the same weights
  label = optimizer_label(config)
  arms = {v: _Arm(initial, make_optimizer(config, v == "gc", rules), len(seeds)) for v in VARIANTS}
  arrays = tuple(jnp.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
  idx = np.stack(
    [batch_indices(len(ds.y_train), config.batch_size, config.num_steps, s) for s in seeds]
  )
  width = steps[0]  # every block's rows padded to one shape: one compiled program
  if bar is not None:
    bar.set_description(f"{config.name}: {label}, no GC and GC")

  def results(evaluations: int) -> dict:
    curves = {v: arm.results(evaluations) for v, arm in arms.items()}
    return {"steps": steps[:evaluations], "seeds": seeds, "label": label, "variants": curves}

  for n, stop in enumerate(steps):
    start = n * width
    block = np.zeros((len(seeds), width, config.batch_size), np.int32)
    block[:, : stop - start] = idx[:, start:stop]
    for arm in arms.values():
      if not arm.block(arrays, jnp.asarray(block), start, stop - start, interrupt, bar):
        where = f"step {start} of {config.num_steps}"
        kept = results(n) | {"stopped": f"interrupted at {where}"} if n else None
        raise Interrupted(where, kept)
    if bar is not None:
      base, gc = (np.mean([run[-1] for run in a.curves["test_accuracy"]]) for a in arms.values())
      bar.set_postfix_str(f"test accuracy: no GC {base:.3f}, GC {gc:.3f}")
  return results(len(steps)) | {"stopped": None}


def progress_bar(total: int, disable: bool):
  """One tqdm bar over ``total`` training steps, on stderr."""
  from tqdm import tqdm

  return tqdm(total=total, unit="step", file=sys.stderr, disable=disable, dynamic_ncols=True)


def steps_of(config: ml_collections.ConfigDict) -> int:
  """Training steps of one comparison (both variants, all seeds at once), for a progress bar."""
  return len(VARIANTS) * config.num_steps
