"""The overhead of gradient centralization, measured as ratios in one process.

Four parts, each comparing optimizers with and without GC on the same machine in
the same process, interleaving the variants round by round so that load from
other processes hits every variant alike:

1. ``update``: the optimizer update alone, jitted with donated buffers, on a
   ResNet-50-shaped and a Transformer-shaped Flax parameter pytree (or, with
   ``--pytrees``, on pytrees of kernels of one shape).
2. ``train``: a whole train step (forward, backward, update) of a small CNN and
   a small Transformer (needs flax: ``pip install optax_gc[experiments]``).
3. ``compile``: trace and compile time of a jitted update of a many-leaf pytree.
4. ``memory``: XLA's temporary buffer bytes for the jitted update and the
   optimizer state bytes, with and without GC.

Times are medians over rounds; a ratio is the median over rounds of the
variant's time divided by its base's time in the same round. Besides
``optax.centralize``, the update and memory parts time ``plain_centralize``,
GC as it is usually written (``g - jnp.mean(g, axes)``, without optax_gc's
overflow guards), as a reference for what a column-mean GC costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from optax_gc._src import rules as rules_lib
from optax_gc._src.tree import map_fan_in

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
PARTS = ("update", "train", "compile", "memory")
NAMED_PYTREES = ("resnet50", "transformer")
# nn.scan stacks the MLP kernels as (layers, in, out): average over `in` only.
# The preset's attention entries already use negative axes, so they need no rule.
TRANSFORMER_RULES = ((r"layers/mlp/[^/]+/kernel$", (-2,)),)
BASELINE = "optax.centralize + adamw"
GC = "optax_gc.centralize + adamw"
GC_DERIVED = "optax_gc.centralize(rules_for(model)) + adamw"
PLAIN = "plain jnp.mean GC + adamw (unguarded)"
COPY = "copy (x + 1, donated)"
# --variants keys: the update and memory parts' variants by short name.
VARIANTS = {
  "adamw": "adamw",
  "optax_centralize": BASELINE,
  "centralize": GC,
  "plain": PLAIN,
  "with_centralization": "with_centralization(adamw)",
  "adamw_gc": "adamw_gc",
  "adam": "adam",
  "adam_gc": "adam_gc",
}

# ---------------------------------------------------------------------------
# Parameter pytrees, in Flax layout, as shapes.


def _sds(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def resnet50_shapes(scale: float = 1.0, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> dict:
  """ResNet-50 in Flax layout: 161 leaves, 25.6M parameters at ``scale=1``.

  ``scale`` multiplies the parameter count (every width by its square root);
  ``blocks`` is the number of bottleneck blocks in each of the four stages.

  Example:
    >>> import jax
    >>> shapes = resnet50_shapes()
    >>> len(jax.tree.leaves(shapes)), shapes["params"]["layer4"]["block0"]["conv2"]["kernel"].shape
    (161, (3, 3, 512, 512))
  """
  f = math.sqrt(scale)

  def w(n: int) -> int:
    return max(1, round(n * f))

  def conv_bn(k: int, cin: int, cout: int) -> tuple[dict, dict]:
    return {"kernel": _sds(k, k, cin, cout)}, {"scale": _sds(cout), "bias": _sds(cout)}

  params: dict[str, Any] = {}
  params["conv1"], params["bn1"] = conv_bn(7, 3, w(64))
  cin = w(64)
  for stage, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), 1):
    layer = {}
    for b in range(n_blocks):
      mid, out = w(width), w(4 * width)
      block: dict[str, Any] = {}
      block["conv1"], block["bn1"] = conv_bn(1, cin, mid)
      block["conv2"], block["bn2"] = conv_bn(3, mid, mid)
      block["conv3"], block["bn3"] = conv_bn(1, mid, out)
      if b == 0:
        block["downsample_conv"], block["downsample_bn"] = conv_bn(1, cin, out)
      layer[f"block{b}"] = block
      cin = out
    if layer:
      params[f"layer{stage}"] = layer
  params["fc"] = {"kernel": _sds(cin, w(1000)), "bias": _sds(w(1000))}
  return {"params": params}


def transformer_shapes(scale: float = 1.0, layers: int = 12) -> dict:
  """A decoder stacked by ``nn.scan``: 100M parameters at ``scale=1``.

  Embedding (20000, 768) tied to the output; each of ``layers`` layers has
  attention q/k/v kernels (768, 12, 64), an output kernel (12, 64, 768), an
  MLP 768 -> 3072 -> 768 and two LayerNorms, stacked along a leading axis.
  ``scale`` multiplies the parameter count (every width by its square root).
  """
  f = math.sqrt(scale)
  d, mlp, vocab = (max(1, round(n * f)) for n in (768, 3072, 20000))
  heads, hd = (max(1, round(n * math.sqrt(f))) for n in (12, 64))
  L = layers
  attention = {
    name: {"kernel": _sds(L, d, heads, hd), "bias": _sds(L, heads, hd)}
    for name in ("query", "key", "value")
  }
  attention["out"] = {"kernel": _sds(L, heads, hd, d), "bias": _sds(L, d)}
  stack = {
    "ln1": {"scale": _sds(L, d), "bias": _sds(L, d)},
    "attention": attention,
    "ln2": {"scale": _sds(L, d), "bias": _sds(L, d)},
    "mlp": {
      "Dense_0": {"kernel": _sds(L, d, mlp), "bias": _sds(L, mlp)},
      "Dense_1": {"kernel": _sds(L, mlp, d), "bias": _sds(L, d)},
    },
  }
  return {
    "params": {
      "embed": {"embedding": _sds(vocab, d)},
      "layers": stack,
      "final_ln": {"scale": _sds(d), "bias": _sds(d)},
    }
  }


def uniform_shapes(shape: tuple[int, ...], params: int) -> dict:
  """Kernels ``layer{i}/kernel`` all of one ``shape``, about ``params`` parameters in all.

  To see how GC's cost depends on the size of a leaf (``--pytrees 2304x256``).

  Example:
    >>> import jax
    >>> len(jax.tree.leaves(uniform_shapes((2304, 256), 25_600_000)))
    43
  """
  n = max(1, round(params / math.prod(shape)))
  return {"params": {f"layer{i}": {"kernel": _sds(*shape)} for i in range(n)}}


def many_leaves_shapes(leaves: int = 2000) -> dict:
  """Blocks of a conv kernel, its norm scale and bias, a Dense kernel and bias."""
  block = {
    "conv": {"kernel": _sds(3, 3, 16, 16)},
    "norm": {"scale": _sds(16), "bias": _sds(16)},
    "dense": {"kernel": _sds(64, 64), "bias": _sds(64)},
  }
  return {"params": {f"block{i}": block for i in range(max(1, leaves // 5))}}


def many_leaves_rules(leaves: int = 2000):
  """``optax_gc.rules_for`` of a linen model whose parameters are ``many_leaves_shapes``'s."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, y):
      x = nn.LayerNorm(name="norm")(nn.Conv(16, (3, 3), use_bias=False, name="conv")(x))
      return x, nn.Dense(64, name="dense")(y)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, y):
      for i in range(max(1, leaves // 5)):
        x, y = Block(name=f"block{i}")(x, y)
      return x, y

  inputs = (
    jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32),
    jax.ShapeDtypeStruct((1, 64), jnp.float32),
  )
  return optax_gc.rules_for(Model(), *inputs)


def _size(tree: Any) -> tuple[int, int]:
  leaves = jax.tree.leaves(tree)
  return len(leaves), sum(math.prod(x.shape) for x in leaves)


def _nbytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def step_bytes(shapes: Any, rules, variant: str) -> int:
  """The bytes one update step of ``variant`` must move, at the least.

  adamw (and adam) read each leaf's gradient, parameter and two moments and
  write the parameter and the moments: 7 passes over the pytree. GC adds one
  read of each leaf it centres: the leaves optax_gc's plan gives axes to, or,
  for ``optax.centralize``, every leaf with 2 or more dimensions.

  Example:
    >>> shapes = {"Dense_0": {"kernel": _sds(4, 3), "bias": _sds(3)}}  # 48 + 12 bytes
    >>> step_bytes(shapes, (), "adamw"), step_bytes(shapes, (), GC)
    (420, 468)
  """
  leaves = jax.tree.leaves(shapes)
  if variant in ("adamw", "adam"):
    centred = 0
  elif variant == BASELINE:
    centred = _nbytes([x for x in leaves if len(x.shape) > 1])
  else:
    plan = optax_gc.explain(shapes, rules).rows
    centred = sum(
      math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in plan if r.axes is not None
    )
  return 7 * _nbytes(leaves) + centred


def _copy_runner(nbytes: int) -> Callable[[int], None]:
  """Returns ``run(n)``: ``n`` donated ``x + 1`` over ``nbytes`` of float32, a streaming copy."""
  box = [jnp.zeros(max(1, nbytes // 4), jnp.float32)]
  add1 = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(box[0]).compile()

  def run(n: int) -> None:
    x = box[0]
    for _ in range(n):
      x = add1(x)
    box[0] = jax.block_until_ready(x)

  return run


def _materialize(shapes: Any, seed: int, std: float) -> Any:
  """Normal arrays of the given shapes, drawn by NumPy (jax would compile once per shape)."""
  rng = np.random.default_rng(seed)

  def draw(x):
    return jnp.asarray(std * rng.standard_normal(x.shape, np.float32), x.dtype)

  return jax.tree.map(draw, shapes)


# ---------------------------------------------------------------------------
# Variants and timing.


def plain_centralize(rules=()) -> optax.GradientTransformation:
  """GC as it is usually written, ``g - jnp.mean(g, axes, keepdims=True)``: a cost reference.

  Same axes as ``optax_gc.centralize(rules)``, decided by the same function,
  without its guards: float32 gradients near 1e37 make the mean overflow to
  inf, and ``jnp.mean`` leaves the reduction's form to XLA. The benchmark uses
  it to show what the guarded arithmetic costs; do not train with it.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]])}
    >>> print(plain_centralize().update(g, optax.EmptyState())[0]["kernel"])
    [[-1.  1.]
     [ 1. -1.]]
  """
  compiled = rules_lib.compile_rules(rules)

  def plain(g, axes):
    return g - jnp.mean(g, axes, keepdims=True)

  def update(updates, state, params=None):
    del params
    return map_fan_in(plain, updates, compiled), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def update_variants(
  rules=(), keys: tuple[str, ...] | None = None
) -> dict[str, tuple[str, optax.GradientTransformation]]:
  """Optimizers to compare, each as ``name: (base name, transformation)``.

  ``keys`` (of ``VARIANTS``) selects some, with their bases; None: all.

  Example:
    >>> list(update_variants(keys=("centralize", "adam_gc")))
    ['adamw', 'optax_gc.centralize + adamw', 'adam', 'adam_gc']
  """
  adamw = partial(optax.adamw, LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  variants = {
    "adamw": ("adamw", adamw()),
    BASELINE: ("adamw", optax.chain(optax.centralize(), adamw())),
    GC: ("adamw", optax.chain(optax_gc.centralize(rules), adamw())),
    PLAIN: ("adamw", optax.chain(plain_centralize(rules), adamw())),
    "with_centralization(adamw)": ("adamw", optax_gc.with_centralization(adamw(), rules)),
    "adamw_gc": ("adamw", optax_gc.adamw_gc(LEARNING_RATE, weight_decay=WEIGHT_DECAY, rules=rules)),
    "adam": ("adam", optax.adam(LEARNING_RATE)),
    "adam_gc": ("adam", optax_gc.adam_gc(LEARNING_RATE, rules=rules)),
  }
  if keys is None:
    return variants
  wanted = {VARIANTS[k] for k in keys}
  wanted |= {variants[name][0] for name in wanted}
  return {name: v for name, v in variants.items() if name in wanted}


def _update_step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _runner(compiled, params, state, *args) -> Callable[[int], None]:
  """Returns ``run(n)``: ``n`` steps of ``compiled``, threading donated params and state."""
  box = [params, state]

  def run(n: int) -> None:
    p, s = box
    for _ in range(n):
      p, s = compiled(p, s, *args)[:2]
    jax.block_until_ready((p, s))
    box[:] = p, s

  return run


def interleave(
  runners: dict[str, Callable[[int], None]], rounds: int, target_s: float = 0.2
) -> dict[str, list[float]]:
  """Seconds per step of each runner, one entry a round, variants interleaved.

  Every runner is warmed up, then takes the same number of steps per round
  (enough for about ``target_s`` seconds); the order rotates from round to round.
  """
  names = list(runners)
  for run in runners.values():
    run(1)
  t0 = time.perf_counter()
  runners[names[0]](1)
  inner = max(1, round(target_s / (time.perf_counter() - t0)))
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t0 = time.perf_counter()
      runners[name](inner)
      times[name].append((time.perf_counter() - t0) / inner)
  return times


def _ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
  """Median and quartiles of the per-round ratios a / b."""
  q = np.quantile(np.asarray(a) / np.asarray(b), [0.5, 0.25, 0.75])
  return float(q[0]), float(q[1]), float(q[2])


def summarize(times: dict[str, list[float]], bases: dict[str, str]) -> list[dict]:
  """One row a variant: median ms, and ratios to its base and to optax.centralize."""
  rows = []
  for name, t in times.items():
    row = {"variant": name, "base": bases[name], "median_ms": 1e3 * statistics.median(t)}
    row["vs_base"], row["vs_base_q25"], row["vs_base_q75"] = _ratio(t, times[bases[name]])
    if BASELINE in times:
      row["vs_optax_centralize"] = _ratio(t, times[BASELINE])[0]
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# The four parts.


def bench_update(
  shapes: dict,
  rules,
  rounds: int,
  target_s: float = 0.2,
  keys: tuple[str, ...] | None = None,
  memory_out: dict | None = None,
) -> list[dict]:
  """Part 1: the jitted optimizer update alone, params and state donated.

  Besides the times and ratios, each row has ``gbps``, the bytes the step must
  move (``step_bytes``) per second, and ``vs_copy``, that bandwidth over a
  streaming copy's (``x + 1`` on a donated buffer the size of the parameters,
  interleaved with the variants; it reads and writes each byte once).
  ``memory_out``, if given, receives each compiled step's ``memory_analysis()``
  by variant, so that part 4 need not compile the same steps again.
  """
  grads = _materialize(shapes, 1, 1.0)
  runners, bases = {}, {}
  for name, (base, tx) in update_variants(rules, keys).items():
    p = _materialize(shapes, 0, 0.02)  # fresh buffers: each variant donates its own
    state = jax.jit(tx.init)(p)
    step = jax.jit(partial(_update_step, tx), donate_argnums=(0, 1))
    compiled = step.lower(p, state, grads).compile()
    if memory_out is not None:
      memory_out[name] = compiled.memory_analysis()
    runners[name] = _runner(compiled, p, state, grads)
    bases[name] = base
  total = _nbytes(shapes)
  runners[COPY] = _copy_runner(total)
  times = interleave(runners, rounds, target_s)
  copy = times.pop(COPY)
  copy_gbps = 2 * total / statistics.median(copy) / 1e9
  rows = summarize(times, bases)
  for row in rows:
    moved = step_bytes(shapes, rules, row["variant"])
    row["gbps"] = moved / statistics.median(times[row["variant"]]) / 1e9
    row["copy_gbps"] = copy_gbps
    row["vs_copy"] = _ratio(copy, times[row["variant"]])[0] * moved / (2 * total)
  return rows


def bench_memory(
  shapes: dict, rules, keys: tuple[str, ...] | None = None, compiled_stats: dict | None = None
) -> list[dict]:
  """Part 4: XLA temp bytes of the jitted update, and the optimizer state bytes.

  ``compiled_stats``: ``memory_analysis()`` results by variant already at hand
  (from part 1); the other variants are compiled here.
  """
  largest = max(_nbytes(x) for x in jax.tree.leaves(shapes))
  rows = []
  for name, (base, tx) in update_variants(rules, keys).items():
    state = jax.eval_shape(tx.init, shapes)
    if compiled_stats is not None and name in compiled_stats:
      stats = compiled_stats[name]
    else:
      step = jax.jit(partial(_update_step, tx), donate_argnums=(0, 1))
      stats = step.lower(shapes, state, shapes).compile().memory_analysis()
    temp = stats.temp_size_in_bytes if stats is not None else -1
    rows.append(
      {
        "variant": name,
        "base": base,
        "state_bytes": _nbytes(state),
        "temp_bytes": temp,
        "largest_leaf_bytes": largest,
      }
    )
  by_name = {row["variant"]: row for row in rows}
  for row in rows:
    base = by_name[row["base"]]
    row["extra_state_bytes"] = row["state_bytes"] - base["state_bytes"]
    row["extra_temp_bytes"] = row["temp_bytes"] - base["temp_bytes"]
  return rows


def bench_compile(leaves: int, rounds: int, trace_only: bool = False) -> list[dict]:
  """Part 3: trace+lower and compile seconds of a jitted update of a many-leaf pytree.

  With ``trace_only``, XLA's compile is skipped: the trace is where optax_gc
  decides each leaf's axes (its planning cost), and it stays affordable for
  10,000 leaves, where XLA's compile of even plain adamw takes minutes.
  """
  shapes = many_leaves_shapes(leaves)
  derived = many_leaves_rules(leaves)
  adamw = partial(optax.adamw, LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  factories = {
    "adamw": adamw,
    BASELINE: lambda: optax.chain(optax.centralize(), adamw()),
    GC: lambda: optax.chain(optax_gc.centralize(), adamw()),
    GC_DERIVED: lambda: optax.chain(optax_gc.centralize(derived), adamw()),
  }
  times: dict[str, dict[str, list[float]]] = {
    k: {n: [] for n in factories} for k in ("trace", "compile", "total")
  }
  names = list(factories)
  for r in range(rounds + 1):
    # Round 0, on a 10-leaf tree and untimed, warms jax's caches of jnp functions;
    # the order of the variants rotates from round to round.
    tree = many_leaves_shapes(10) if r == 0 else shapes
    for name in names[r % len(names) :] + names[: r % len(names)]:
      # Cold: optax_gc's per-leaf decisions are cached across calls; a real
      # program compiles its step once, so each round starts without them.
      rules_lib.decide.cache_clear()
      tx = factories[name]()
      state = jax.eval_shape(tx.init, tree)
      # A fresh function each time, so that nothing is reused from a cache.
      step = jax.jit(lambda p, s, g, tx=tx: _update_step(tx, p, s, g), donate_argnums=(0, 1))
      t0 = time.perf_counter()
      lowered = step.lower(tree, state, tree)
      t1 = time.perf_counter()
      if not trace_only:
        lowered.compile()
      t2 = time.perf_counter()
      if r:
        times["trace"][name].append(t1 - t0)
        times["compile"][name].append(t2 - t1)
        times["total"][name].append(t2 - t0)
  bases = {name: "adamw" for name in factories}
  rows = []
  for what, t in times.items():
    if trace_only and what != "trace":
      continue
    for row in summarize(t, bases):
      rows.append({"phase": what, **row, "leaves": _size(shapes)[0]})
  return rows


def _train_models(batch: int, width: int, d_model: int, seq_len: int, depth: int = 2):
  """A small CNN and a small Transformer (flax linen), each with a batch and a loss."""
  try:
    import flax.linen as nn
  except ImportError as e:
    raise SystemExit(
      "The train part needs flax: pip install 'optax_gc[experiments]', "
      "or leave it out with --parts update,compile,memory."
    ) from e

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      for mult in (1, 2, 4)[: depth + 1]:
        x = nn.relu(nn.Conv(width * mult, (3, 3))(x))
        x = nn.relu(nn.Conv(width * mult, (3, 3), strides=2)(x))
      return nn.Dense(10)(x.mean((1, 2)))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(4, name="attention")(h, h, mask=mask)
      h = nn.Dense(4 * d_model)(nn.LayerNorm()(x))
      return x + nn.Dense(d_model)(nn.gelu(h))

  class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(512, d_model, name="embed")
      x = embed(tokens)
      for _ in range(depth):
        x = Block()(x)
      return embed.attend(nn.LayerNorm()(x))

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch))
  tokens = jnp.asarray(rng.integers(0, 512, (batch, seq_len + 1)))

  def cnn_loss(params, batch):
    logits = CNN().apply(params, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  def transformer_loss(params, tokens):
    logits = Transformer().apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  key = jax.random.key(0)
  return {
    # Shapes by tracing, values from NumPy: compiling the models' init would take
    # longer than the benchmark at tiny sizes, and timing does not depend on them.
    "cnn": (
      _materialize(jax.eval_shape(CNN().init, key, images), 2, 0.05),
      (images, labels),
      cnn_loss,
    ),
    "transformer": (
      _materialize(jax.eval_shape(Transformer().init, key, tokens[:, :-1]), 3, 0.05),
      tokens,
      transformer_loss,
    ),
  }


def _train_step(tx, loss_fn, params, state, batch):
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def bench_train(
  rounds: int,
  batch: int,
  width: int,
  d_model: int,
  seq_len: int,
  target_s: float = 0.2,
  depth: int = 2,
) -> dict:
  """Part 2: a whole jitted train step, with and without GC."""
  results = {}
  for model, (params, data, loss_fn) in _train_models(
    batch, width, d_model, seq_len, depth
  ).items():
    variants = update_variants()
    runners, bases = {}, {}
    for name in ("adamw", BASELINE, GC):
      base, tx = variants[name]
      p = jax.tree.map(jnp.copy, params)
      state = jax.jit(tx.init)(p)
      step = jax.jit(partial(_train_step, tx, loss_fn), donate_argnums=(0, 1))
      runners[name] = _runner(step.lower(p, state, data).compile(), p, state, data)
      bases[name] = base
    n_leaves, n_params = _size(params)
    results[model] = {
      "leaves": n_leaves,
      "params": n_params,
      "rows": summarize(interleave(runners, rounds, target_s), bases),
    }
  return results


# ---------------------------------------------------------------------------
# Report.


def machine() -> dict:
  """CPU model, core count and library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
  }


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _time_table(rows: list[dict]) -> str:
  bandwidth = all("gbps" in r for r in rows)
  return _table(
    ["variant", "median ms", "x base", "base quartiles", "x optax.centralize"]
    + (["GB/s", "x copy's GB/s"] if bandwidth else []),
    [
      [
        r["variant"],
        f"{r['median_ms']:.3f}",
        f"{r['vs_base']:.3f} ({r['base']})",
        f"{r['vs_base_q25']:.3f}-{r['vs_base_q75']:.3f}",
        f"{r['vs_optax_centralize']:.3f}" if "vs_optax_centralize" in r else "-",
      ]
      + ([f"{r['gbps']:.1f}", f"{r['vs_copy']:.2f}"] if bandwidth else [])
      for r in rows
    ],
  )


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def targets(results: dict) -> list[dict]:
  """The issue's targets, each with the measured value and whether it is met.

  Times: the median per-round ratio of ``chain(optax_gc.centralize(), adamw)``
  to adamw (and to ``chain(optax.centralize(), adamw)``), with its quartiles.
  Memory: no extra optimizer state, and no extra temporary as large as the
  largest leaf.
  """
  out = []

  def ratio(what, rows, key, limit, variant=GC, at_least=False):
    row = next((r for r in rows if r["variant"] == variant), None)
    if row is None or key not in row:
      return
    q = (
      f" (quartiles {row['vs_base_q25']:.3f}-{row['vs_base_q75']:.3f})" if key == "vs_base" else ""
    )
    value = row[key]
    met = value >= limit if at_least else value <= limit
    out.append({"target": what, "limit": limit, "value": value, "met": met, "note": q})

  for tree, res in results.get("update", {}).items():
    ratio(f"update {tree}: GC+adamw / adamw", res["rows"], "vs_base", 1.02)
    ratio(
      f"update {tree}: GC+adamw / optax.centralize+adamw", res["rows"], "vs_optax_centralize", 1.0
    )
    if results.get("machine", {}).get("platform") == "gpu":
      what = f"update {tree}: GC+adamw GB/s / copy GB/s (GPU goal, at least)"
      ratio(what, res["rows"], "vs_copy", 0.85, at_least=True)
  for model, res in results.get("train", {}).items():
    ratio(f"train step {model}: GC+adamw / adamw", res["rows"], "vs_base", 1.01)
  if "compile" in results:
    for phase, what in (("total", "trace+compile"), ("trace", "trace (planning)")):
      rows = [r for r in results["compile"] if r["phase"] == phase]
      if rows:
        ratio(f"{what} {rows[0]['leaves']} leaves: GC+adamw / adamw", rows, "vs_base", 1.10)
        what = f"{what} {rows[0]['leaves']} leaves: GC(rules_for)+adamw / adamw"
        ratio(what, rows, "vs_base", 1.10, variant=GC_DERIVED)
  for tree, rows in results.get("memory", {}).items():
    gc_rows = [r for r in rows if r["variant"] not in (r["base"], BASELINE, PLAIN)]
    if not gc_rows:
      continue
    extra = max(r["extra_state_bytes"] for r in gc_rows)
    out.append(
      {
        "target": f"memory {tree}: extra opt-state bytes, any optax_gc variant",
        "limit": 0,
        "value": extra,
        "met": extra == 0,
        "note": "",
      }
    )
    temp = max(r["extra_temp_bytes"] for r in gc_rows)
    largest = rows[0]["largest_leaf_bytes"]
    out.append(
      {
        "target": f"memory {tree}: optax_gc's extra temp bytes < largest leaf ({largest})",
        "limit": largest,
        "value": temp,
        "met": temp < largest,
        "note": "",
      }
    )
  return out


def report(results: dict) -> str:
  """The results as Markdown tables."""
  out = []
  if "command" in results:
    out.append(f"Command: `{results['command']}`\n")
  if "machine" in results:
    m = results["machine"]
    out.append(
      f"Machine: {m['cpu']}, {m['cores']} cores ({m['device']}); jax {m['jax']}, "
      f"optax {m['optax']}, Python {m['python']}\n"
    )
  checks = targets(results)
  if checks:
    out.append(
      "### Targets\n\n"
      + _table(
        ["target", "limit", "measured", "met"],
        [
          [
            c["target"],
            f"{c['limit']:g}",
            f"{c['value']:.4g}{c['note']}",
            "yes" if c["met"] else "NO",
          ]
          for c in checks
        ],
      )
      + "\n"
    )
  for tree, res in results.get("update", {}).items():
    copy = res["rows"][0].get("copy_gbps")
    out.append(
      f"### Update alone: {tree} ({res['leaves']} leaves, "
      f"{res['params'] / 1e6:.2f}M params, {res.get('dtype', 'float32')})\n\n"
      f"{_time_table(res['rows'])}\n"
      + (
        f"\nA streaming copy of as many bytes (x + 1, donated): {copy:.1f} GB/s.\n" if copy else ""
      )
    )
  for model, res in results.get("train", {}).items():
    out.append(
      f"### Train step: {model} ({res['leaves']} leaves, "
      f"{res['params'] / 1e6:.3f}M params)\n\n{_time_table(res['rows'])}\n"
    )
  if "compile" in results:
    rows = results["compile"]
    out.append(
      f"### Trace and compile: {rows[0]['leaves']} leaves\n\n"
      + _table(
        ["phase", "variant", "median s", "x adamw", "base quartiles", "x optax.centralize"],
        [
          [
            r["phase"],
            r["variant"],
            f"{r['median_ms'] / 1e3:.3f}",
            f"{r['vs_base']:.3f}",
            f"{r['vs_base_q25']:.3f}-{r['vs_base_q75']:.3f}",
            f"{r['vs_optax_centralize']:.3f}",
          ]
          for r in rows
        ],
      )
      + "\n"
    )
  for tree, rows in results.get("memory", {}).items():
    out.append(
      f"### Memory: {tree} (largest leaf {_mib(rows[0]['largest_leaf_bytes'])} "
      "MiB)\n\n"
      + _table(
        [
          "variant",
          "state MiB",
          "extra state bytes vs base",
          "temp MiB",
          "extra temp MiB vs base",
        ],
        [
          [
            r["variant"],
            _mib(r["state_bytes"]),
            str(r["extra_state_bytes"]),
            _mib(r["temp_bytes"]),
            _mib(r["extra_temp_bytes"]),
          ]
          for r in rows
        ],
      )
      + "\n"
    )
  return "\n".join(out)


TINY = {
  "scale": 0.0005,
  "resnet_blocks": "1,0,0,1",
  "layers": 2,
  "rounds": 3,
  "target_ms": 2.0,
  "batch": 2,
  "width": 4,
  "d_model": 16,
  "depth": 1,
  "seq_len": 8,
  "leaves": 20,
  "compile_rounds": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line (see ``optax-gc-benchmark --help``).

  Example:
    >>> args = parse_args(["--tiny", "--leaves", "50"])
    >>> args.leaves, args.scale, args.parts
    (50, 0.0005, ['update', 'train', 'compile', 'memory'])
  """
  parser = argparse.ArgumentParser(
    prog="optax-gc-benchmark",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Full sizes take about 5 minutes on 2 CPU cores; --tiny takes seconds (for tests).",
  )
  parser.add_argument(
    "--parts", default=",".join(PARTS), help="comma-separated parts to run, of: %(default)s"
  )
  parser.add_argument(
    "--scale",
    type=float,
    default=1.0,
    help="update and memory parts: multiplies the parameter count of the pytrees "
    "(ResNet-50 25.6M, Transformer 100M at 1.0)",
  )
  parser.add_argument(
    "--pytrees",
    default="resnet50,transformer",
    help="update and memory parts: comma-separated pytrees, of resnet50, transformer, or a "
    "kernel shape such as 3x3x512x512 (enough such kernels for ResNet-50's parameter count)",
  )
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="update and memory parts: the parameters' and gradients' dtype (default %(default)s)",
  )
  parser.add_argument(
    "--resnet-blocks",
    default="3,4,6,3",
    help="update and memory parts: bottleneck blocks per ResNet stage (%(default)s: ResNet-50)",
  )
  parser.add_argument(
    "--layers", type=int, default=12, help="layers in the Transformer pytree's scanned stack"
  )
  parser.add_argument(
    "--rounds", type=int, default=15, help="interleaved timing rounds of the update and train parts"
  )
  parser.add_argument(
    "--target-ms",
    type=float,
    default=200.0,
    help="update and train parts: each variant runs about this long per round",
  )
  parser.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help="update and memory parts: comma-separated variants, of: %(default)s "
    "(each variant's base, adamw or adam, is always included)",
  )
  parser.add_argument("--batch", type=int, default=32, help="train part: batch size")
  parser.add_argument(
    "--width", type=int, default=32, help="train part: channels of the CNN's first layer"
  )
  parser.add_argument("--d-model", type=int, default=128, help="train part: Transformer width")
  parser.add_argument(
    "--depth",
    type=int,
    default=2,
    help="train part: the Transformer's blocks; the CNN has 1 + depth stages of 2 convs (max 3)",
  )
  parser.add_argument(
    "--seq-len", type=int, default=64, help="train part: Transformer sequence length"
  )
  parser.add_argument(
    "--leaves",
    "--compile-leaves",
    dest="leaves",
    type=int,
    default=2000,
    help="compile part: leaves of the pytree (a multiple of 5)",
  )
  parser.add_argument(
    "--compile-rounds",
    type=int,
    default=3,
    help="compile part: timed rounds, after one untimed warm-up round",
  )
  parser.add_argument(
    "--trace-only",
    action="store_true",
    help="compile part: time the trace and lowering only (optax_gc's planning), not XLA",
  )
  parser.add_argument(
    "--tiny",
    action="store_true",
    help="tiny sizes and few rounds, to check that everything runs: "
    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items())
    + " (options given explicitly still win)",
  )
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  if args.tiny:
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    for key, value in TINY.items():
      flags = {"--" + key.replace("_", "-")} | ({"--compile-leaves"} if key == "leaves" else set())
      if not flags & given:
        setattr(args, key, value)
  args.parts = [p for p in args.parts.split(",") if p]
  args.pytrees = tuple(t for t in args.pytrees.split(",") if t)
  bad = [t for t in args.pytrees if t not in NAMED_PYTREES and not re.fullmatch(r"\d+(x\d+)+", t)]
  if bad or not args.pytrees:
    parser.error(f"--pytrees {bad}: give resnet50, transformer or a kernel shape like 3x3x512x512")
  args.variants = tuple(v for v in args.variants.split(",") if v)
  if set(args.variants) - set(VARIANTS):
    parser.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}")
  unknown = sorted(set(args.parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
  try:
    args.resnet_blocks = tuple(int(b) for b in args.resnet_blocks.split(","))
    assert len(args.resnet_blocks) == 4 and min(args.resnet_blocks) >= 0
  except (ValueError, AssertionError):
    parser.error(f"--resnet-blocks takes 4 ints >= 0, got {args.resnet_blocks!r}")
  if args.leaves < 5 or args.rounds < 1 or args.compile_rounds < 1 or not 1 <= args.depth <= 3:
    parser.error(
      "--leaves must be at least 5, --rounds and --compile-rounds at least 1, --depth 1 to 3"
    )
  return args


def run(args: argparse.Namespace, log=print) -> dict:
  """Runs the parts ``args`` asks for; returns the results (what ``--json`` writes)."""
  target_s = args.target_ms / 1e3
  resnet = resnet50_shapes(args.scale, args.resnet_blocks)
  named = {
    "resnet50": (resnet, ()),
    "transformer": (transformer_shapes(args.scale, args.layers), TRANSFORMER_RULES),
  }

  def pytree(name: str) -> tuple[dict, Any]:
    if name in named:
      shapes, rules = named[name]
    else:
      shapes, rules = uniform_shapes(tuple(int(n) for n in name.split("x")), _size(resnet)[1]), ()
    dtype = jnp.dtype(args.dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes), rules

  trees = {name: pytree(name) for name in args.pytrees}
  results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
  log("machine:", results["machine"], flush=True)
  keys = args.variants
  stats: dict[str, dict] = {tree: {} for tree in trees}
  if "update" in args.parts:
    results["update"] = {}
    for tree, (shapes, rules) in trees.items():
      n_leaves, n_params = _size(shapes)
      rows = bench_update(shapes, rules, args.rounds, target_s, keys, stats[tree])
      results["update"][tree] = {
        "leaves": n_leaves,
        "params": n_params,
        "dtype": args.dtype,
        "rows": rows,
      }
      log(f"update {tree} done", flush=True)
  if "train" in args.parts:
    results["train"] = bench_train(
      args.rounds, args.batch, args.width, args.d_model, args.seq_len, target_s, args.depth
    )
    log("train done", flush=True)
  if "compile" in args.parts:
    results["compile"] = bench_compile(args.leaves, args.compile_rounds, args.trace_only)
    log("compile done", flush=True)
  if "memory" in args.parts:
    results["memory"] = {
      tree: bench_memory(shapes, rules, keys, stats[tree])
      for tree, (shapes, rules) in trees.items()
    }
    log("memory done", flush=True)
  return results


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmark and prints Markdown tables (``--json PATH``: the results too); returns 0.

  Usage::

      python -m optax_gc.benchmark                      # everything, full sizes
      python -m optax_gc.benchmark --scale 0.25         # pytrees of a quarter the size
      python -m optax_gc.benchmark --parts compile --leaves 10000
      python -m optax_gc.benchmark --parts update --pytrees resnet50,4608x512
      python -m optax_gc.benchmark --parts update,memory --dtype bfloat16
      python -m optax_gc.benchmark --parts update,memory --json out.json
      python -m optax_gc.benchmark --tiny               # seconds: checks that it runs
      optax-gc-benchmark --help
  """
  args = parse_args(argv)
  command = ["optax-gc-benchmark", *(sys.argv[1:] if argv is None else argv)]
  results = run(args)
  results["command"] = " ".join(command)
  print()
  print(report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
