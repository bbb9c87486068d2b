"""The benchmark's four parts: update, train, compile and memory.

1. ``update``: the jitted optimizer update alone, params and state donated,
   with the bandwidth each step achieves against a streaming copy's.
2. ``train``: a whole jitted train step (forward, backward, update) of a
   small CNN and a small Transformer.
3. ``compile``: trace and compile time of the jitted update of a many-leaf
   pytree, GC's rules given by the preset or derived by ``optax_gc.rules_for``.
4. ``memory``: optimizer-state bytes, and XLA's temporary bytes for the update.

Each part returns rows of plain numbers, the variants named by id (see
``variants``), ready for JSON and for ``report``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytrees
import timing
import variants as variants_lib
from variants import Variant

REFERENCE = "optax_centralize"


def _update_step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _labelled(rows: list[dict], by_id: dict[str, Variant]) -> list[dict]:
  for row in rows:
    row["label"] = by_id[row["variant"]].label
    row["vs_optax_centralize"] = row.pop("vs_reference", None)
  return rows


def bench_update(
  shapes: Any,
  rules: Any,
  ids: tuple[str, ...],
  rounds: int,
  target_s: float = 0.2,
  memory_out: dict | None = None,
) -> list[dict]:
  """Part 1: seconds per jitted update of each variant in ``ids`` (and its base).

  Besides the times and ratios, each row has ``gbps``, the bytes the step must
  move (``variants.step_bytes``) per second, and ``vs_copy``, that bandwidth
  over a streaming copy's (``x + 1`` on a donated buffer the size of the
  parameters, timed in the same interleaved rounds), the median of the
  per-round ratios. ``memory_out``, if given, receives each compiled step's
  ``memory_analysis()`` by id, so that part 4 need not compile it again.
  """
  chosen = variants_lib.select(ids)
  grads = pytrees.materialize(shapes, 1, 1.0)
  runners = {}
  for vid, variant in chosen.items():
    tx = variant.make(rules)
    params = pytrees.materialize(shapes, 0, 0.02)  # its own buffers: each variant donates them
    state = jax.jit(tx.init)(params)
    step = jax.jit(partial(_update_step, tx), donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    if memory_out is not None:
      memory_out[vid] = compiled.memory_analysis()
    runners[vid] = timing.step_runner(compiled, params, state, grads)
  total = pytrees.nbytes(shapes)
  runners["copy"] = timing.copy_runner(total)
  times = timing.interleave(runners, rounds, target_s)
  copy = times.pop("copy")
  copy_gbps = 2 * total / float(np.median(copy)) / 1e9
  bases = {vid: v.base for vid, v in chosen.items()}
  rows = _labelled(timing.summarize(times, bases, REFERENCE), chosen)
  for row in rows:
    moved = variants_lib.step_bytes(shapes, rules, chosen[row["variant"]])
    t = times[row["variant"]]
    row["step_bytes"] = moved
    row["gbps"] = moved / float(np.median(t)) / 1e9
    row["copy_gbps"] = copy_gbps
    row["vs_copy"] = timing.ratio(copy, t)[0] * moved / (2 * total)
  return rows


def bench_memory(
  shapes: Any, rules: Any, ids: tuple[str, ...], compiled_stats: dict | None = None
) -> list[dict]:
  """Part 4: the optimizer state's bytes and XLA's temporary bytes for the update.

  ``compiled_stats``: ``memory_analysis()`` results by id already at hand
  (from part 1); the other variants are compiled here, from shapes alone.
  Each row also has the difference from its base's state and temporaries.
  """
  chosen = variants_lib.select(ids)
  largest = max(pytrees.nbytes(x) for x in jax.tree.leaves(shapes))
  rows = []
  for vid, variant in chosen.items():
    tx = variant.make(rules)
    state = jax.eval_shape(tx.init, shapes)
    stats = (compiled_stats or {}).get(vid)
    if stats is None:
      step = jax.jit(partial(_update_step, tx), donate_argnums=(0, 1))
      stats = step.lower(shapes, state, shapes).compile().memory_analysis()
    rows.append(
      {
        "variant": vid,
        "label": variant.label,
        "base": variant.base,
        "state_bytes": pytrees.nbytes(state),
        # Some backends report no memory analysis: -1 says "not measured".
        "temp_bytes": stats.temp_size_in_bytes if stats is not None else -1,
        "largest_leaf_bytes": largest,
      }
    )
  by_id = {row["variant"]: row for row in rows}
  for row in rows:
    row["extra_state_bytes"] = row["state_bytes"] - by_id[row["base"]]["state_bytes"]
    row["extra_temp_bytes"] = row["temp_bytes"] - by_id[row["base"]]["temp_bytes"]
  return rows


def bench_compile(leaves: int, rounds: int, trace_only: bool = False) -> list[dict]:
  """Part 3: trace (and lowering) and XLA compile seconds of a many-leaf update.

  optax_gc decides each leaf's axes while the step is traced: the trace is its
  planning cost. ``trace_only`` skips XLA's compile, which for 10,000 leaves
  takes minutes even for plain adamw. Besides the preset, optax_gc runs with
  the rules ``optax_gc.rules_for`` derives from a linen model of the same
  parameters (derived once, before timing, as a program would).
  """
  shapes = pytrees.many_leaves_shapes(leaves)
  derived = pytrees.many_leaves_rules(leaves)
  chosen = variants_lib.select(["optax_centralize", "centralize"])
  chosen[variants_lib.RULES_FOR.id] = variants_lib.RULES_FOR
  rules = {vid: derived if vid == variants_lib.RULES_FOR.id else () for vid in chosen}
  phases = ("trace",) if trace_only else ("trace", "compile", "total")
  times = {phase: {vid: [] for vid in chosen} for phase in phases}
  ids = list(chosen)
  for r in range(rounds + 1):
    # Round 0, on a 10-leaf tree and untimed, warms jax's caches of jnp functions.
    tree = pytrees.many_leaves_shapes(10) if r == 0 else shapes
    for vid in ids[r % len(ids) :] + ids[: r % len(ids)]:
      tx = chosen[vid].make(rules[vid])
      state = jax.eval_shape(tx.init, tree)
      # A fresh function each time, so that jax reuses no trace from a cache.
      step = jax.jit(lambda p, s, g, tx=tx: _update_step(tx, p, s, g), donate_argnums=(0, 1))
      t0 = time.perf_counter()
      lowered = step.lower(tree, state, tree)
      t1 = time.perf_counter()
      if not trace_only:
        lowered.compile()
      t2 = time.perf_counter()
      if r:
        measured = {"trace": t1 - t0, "compile": t2 - t1, "total": t2 - t0}
        for phase in phases:
          times[phase][vid].append(measured[phase])
  bases = {vid: v.base for vid, v in chosen.items()}
  n_leaves = pytrees.count(shapes)[0]
  return [
    {"phase": phase, **row, "leaves": n_leaves}
    for phase in phases
    for row in _labelled(timing.summarize(times[phase], bases, REFERENCE), chosen)
  ]


def bench_derive(leaves: int, rounds: int) -> list[dict]:
  """Part 5: seconds of ``optax_gc.rules_for`` against tracing the same model once.

  ``rules_for`` of a linen model traces its ``init`` (``jax.eval_shape``) and its
  forward pass (``jax.make_jaxpr`` of ``apply``), then walks the program. The
  base is those two traces alone, of fresh functions (no cached trace), the two
  alternating round by round after an untimed warm-up round.
  """
  import optax_gc

  model, inputs = pytrees.many_leaves_model(leaves)

  def trace() -> None:
    variables = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *inputs)
    jax.make_jaxpr(lambda v, *x: model.apply(v, *x))(variables, *inputs)

  def derive() -> None:
    optax_gc.rules_for(model, *inputs)

  runs = {"trace": trace, "rules_for": derive}
  times: dict[str, list[float]] = {name: [] for name in runs}
  names = list(runs)
  for r in range(rounds + 1):
    for name in names[r % 2 :] + names[: r % 2]:
      t0 = time.perf_counter()
      runs[name]()
      if r:
        times[name].append(time.perf_counter() - t0)
  labels = {
    "trace": "trace init + forward (eval_shape, make_jaxpr)",
    "rules_for": "optax_gc.rules_for (both traces + the walk)",
  }
  rows = timing.summarize(times, {"trace": "trace", "rules_for": "trace"})
  n_leaves = pytrees.count(pytrees.many_leaves_shapes(leaves))[0]
  return [{**row, "label": labels[row["variant"]], "leaves": n_leaves} for row in rows]


def _train_models(batch: int, width: int, d_model: int, seq_len: int, depth: int) -> dict:
  """A small CNN and a small Transformer (flax linen), each with its params, batch and loss."""
  import flax.linen as nn

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
  # Shapes by tracing, values from NumPy: compiling the models' init would take
  # longer than the benchmark at tiny sizes, and the times do not depend on the values.
  cnn_params = jax.eval_shape(CNN().init, key, images)
  transformer_params = jax.eval_shape(Transformer().init, key, tokens[:, :-1])
  return {
    "cnn": (pytrees.materialize(cnn_params, 2, 0.05), (images, labels), cnn_loss),
    "transformer": (pytrees.materialize(transformer_params, 3, 0.05), tokens, transformer_loss),
  }


def _train_step(tx, loss_fn, params, state, batch):
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def bench_train(
  rounds: int,
  *,
  batch: int,
  width: int,
  d_model: int,
  seq_len: int,
  depth: int,
  target_s: float = 0.2,
) -> dict:
  """Part 2: seconds per jitted train step of each model, with and without GC.

  The CNN has ``1 + depth`` stages of two 3x3 convs, ``width`` channels in the
  first; the Transformer ``depth`` blocks of width ``d_model`` over
  ``seq_len`` tokens. GC takes the flax preset's axes. Needs flax.
  """
  chosen = variants_lib.select(["optax_centralize", "centralize"])
  results = {}
  for model, (params, data, loss_fn) in _train_models(
    batch, width, d_model, seq_len, depth
  ).items():
    runners = {}
    for vid, variant in chosen.items():
      tx = variant.make(())
      p = jax.tree.map(jnp.copy, params)
      state = jax.jit(tx.init)(p)
      step = jax.jit(partial(_train_step, tx, loss_fn), donate_argnums=(0, 1))
      runners[vid] = timing.step_runner(step.lower(p, state, data).compile(), p, state, data)
    times = timing.interleave(runners, rounds, target_s)
    bases = {vid: v.base for vid, v in chosen.items()}
    n_leaves, n_params = pytrees.count(params)
    results[model] = {
      "leaves": n_leaves,
      "params": n_params,
      "rows": _labelled(timing.summarize(times, bases, REFERENCE), chosen),
    }
  return results
