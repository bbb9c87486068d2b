"""One of two processes of a multi-controller JAX job; run by test_multihost.py.

Run it twice, as process 0 and 1, each with 4 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``)::

  python tests/multihost_worker.py PORT PROCESS_ID WORKDIR

The two processes join over gloo on 127.0.0.1:PORT into one 8-device
``("data", "model")`` mesh of 2x4 whose ``data`` axis runs across the
processes, as on a TPU pod or a multi-node GPU job: in the layout checks every
kernel has half of its elements on each process, so neither can read it whole. Each process
runs every check in ``CHECKS`` and prints one line per check, ending in
``N failures``. Failures are counted from this process's shards, compared with
NumPy float64 values every process computes from the same seeds, so a check
reads no array it does not hold, except where it needs a global value (the nnx
model's initial parameters, its fan-in means) and gathers it with
``process_allgather``. WORKDIR holds the orbax checkpoint, which both processes
write together.

Importing this module (pytest's doctest collection does) runs nothing.
"""

import functools
import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from helpers import collectives, flat, nest, np_centre, run_steps
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gc

PROCESSES, LOCAL_DEVICES = 2, 4
STEPS = 3
BATCH = 16  # the nnx model's global batch, split between the processes
LR_NNX, MOMENTUM = 0.1, 0.9
LR, WD, B1, B2, EPS = 1e-2, 1e-2, 0.9, 0.999, 1e-8
DM = ("data", "model")  # both mesh axes on one array axis: 8 shards, 4 per process

# leaf: (shape, fan-in axes written by hand, or None for a leaf GC leaves alone).
LEAVES = {
  "dense/kernel": ((16, 8), (0,)),  # (in, out)
  "conv/kernel": ((3, 8, 16), (0, 1)),  # (width, in, out)
  "attn/out/kernel": ((4, 4, 16), (0, 1)),  # (heads, head_dim, out)
  "dense/bias": ((8,), None),
  # 2**16 elements: the size at which XLA:CPU sums the fan-in with a dot.
  "big/kernel": ((256, 256), (0,)),
}

# Strict mode wants every kernel of rank 3 or more decided by a rule or by an
# unambiguous layout: the conv kernel gets a rule (the attention kernel's name settles it).
RULES = ((r"(^|/)conv/kernel$", "all_but_last"),)

# Every kernel's layout puts the process axis ("data") on the axes named: the
# fan-in, the output, or one each.
SPECS = {
  "fan_in": {
    "dense/kernel": P(DM, None),
    "conv/kernel": P(None, DM, None),
    "attn/out/kernel": P("data", "model", None),
    "dense/bias": P(None),
    "big/kernel": P(DM, None),
  },
  "fan_out": {
    "dense/kernel": P(None, DM),
    "conv/kernel": P(None, None, DM),
    "attn/out/kernel": P(None, None, DM),
    "dense/bias": P(DM),
    "big/kernel": P(None, DM),
  },
  "both": {
    "dense/kernel": P("data", "model"),
    "conv/kernel": P(None, "data", "model"),
    "attn/out/kernel": P("data", None, "model"),
    "dense/bias": P("model"),
    "big/kernel": P("data", "model"),
  },
}


def _arrays(seed, offset):
  rng = np.random.default_rng(seed)
  return {p: rng.normal(offset, 1.0, shape).astype(np.float32) for p, (shape, _) in LEAVES.items()}


def _global(value, sharding):
  """The global array of ``value``: each process fills only the shards on its own devices."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _held_here(array) -> float:
  """The fraction of a global array's elements that are on this process's devices."""
  held = np.zeros(array.shape, bool)
  for shard in array.addressable_shards:
    held[shard.index] = True
  return float(held.mean())


def _where(index):
  return "[" + ", ".join(f"{s.start or 0}:{s.stop}" if s.stop else ":" for s in index) + "]"


def _shard_errors(name, array, expected, rtol, atol=0.0):
  """Compares this process's shards of ``array`` with ``expected``, in float64.

  ``expected`` is the whole value in NumPy, or a global array laid out like ``array``.
  """
  if isinstance(expected, jax.Array):
    if not expected.sharding.is_equivalent_to(array.sharding, array.ndim):
      return [f"{name}: laid out as {array.sharding}, not {expected.sharding}"]
    pairs = [
      (s.index, s.data, e.data)
      for s, e in zip(array.addressable_shards, expected.addressable_shards, strict=True)
    ]
  else:
    pairs = [(s.index, s.data, np.asarray(expected)[s.index]) for s in array.addressable_shards]
  for index, got, want in pairs:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
      err = np.max(np.abs(got - want)) if got.shape == want.shape else "a shape mismatch"
      return [f"{name}: shard {_where(index)} differs by {err}"]
  return []


def _sharding_errors(name, leaf, want):
  if leaf.sharding.is_equivalent_to(want, leaf.ndim):
    return []
  return [f"{name} is laid out as {leaf.sharding}, not {want}"]


def _adamw_reference(params, grads):
  """``chain(centralize(), adamw)`` in NumPy float64, with the fan-in axes written by hand."""
  out = {}
  for path, p in params.items():
    p, mu, nu = np.asarray(p, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
      g = np_centre(g[path], LEAVES[path][1])
      mu, nu = B1 * mu + (1 - B1) * g, B2 * nu + (1 - B2) * g * g
      step = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS) + WD * p
      p = p - LR * step
    out[path] = p
  return out


def _mesh():
  # Row i of the mesh is process i's devices, so "data" is the axis across processes.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  grid = np.array(devices).reshape(PROCESSES, LOCAL_DEVICES)
  return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def check_layout(case, mesh, workdir):
  """explain, strict init and a jitted chain(centralize(), adamw) step on global arrays."""
  del workdir
  failures = []
  shardings = {p: NamedSharding(mesh, spec) for p, spec in SPECS[case].items()}
  params_np, grads_np = _arrays(0, 0.0), [_arrays(1 + t, 0.5) for t in range(STEPS)]
  params = nest({p: _global(v, shardings[p]) for p, v in params_np.items()})
  grads = [nest({p: _global(v, shardings[p]) for p, v in g.items()}) for g in grads_np]
  for path, leaf in flat(params).items():
    if LEAVES[path][1] is not None and _held_here(leaf) != 0.5:
      failures.append(f"{path}: this process holds {_held_here(leaf)} of it, not half")

  # explain reads only shapes: the global ones, from the arrays or from eval_shape.
  plan = optax_gc.explain(params, RULES)
  for path, (shape, axes) in LEAVES.items():
    if (plan[path].shape, plan[path].axes) != (shape, axes):
      failures.append(f"explain: {path} {plan[path].shape} {plan[path].axes}, not {shape} {axes}")
  if str(optax_gc.explain(jax.eval_shape(lambda: params), RULES)) != str(plan):
    failures.append("explain of eval_shape differs from explain of the arrays")

  # Strict mode passes with the preset and RULES, and names every kernel without them.
  tx = optax.chain(
    optax_gc.centralize(RULES, strict=True),
    optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
  )
  with jax.set_mesh(mesh):
    opt_state = tx.init(params)
  try:
    optax_gc.centralize(preset=None, strict=True).init(params)
    failures.append("strict init without rules or a preset accepted the kernels")
  except ValueError as e:
    for path, (shape, axes) in LEAVES.items():
      if axes and f"'{path}' {shape}" not in str(e):
        failures.append(f"strict init's error does not name {path} {shape}")

  def step(params, opt_state, grads):
    centred, _ = optax_gc.centralize(RULES).update(grads, optax.EmptyState())
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, centred

  with jax.set_mesh(mesh):
    # One compilation: the HLO checked is the program that runs.
    compiled = jax.jit(step).lower(params, opt_state, grads[0]).compile()
    history, centred = run_steps(compiled, params, opt_state, grads)
  params, opt_state = history[-1]

  for path, leaf in flat(centred[0]).items():
    g = grads_np[0][path]
    want = np_centre(g, LEAVES[path][1])
    failures += _shard_errors(f"GC of {path}", leaf, want, 1e-5, 1e-6 * np.max(np.abs(g)))
  reference = _adamw_reference(params_np, grads_np)
  for path, leaf in flat(params).items():
    failures += _shard_errors(f"{path} after {STEPS} steps", leaf, reference[path], 1e-5, 1e-6)
    if np.max(np.abs(reference[path] - params_np[path])) < 1e-3:
      failures.append(f"{path}: the steps moved it too little for this check to fail")

  # Parameters, gradients after GC and the adam moments keep the placement; nothing moves.
  adam = history[0][1][1][0]
  placed = {"param": history[0][0], "GC of": centred[0], "mu": adam.mu, "nu": adam.nu}
  for what, tree in placed.items():
    for path, leaf in flat(tree).items():
      failures += _sharding_errors(f"{what} {path}", leaf, shardings[path])
  initial = flat(history[0])
  for t, state in enumerate(history[1:], 1):
    for path, after in flat(state).items():
      failures += _sharding_errors(f"step {t}: {path}", after, initial[path].sharding)

  found = collectives(compiled.as_text())
  if set(found) - {"all-reduce"} or (case != "fan_out") != ("all-reduce" in found):
    failures.append(f"the compiled step holds {found}")
  return f"collectives {found or 'none'}", failures


def check_orbax(mesh, workdir):
  """with_centralization(adamw) saved by both processes, restored, resumed."""
  failures = []
  shardings = {p: NamedSharding(mesh, spec) for p, spec in SPECS["both"].items()}
  params = nest({p: _global(v, shardings[p]) for p, v in _arrays(0, 0.0).items()})
  grads = [
    nest({p: _global(v, shardings[p]) for p, v in _arrays(1 + t, 0.5).items()}) for t in range(4)
  ]
  gc_tx = optax_gc.with_centralization(optax.adamw(LR, weight_decay=WD), RULES, strict=True)

  @jax.jit
  def step(params, state, grads):
    updates, state = gc_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def train(params, state, ts):
    for t in ts:
      params, state = step(params, state, grads[t])
    return params, state

  with jax.set_mesh(mesh):
    trained, state = train(params, gc_tx.init(params), (0, 1))
    saved = {"params": trained, "opt_state": state}
    directory = pathlib.Path(workdir) / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory, saved)
      checkpointer.wait_until_finished()
      restored = {}
      for name, tx in (("gc", gc_tx), ("adamw", optax.adamw(LR, weight_decay=WD))):
        target = {"params": params, "opt_state": tx.init(params)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored[name] = checkpointer.restore(directory, abstract)
    straight = train(trained, state, (2, 3))
    for name, tree in restored.items():
      if jax.tree.structure(tree) != jax.tree.structure(saved):
        failures.append(f"restored into {name}: structure {jax.tree.structure(tree)}")
        continue
      got = flat(tree)
      for path, want in flat(saved).items():
        failures += _shard_errors(f"restored into {name}: {path}", got[path], want, 0)
      # Either restored state goes on with GC exactly as the run that never stopped.
      resumed = flat(train(tree["params"], tree["opt_state"], (2, 3)))
      for path, want in flat(straight).items():
        failures += _shard_errors(f"resumed from {name}: {path}", resumed[path], want, 0)
  # orbax writes one OCDBT store per process (a layout detail, so it is shown, not checked).
  writers = ", ".join(sorted(p.name for p in directory.glob("ocdbt.process_*"))) or "no store"
  return f"written as {writers}; restored into with_centralization(adamw) and adamw", failures


class _MLP(nnx.Module):
  """Megatron-style: the hidden units are split over "model", the first kernel's outputs
  and the second's fan-in."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.lin1 = nnx.Linear(
      8,
      16,
      kernel_init=nnx.with_partitioning(init, (None, "model")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
      rngs=rngs,
    )
    self.lin2 = nnx.Linear(
      16, 4, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
    )

  def __call__(self, x):
    return self.lin2(jnp.tanh(self.lin1(x)))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  # Under an Auto mesh the partitioner may choose any output layout: pin the annotated one.
  state = nnx.state((model, optimizer))
  nnx.update(
    (model, optimizer), jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
  )
  return loss


def _mlp_reference(params, data):
  """_MLP trained by chain(centralize(), sgd(LR_NNX, MOMENTUM)) in NumPy float64.

  Returns the loss before each step and the final parameters.
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  trace = {k: np.zeros_like(v) for k, v in p.items()}
  losses = []
  for x, y in data:
    h = np.tanh(x @ p["lin1/kernel"] + p["lin1/bias"])
    err = h @ p["lin2/kernel"] + p["lin2/bias"] - y
    losses.append(float(np.mean(err**2)))
    d_out = 2 * err / err.size
    d_h = d_out @ p["lin2/kernel"].T * (1 - h**2)
    grads = {"lin1/kernel": x.T @ d_h, "lin1/bias": d_h.sum(0)}
    grads |= {"lin2/kernel": h.T @ d_out, "lin2/bias": d_out.sum(0)}
    for k, g in grads.items():
      trace[k] = np_centre(g, (0,) if k.endswith("kernel") else None) + MOMENTUM * trace[k]
      p[k] = p[k] - LR_NNX * trace[k]
  return losses, p


def _nnx_state(model, optimizer):
  return {
    **{f"param {p}": v for p, v in flat(nnx.state(model, nnx.Param)).items()},
    **{f"opt state {p}": v for p, v in flat(nnx.state(optimizer, nnx.optimizer.OptState)).items()},
  }


def check_nnx(mesh, workdir):
  """An nnx MLP, data parallel over processes, model parallel inside, trained with GC."""
  del workdir
  failures = []
  rng = np.random.default_rng(7)
  data = [
    (
      rng.normal(0.5, 1.0, (BATCH, 8)).astype(np.float32),
      rng.normal(size=(BATCH, 4)).astype(np.float32),
    )
    for _ in range(STEPS)
  ]
  # Each process loads only its own rows of the global batch, as an input pipeline would.
  local = BATCH // PROCESSES
  rows = slice(local * jax.process_index(), local * (jax.process_index() + 1))
  batch_sharding = NamedSharding(mesh, P("data"))

  with jax.set_mesh(mesh):
    model = _MLP(nnx.Rngs(0))
    # rules_for traces the model of global arrays on an abstract global batch.
    rules = optax_gc.rules_for(model, jax.ShapeDtypeStruct((BATCH, 8), np.float32))
    tx = optax.chain(optax_gc.centralize(rules, strict=True), optax.sgd(LR_NNX, momentum=MOMENTUM))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    plan = optax_gc.explain(nnx.state(model, nnx.Param), rules)
    before = _nnx_state(model, optimizer)  # arrays: the steps replace them, never change them
    losses = []
    for batch in data:
      x, y = (
        jax.make_array_from_process_local_data(batch_sharding, a[rows], a.shape) for a in batch
      )
      losses.append(float(_nnx_step(model, optimizer, x, y)))
  after = _nnx_state(model, optimizer)

  # explain and the annotated layouts, on the global parameters.
  specs = {
    "lin1/kernel": P(None, "model"),
    "lin1/bias": P("model"),
    "lin2/kernel": P("model", None),
  }
  for path, spec in specs.items():
    leaf = before[f"param {path}"]
    axes = None if path.endswith("bias") else (0,)
    if (plan[path].shape, plan[path].axes) != (leaf.shape, axes):
      failures.append(f"explain: {path} {plan[path].shape} {plan[path].axes}, not {axes}")
    how = "dot_general" if axes else "no contraction: add"
    if plan[path].decided_by != how:
      failures.append(f"explain: {path} decided by {plan[path].decided_by!r}, not rules_for")
    failures += _sharding_errors(f"param {path}", leaf, NamedSharding(mesh, spec))

  # The reference starts from the model's own initial parameters: global values, gathered.
  initial = {
    name.removeprefix("param "): multihost_utils.process_allgather(leaf, tiled=True)
    for name, leaf in before.items()
    if name.startswith("param ")
  }
  ref_losses, reference = _mlp_reference(initial, data)
  if not np.allclose(losses, ref_losses, rtol=1e-5) or not losses[-1] < losses[0]:
    failures.append(f"losses {losses}, NumPy float64 {ref_losses}")
  for name, leaf in after.items():
    failures += _sharding_errors(f"after {STEPS} steps, {name}", leaf, before[name].sharding)
  for path, value in reference.items():
    leaf = after[f"param {path}"]
    failures += _shard_errors(f"{path} after {STEPS} steps", leaf, value, 1e-5, 1e-6)
    if np.max(np.abs(value - initial[path])) < 1e-3:
      failures.append(f"{path}: the steps moved it too little for this check to fail")
  for path in ("lin1/kernel", "lin2/kernel"):
    # GC under SGD-momentum: each output unit's fan-in mean stays where it started,
    # in the model's own arrays, not only in the reference.
    name = f"param {path}"
    moved = multihost_utils.process_allgather(jnp.mean(after[name] - before[name], 0), tiled=True)
    if np.max(np.abs(moved)) > 1e-6:
      failures.append(f"{path}: fan-in means moved by up to {np.max(np.abs(moved))}")
  summary = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {STEPS} steps"
  return f"{summary} (NumPy float64: {ref_losses[0]:.4f} -> {ref_losses[-1]:.4f})", failures


CHECKS = {
  "fan_in": functools.partial(check_layout, "fan_in"),
  "fan_out": functools.partial(check_layout, "fan_out"),
  "both": functools.partial(check_layout, "both"),
  "orbax": check_orbax,
  "nnx": check_nnx,
}


def main(argv) -> int:
  port, process_id, workdir = argv
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=int(process_id)
  )
  if jax.device_count() != PROCESSES * LOCAL_DEVICES:
    print(f"found {jax.device_count()} devices, not {PROCESSES * LOCAL_DEVICES}", file=sys.stderr)
    return 2
  mesh = _mesh()
  failures = []
  for name, check in CHECKS.items():
    try:
      summary, found = check(mesh, workdir)
    except Exception:  # report every check, not only the first that raises
      summary, found = "raised", [traceback.format_exc()]
    print(f"process {process_id}: {name}: {summary}; {len(found)} failures", flush=True)
    failures += [f"{name}: {f}" for f in found]
  for failure in failures:
    print(f"FAIL process {process_id}:", failure, file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
