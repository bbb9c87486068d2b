"""The overhead of gradient centralization, measured as ratios in one process.

Four parts, each comparing optimizers with and without GC on the same machine in
the same process, interleaving the variants round by round so that load from
other processes hits every variant alike:

1. ``update``: the optimizer update alone, jitted with donated buffers, on a
   ResNet-50-shaped and a Transformer-shaped Flax parameter pytree.
2. ``train``: a whole train step (forward, backward, update) of a small CNN and
   a small Transformer (needs flax: ``pip install optax_gc[experiments]``).
3. ``compile``: trace and compile time of a jitted update of a many-leaf pytree.
4. ``memory``: XLA's temporary buffer bytes for the jitted update and the
   optimizer state bytes, with and without GC.

Times are medians over rounds; a ratio is the median over rounds of the
variant's time divided by its base's time in the same round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
PARTS = ("update", "train", "compile", "memory")
# nn.scan stacks the MLP kernels as (layers, in, out): average over `in` only.
# The preset's attention entries already use negative axes, so they need no rule.
TRANSFORMER_RULES = ((r"layers/mlp/[^/]+/kernel$", (-2,)),)
BASELINE = "optax.centralize + adamw"

# ---------------------------------------------------------------------------
# Parameter pytrees, in Flax layout, as shapes.


def _sds(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def resnet50_shapes(scale: float = 1.0) -> dict:
  """ResNet-50 in Flax layout: 161 leaves, 25.6M parameters at ``scale=1``.

  ``scale`` multiplies the parameter count (every width by its square root).
  """
  f = math.sqrt(scale)

  def w(n: int) -> int:
    return max(1, round(n * f))

  def conv_bn(k: int, cin: int, cout: int) -> tuple[dict, dict]:
    return {"kernel": _sds(k, k, cin, cout)}, {"scale": _sds(cout), "bias": _sds(cout)}

  params: dict[str, Any] = {}
  params["conv1"], params["bn1"] = conv_bn(7, 3, w(64))
  cin = w(64)
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
    layer = {}
    for b in range(blocks):
      mid, out = w(width), w(4 * width)
      block: dict[str, Any] = {}
      block["conv1"], block["bn1"] = conv_bn(1, cin, mid)
      block["conv2"], block["bn2"] = conv_bn(3, mid, mid)
      block["conv3"], block["bn3"] = conv_bn(1, mid, out)
      if b == 0:
        block["downsample_conv"], block["downsample_bn"] = conv_bn(1, cin, out)
      layer[f"block{b}"] = block
      cin = out
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


def many_leaves_shapes(leaves: int = 2000) -> dict:
  """Blocks of a conv kernel, its norm scale and bias, a Dense kernel and bias."""
  block = {
    "conv": {"kernel": _sds(3, 3, 16, 16)},
    "norm": {"scale": _sds(16), "bias": _sds(16)},
    "dense": {"kernel": _sds(64, 64), "bias": _sds(64)},
  }
  return {"params": {f"block{i}": block for i in range(max(1, leaves // 5))}}


def _size(tree: Any) -> tuple[int, int]:
  leaves = jax.tree.leaves(tree)
  return len(leaves), sum(math.prod(x.shape) for x in leaves)


def _nbytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _materialize(shapes: Any, seed: int, std: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, arrays)


# ---------------------------------------------------------------------------
# Variants and timing.


def update_variants(rules=()) -> dict[str, tuple[str, optax.GradientTransformation]]:
  """Optimizers to compare, each as ``name: (base name, transformation)``."""
  adamw = partial(optax.adamw, LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  return {
    "adamw": ("adamw", adamw()),
    BASELINE: ("adamw", optax.chain(optax.centralize(), adamw())),
    "optax_gc.centralize + adamw": (
      "adamw",
      optax.chain(optax_gc.centralize(rules), adamw()),
    ),
    "with_centralization(adamw)": ("adamw", optax_gc.with_centralization(adamw(), rules)),
    "adamw_gc": ("adamw", optax_gc.adamw_gc(LEARNING_RATE, weight_decay=WEIGHT_DECAY, rules=rules)),
    "adam": ("adam", optax.adam(LEARNING_RATE)),
    "adam_gc": ("adam", optax_gc.adam_gc(LEARNING_RATE, rules=rules)),
  }


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


def bench_update(shapes: dict, rules, rounds: int) -> list[dict]:
  """Part 1: the jitted optimizer update alone, params and state donated."""
  params = _materialize(shapes, 0, 0.02)
  grads = _materialize(shapes, 1, 1.0)
  runners, bases = {}, {}
  for name, (base, tx) in update_variants(rules).items():
    p = jax.tree.map(jnp.copy, params)
    state = tx.init(p)
    step = jax.jit(partial(_update_step, tx), donate_argnums=(0, 1))
    runners[name] = _runner(step.lower(p, state, grads).compile(), p, state, grads)
    bases[name] = base
  del params
  return summarize(interleave(runners, rounds), bases)


def bench_memory(shapes: dict, rules) -> list[dict]:
  """Part 4: XLA temp bytes of the jitted update, and the optimizer state bytes."""
  largest = max(_nbytes(x) for x in jax.tree.leaves(shapes))
  rows = []
  for name, (base, tx) in update_variants(rules).items():
    state = jax.eval_shape(tx.init, shapes)
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


def bench_compile(leaves: int, rounds: int) -> list[dict]:
  """Part 3: trace+lower and compile seconds of a jitted update of a many-leaf pytree."""
  shapes = many_leaves_shapes(leaves)
  adamw = partial(optax.adamw, LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  factories = {
    "adamw": adamw,
    BASELINE: lambda: optax.chain(optax.centralize(), adamw()),
    "optax_gc.centralize + adamw": lambda: optax.chain(optax_gc.centralize(), adamw()),
  }
  times: dict[str, dict[str, list[float]]] = {
    k: {n: [] for n in factories} for k in ("trace", "compile", "total")
  }
  for r in range(rounds + 1):  # round 0 warms jax's caches of jnp functions
    for name, factory in factories.items():
      tx = factory()
      state = jax.eval_shape(tx.init, shapes)
      # A fresh function each time, so that nothing is reused from a cache.
      step = jax.jit(lambda p, s, g, tx=tx: _update_step(tx, p, s, g), donate_argnums=(0, 1))
      t0 = time.perf_counter()
      lowered = step.lower(shapes, state, shapes)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      if r:
        times["trace"][name].append(t1 - t0)
        times["compile"][name].append(t2 - t1)
        times["total"][name].append(t2 - t0)
  bases = {name: "adamw" for name in factories}
  rows = []
  for what, t in times.items():
    for row in summarize(t, bases):
      rows.append({"phase": what, **row, "leaves": _size(shapes)[0]})
  return rows


def _train_models(batch: int, width: int, d_model: int, seq_len: int):
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
      for mult in (1, 2, 4):
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
      for _ in range(2):
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
    "cnn": (CNN().init(key, images), (images, labels), cnn_loss),
    "transformer": (Transformer().init(key, tokens[:, :-1]), tokens, transformer_loss),
  }


def _train_step(tx, loss_fn, params, state, batch):
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def bench_train(rounds: int, batch: int, width: int, d_model: int, seq_len: int) -> dict:
  """Part 2: a whole jitted train step, with and without GC."""
  results = {}
  for model, (params, data, loss_fn) in _train_models(batch, width, d_model, seq_len).items():
    variants = update_variants()
    runners, bases = {}, {}
    for name in ("adamw", BASELINE, "optax_gc.centralize + adamw"):
      base, tx = variants[name]
      p = jax.tree.map(jnp.copy, params)
      state = tx.init(p)
      step = jax.jit(partial(_train_step, tx, loss_fn), donate_argnums=(0, 1))
      runners[name] = _runner(step.lower(p, state, data).compile(), p, state, data)
      bases[name] = base
    n_leaves, n_params = _size(params)
    results[model] = {
      "leaves": n_leaves,
      "params": n_params,
      "rows": summarize(interleave(runners, rounds), bases),
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
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
  }


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _time_table(rows: list[dict]) -> str:
  return _table(
    ["variant", "median ms", "x base", "base quartiles", "x optax.centralize"],
    [
      [
        r["variant"],
        f"{r['median_ms']:.3f}",
        f"{r['vs_base']:.3f} ({r['base']})",
        f"{r['vs_base_q25']:.3f}-{r['vs_base_q75']:.3f}",
        f"{r['vs_optax_centralize']:.3f}",
      ]
      for r in rows
    ],
  )


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def report(results: dict) -> str:
  """The results as Markdown tables."""
  out = []
  for tree, res in results.get("update", {}).items():
    out.append(
      f"### Update alone: {tree} ({res['leaves']} leaves, "
      f"{res['params'] / 1e6:.2f}M params)\n\n{_time_table(res['rows'])}\n"
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
        ["variant", "state MiB", "extra state vs base", "temp MiB", "extra temp vs base MiB"],
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


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark and prints Markdown tables.

  Usage::

      python -m optax_gc.benchmark                      # everything, full sizes
      python -m optax_gc.benchmark --scale 0.25         # pytrees of a quarter the size
      python -m optax_gc.benchmark --parts update,memory --json out.json
      optax-gc-benchmark --help
  """
  parser = argparse.ArgumentParser(
    prog="optax-gc-benchmark",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--parts", default=",".join(PARTS), help="comma-separated parts to run, of: %(default)s"
  )
  parser.add_argument(
    "--scale",
    type=float,
    default=1.0,
    help="multiplies the parameter count of the update pytrees "
    "(ResNet-50 25.6M, Transformer 100M at 1.0)",
  )
  parser.add_argument(
    "--layers", type=int, default=12, help="layers in the Transformer pytree's scanned stack"
  )
  parser.add_argument(
    "--rounds", type=int, default=15, help="interleaved timing rounds of the update and train parts"
  )
  parser.add_argument("--batch", type=int, default=32, help="train part: batch size")
  parser.add_argument(
    "--width", type=int, default=32, help="train part: channels of the CNN's first layer"
  )
  parser.add_argument("--d-model", type=int, default=128, help="train part: Transformer width")
  parser.add_argument(
    "--seq-len", type=int, default=64, help="train part: Transformer sequence length"
  )
  parser.add_argument(
    "--compile-leaves", type=int, default=2000, help="compile part: leaves of the pytree"
  )
  parser.add_argument("--compile-rounds", type=int, default=5, help="compile part: timed rounds")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")

  trees = {
    "resnet50": (resnet50_shapes(args.scale), ()),
    "transformer": (transformer_shapes(args.scale, args.layers), TRANSFORMER_RULES),
  }
  results: dict[str, Any] = {
    "machine": machine(),
    "command": sys.argv if argv is None else ["optax-gc-benchmark", *argv],
  }
  print("machine:", results["machine"], flush=True)
  if "update" in parts:
    results["update"] = {}
    for tree, (shapes, rules) in trees.items():
      n_leaves, n_params = _size(shapes)
      rows = bench_update(shapes, rules, args.rounds)
      results["update"][tree] = {"leaves": n_leaves, "params": n_params, "rows": rows}
      print(f"update {tree} done", flush=True)
  if "train" in parts:
    results["train"] = bench_train(args.rounds, args.batch, args.width, args.d_model, args.seq_len)
    print("train done", flush=True)
  if "compile" in parts:
    results["compile"] = bench_compile(args.compile_leaves, args.compile_rounds)
    print("compile done", flush=True)
  if "memory" in parts:
    results["memory"] = {
      tree: bench_memory(shapes, rules) for tree, (shapes, rules) in trees.items()
    }
  print()
  print(report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
