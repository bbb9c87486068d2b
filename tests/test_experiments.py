"""The experiment runner: a one-seed smoke run of every config, bad input, what GC does.

The smoke runs shorten training (``--config.num_steps``) and MNIST-1D
(``--config.data.num_samples``) but run each config's real model, data,
optimizers and output writing end to end, all in one process of their own.
``python -m optax_gc.experiments`` runs in test_runner.py, from a wheel.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import flat

import optax_gc
from optax_gc.experiments import cli, data, report, train
from optax_gc.experiments import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
# Written down, not globbed: what config_names() and --help must list.
REPO_CONFIGS = {
  "default",
  "digits_cnn",
  "digits_resnet",
  "mnist1d_cnn",
  "mnist1d_mlp",
  "mnist1d_resnet",
  "mnist1d_transformer",
}
# Two evaluations: a curve, and a summary that must take its last point. Compiling the
# training step, not taking it, is what a smoke run's time goes to.
SMOKE = [
  "--config.seeds=1",
  "--config.num_steps=4",
  "--config.eval_every=2",
  "--config.progress=false",
]


def test_config_names_lists_the_repository_configs_and_those_in_the_working_directory(
  tmp_path, monkeypatch
):
  (tmp_path / "configs").mkdir()
  for name in ("mine.py", "_private.py", "notes.txt"):
    (tmp_path / "configs" / name).write_text("")
  monkeypatch.chdir(tmp_path)
  names = set(config_lib.config_names())
  assert REPO_CONFIGS | {"mine"} <= names
  assert not names & {"_private", "notes"}


def test_the_default_config_is_mnist1d_cnn_unchanged():
  """What runs without --config: its smoke run is mnist1d_cnn's, as configs/default.py says."""
  config, sweeps, _ = cli.parse([])
  assert config.to_dict() == config_lib.load("mnist1d_cnn").to_dict() and not sweeps


# Each config trains end to end once, with SGD, Adam and Muon in turn, so each optimizer
# runs on two configs (a run per pair would triple the slowest test of the suite);
# test_every_config_builds_and_steps_each_optimizer covers every pair.
# default is mnist1d_cnn (test_the_default_config_is_mnist1d_cnn_unchanged).
OPTIMIZERS = ("sgd", "adam", "muon")
SMOKE_RUNS = [
  (name, OPTIMIZERS[i % 3]) for i, name in enumerate(c for c in CONFIGS if c != "default")
]
LABELS = {"sgd": "SGD-momentum", "adam": "Adam", "muon": r"Muon \(derived\)"}
# The smoke runs, one after another in one process, each as the command runs it. Its
# argument is {folder: the command's arguments}; each folder gets the run's stdout and
# its exit status (or traceback).
SMOKE_SCRIPT = """
import contextlib, json, sys, traceback
from pathlib import Path
from optax_gc.experiments import main
for folder, argv in json.loads(sys.argv[1]).items():
  with open(Path(folder) / "stdout.txt", "w") as out, contextlib.redirect_stdout(out):
    try:
      status = main(argv)
    except Exception:
      status = traceback.format_exc()
  (Path(folder) / "status.json").write_text(json.dumps(status))
"""


@pytest.mark.long
def test_smoke_run_of_every_config(tmp_path, subtests):
  """Every config trains (SMOKE_RUNS) and writes its run, in one process that compiles fast.

  Compiling every config's model is most of the time these runs take; one process
  imports jax, flax and the data generators once. Each config is a subtest of its own.
  """
  argvs = {}
  for name, optimizer in SMOKE_RUNS:
    (tmp_path / name).mkdir()
    # A tenth of MNIST-1D: the same generator, in a tenth of the time.
    small = ["--config.data.num_samples=500"] if config_lib.load(name).dataset == "mnist1d" else []
    argvs[str(tmp_path / name)] = [
      f"--config={name}",
      f"--config.optimizer={optimizer}",
      *SMOKE,
      *small,
      f"--workdir={tmp_path / name / 'runs'}",
    ]
  result = subprocess.run(
    [sys.executable, "-c", SMOKE_SCRIPT, json.dumps(argvs)],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  for name, optimizer in SMOKE_RUNS:
    with subtests.test(config=name, optimizer=optimizer):
      _check_smoke_run(tmp_path / name, optimizer, result.stderr)


def _check_smoke_run(folder: Path, optimizer: str, err: str):
  status = json.loads((folder / "status.json").read_text())
  out = (folder / "stdout.txt").read_text()
  assert status == 0, f"{status}; stderr of all the runs: {err[-3000:]}"
  (run_dir,) = (folder / "runs").iterdir()
  assert f"Wrote {run_dir}/" in out
  assert {p.name for p in run_dir.iterdir()} == {
    "metrics.json",
    "curves.png",
    "summary.md",
    "gc_plan.txt",
  }
  assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  metrics = json.loads((run_dir / "metrics.json").read_text())
  assert metrics["steps"] == [2, 4]
  assert metrics["config"]["optimizer"] == optimizer
  for variant in ("baseline", "gc"):
    curves = metrics["variants"][variant]
    acc = np.asarray(curves["test_accuracy"])
    assert acc.shape == (1, 2) and np.all((acc >= 0) & (acc <= 1))
    assert np.all(np.isfinite(curves["train_loss"])) and curves["diverged_at"] == [None]
    # The summary is the last evaluation, read back independently of report.py.
    assert curves["summary"]["final_test_accuracy"]["mean"] == acc[0, -1]
    label = LABELS[optimizer]
    assert re.search(rf"\b{label} +{'GC' if variant == 'gc' else 'no GC'} ", out)
  # The plan, explain's table, ends "N leaves: K centred (...)": GC centres something.
  plan = (run_dir / "gc_plan.txt").read_text()
  assert int(re.search(r"leaves: (\d+) centred", plan)[1]) >= 1, plan


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_and_steps_each_optimizer(name, optimizer):
  config = config_lib.load(name)
  config.optimizer = optimizer
  config_lib.validate(config)
  # A Dense kernel whose fan-in mean GC removes: the two optimizers' first steps differ.
  params = {"Dense_0": {"kernel": np.zeros((3, 2), np.float32)}}
  grads = {"Dense_0": {"kernel": np.array([[1, 2], [3, 4], [5, 9]], np.float32)}}
  # Muon's axes come from the rules rules_for reads, as the runner passes them.
  rules = optax_gc.rules_for(lambda p, x: x @ p["Dense_0"]["kernel"], params, np.ones((2, 3)))
  steps = []
  for gc in (False, True):
    tx = train.make_optimizer(config, gc, rules)
    steps.append(np.asarray(tx.update(grads, tx.init(params), params)[0]["Dense_0"]["kernel"]))
  assert all(np.all(np.isfinite(s)) and np.any(s) for s in steps)
  assert not np.allclose(steps[0], steps[1])


# Where an input used to pass validation, the tiny run keeps a run that would crash short;
# MNIST-1D's data is a tenth of the default, generated in a tenth of the time.
TINY = [
  "--config.data.num_samples=500",
  "--config.seeds=1",
  "--config.num_steps=2",
  "--config.eval_every=1",
]
BAD = {
  "unknown config": (["--config=nope"], "unknown config 'nope'"),
  "unknown field": (["--config.seed=3"], "unknown config field 'seed'; did you mean seeds?"),
  "negative lr": (
    ["--config.adam.learning_rate=-1"],
    "adam.learning_rate=-1.0: must be a positive",
  ),
  "zero seeds": (["--config.seeds=0"], "--config.seeds=0: must be an integer >= 1"),
  "not a number": (["--config.num_steps=many"], "--config.num_steps=many"),
  "bad optimizer": (["--config.optimizer=lamb"], "sgd, adam or muon"),
  "bad rule": (["--config.gc_rules=(('(', (0,)),)"], "gc_rules"),
  "unused rule": (["--config.gc_rules=(('nothing$', (0,)),)", *TINY], "matched no parameter"),
  "bad flag": (["--seeds=3"], "Unknown command line flag 'seeds'"),
  "positional": (["mnist1d_mlp"], "unexpected argument 'mnist1d_mlp'"),
  "unknown sweep field": (["--sweep=sgd.learnig_rate=0.1,0.2"], "did you mean sgd.learning_rate?"),
  "bad sweep value": (["--sweep=seeds=1,x"], "seeds=x: expected an integer"),
  "bad sweep point": (["--sweep=seeds=0,1"], "sweep point seeds=0"),
  "sweep without values": (["--sweep=seeds"], "give FIELD=V1,V2"),
  "another model's field": (
    ["--config=mnist1d_cnn", "--config.model.kind=mlp", *TINY],
    "--config.model.channels=25: model.kind=mlp takes no channels (it takes hidden); "
    "use a config made for it, e.g. --config=mnist1d_mlp",
  ),
  "another data set's field": (
    ["--config=mnist1d_cnn", "--config.dataset=digits", "--config.model.kind=cnn2d", *TINY],
    "--config.data.num_samples=500: dataset=digits takes no num_samples",
  ),
  "a sweep over models": (
    ["--config=mnist1d_cnn", "--sweep=model.kind=cnn1d,mlp", *TINY],
    "sweep point model.kind=mlp: --config.model.channels=25: model.kind=mlp takes no channels",
  ),
  "zero channels": (
    ["--config=mnist1d_cnn", "--config.model.channels=0", *TINY],
    "--config.model.channels=0: must be an integer >= 1, e.g. 25",
  ),
  "negative channels": (
    ["--config=mnist1d_cnn", "--config.model.channels=-3", *TINY],
    "--config.model.channels=-3: must be an integer >= 1",
  ),
  "no samples": (
    [*TINY, "--config.data.num_samples=0"],
    "--config.data.num_samples=0: must be an integer >= 10, e.g. 5000",
  ),
  "heads that do not divide the width": (
    ["--config=mnist1d_transformer", "--config.model.num_heads=5", *TINY],
    "--config.model.num_heads=5: must divide d_model=32",
  ),
  "a batch larger than the data": (
    ["--config=mnist1d_mlp", "--config.batch_size=401", *TINY],
    "--config.batch_size=401: larger than the training set (400 examples)",
  ),
  "no time limit": (["--max_minutes=nan"], "--max_minutes=nan: must be a number >= 0"),
  "a name with a slash": (["--config.name=a/b", *TINY], "--config.name=a/b: must be a folder name"),
  "a sweep of workdirs": (["--sweep=workdir=a,b"], "training does not read workdir here"),
  "a sweep of names": (["--sweep=name=a,b"], "training does not read name here"),
  "a sweep of progress": (["--sweep=progress=true,false"], "training does not read progress"),
  "nesterov without momentum": (
    ["--config.sgd.nesterov=true", "--config.sgd.momentum=0"],
    "--config.sgd.nesterov=True needs momentum",
  ),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2_and_writes_nothing(args, message, tmp_path, capsys):
  workdir = tmp_path / "work"
  assert cli.main([*args, f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1
  assert not workdir.exists()


BAD_FILES = {
  "a dict": ("return {'name': 'mine'}", "get_config() returned a dict, not an ml_collections"),
  "a field missing": (
    "c = base_config()\n  del c['seeds']\n  return c",
    "it lacks the field seeds; start get_config() from optax_gc.experiments.config.base_config()",
  ),
  "a field unknown": (
    "c = base_config()\n  c.seed = 3\n  return c",
    "the runner has no field seed (did you mean seeds?)",
  ),
}


@pytest.mark.parametrize("body, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_config_file_of_another_shape_exits_2_naming_it(body, message, tmp_path, capsys):
  path = tmp_path / "mine.py"
  path.write_text(
    "from optax_gc.experiments.config import base_config\n\n\ndef get_config():\n  " + body
  )
  assert cli.main([f"--config={path}", f"--workdir={tmp_path / 'work'}"]) == 2
  err = capsys.readouterr().err
  assert f"config file {str(path)!r}: {message}" in err and err.count("\n") == 1
  assert not (tmp_path / "work").exists()


def test_unwritable_workdir(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert cli.main([*SMOKE, f"--workdir={blocker}/runs"]) == 2
  assert "is a file; pass --workdir=DIR" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == [blocker]


def test_help_lists_configs(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in REPO_CONFIGS)


def test_batches_are_reshuffled_passes():
  idx = train.batch_indices(50, 10, 12, seed=3)
  order = idx.ravel()
  for start in range(0, 100, 50):  # two complete passes, each a permutation
    assert sorted(order[start : start + 50]) == list(range(50))
  assert not np.array_equal(order[:50], order[50:100])


def _train(config, gc, steps=40):
  ds = data.load(config.dataset, **config.data)
  train_graph, eval_graph, params, rest = train.init_seeds(config, ds, [0])
  tx = train.make_optimizer(config, gc)
  train_steps, _ = train.make_functions(train_graph, eval_graph, tx)
  idx = train.batch_indices(len(ds.y_train), config.batch_size, steps, seed=0)[None]
  state = jax.vmap(tx.init)(params)
  new = train_steps(params, state, rest, ds.x_train, ds.y_train, idx, 0, steps)[0]
  return jax.tree.map(lambda a: a[0], params), jax.tree.map(lambda a: a[0], new)


def _fan_in_means(tree):
  # Dense kernels are (in, out) and conv kernels (width, in, out): every axis but the last.
  return {
    path: np.asarray(v, np.float64).mean(axis=tuple(range(v.ndim - 1)))
    for path, v in flat(tree).items()
    if path.endswith("/kernel")
  }


def test_gc_run_keeps_fan_in_means_under_sgd():
  """SGD-momentum with GC (no weight decay) never moves a neuron's fan-in mean of the weights.

  The CNN holds both kinds of kernel: its convolutions' and its Dense head's.
  """
  config = config_lib.load("mnist1d_cnn")
  config.optimizer, config.weight_decay = "sgd", 0.0
  config.data.num_samples = 500  # 400 training signals: 40 steps of 100 are 10 passes
  before, after = _train(config, gc=True)
  m0, m1 = _fan_in_means(before), _fan_in_means(after)
  assert sorted(m0) == ["conv1/kernel", "conv2/kernel", "conv3/kernel", "head/kernel"]
  for path in m0:
    np.testing.assert_allclose(m1[path], m0[path], atol=1e-5, err_msg=path)
  _, plain = _train(config, gc=False)
  moved = max(np.abs(_fan_in_means(plain)[p] - m0[p]).max() for p in m0)
  assert moved > 1e-3


def test_summary_statistics_against_numpy():
  rng = np.random.default_rng(0)
  acc = rng.uniform(0.5, 1, size=(2, 5, 4))
  loss = rng.uniform(0.01, 1, size=(2, 5, 4))
  variants = {
    v: {
      "train_loss": loss[i].tolist(),
      "test_loss": loss[i].tolist(),
      "test_accuracy": acc[i].tolist(),
      "wall_s": 1.0,
      "diverged_at": [None, 3, None, None, 1],
    }
    for i, v in enumerate(("baseline", "gc"))
  }
  r = report.summarize({"steps": [1, 2, 3, 4], "target_loss": 0.3, "variants": variants})
  s = r["variants"]["gc"]["summary"]
  assert s["final_test_accuracy"]["mean"] == pytest.approx(acc[1, :, -1].mean())
  assert s["final_test_accuracy"]["std"] == pytest.approx(acc[1, :, -1].std(ddof=1))
  assert s["best_test_accuracy"]["mean"] == pytest.approx(acc[1].max(axis=1).mean())
  expected = [next((t + 1 for t in range(4) if run[t] <= 0.3), None) for run in loss[1]]
  assert s["steps_to_target"] == expected
  diff = acc[1, :, -1] - acc[0, :, -1]
  assert r["gc_minus_baseline"]["seeds_gc_better"] == int((diff > 0).sum())
  assert s["diverged_at"] == [None, 3, None, None, 1]
  assert report.diverged_cell(s["diverged_at"]) == "2/5 (steps 1, 3)"


def _polar(m):
  """The orthogonal factor U V^T of ``m`` (float64 SVD): what Muon's Newton-Schulz approximates."""
  u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
  kept = s > 1e-6 * s[0]  # a centred gradient has lost a rank; so has its update
  return u[:, kept] @ vt[kept]


def test_muon_orthogonalises_each_kernel_over_its_derived_axes_and_keeps_gc_fan_in_means():
  """The runner's Muon: each CNN kernel as its (fan-in, fan-out) matrix with the derived axes.

  Muon's own default sends the 3-D convolution kernels to its Adam; with GC, the update of
  a centred gradient keeps a zero mean over the fan-in (Newton-Schulz is a polynomial
  G (G^T G)^k, and 1^T G = 0).
  """
  config = config_lib.load("mnist1d_cnn")
  config.weight_decay, config.optimizer = 0.0, "muon"
  config.data.num_samples = 500
  ds = data.load(config.dataset, **config.data)
  rules = train.gc_rules(config, ds)
  _, params, _ = train.init_model(config, ds, 0)
  rng = np.random.default_rng(0)

  def gradient(shape):
    # Singular values spread over a decade, so an orthogonalised update shows as one, and
    # a constant of singular value 0.5 so that the fan-in means are far from 0.
    n, m = int(np.prod(shape[:-1])), shape[-1]
    k = min(n, m)
    u, v = np.linalg.qr(rng.normal(size=(n, k)))[0], np.linalg.qr(rng.normal(size=(m, k)))[0]
    g = u * np.logspace(0, -1, k) @ v.T + 0.5 / np.sqrt(n * m)
    return g.reshape(shape).astype(np.float32)

  grads = jax.tree.map(lambda p: gradient(p.shape) if p.ndim > 1 else np.ones_like(p), params)
  kernels = [p for p in flat(params) if p.endswith("/kernel")]
  assert kernels == ["conv1/kernel", "conv2/kernel", "conv3/kernel", "head/kernel"]

  def update(gc, dims):
    config.muon.dims = dims
    tx = train.make_optimizer(config, gc, rules)
    return flat(tx.update(grads, tx.init(params), params)[0])

  # Every kernel as its (fan-in, fan-out) matrix: the conv kernels are (width, in, out).
  as_matrix = {p: v.reshape(-1, v.shape[-1]).astype(np.float64) for p, v in flat(grads).items()}
  derived, default, centred = (
    {p: np.asarray(v, np.float64).reshape(as_matrix[p].shape) for p, v in update(*a).items()}
    for a in ((False, "derived"), (False, "default"), (True, "derived"))
  )
  for path in kernels:
    g = as_matrix[path]
    # Derived: the direction of -U V^T of the gradient's matrix, centred with GC.
    for u, grad in ((derived[path], g), (centred[path], g - g.mean(axis=0))):
      ref = -_polar(grad)
      cos = np.sum(u * ref) / np.linalg.norm(u) / np.linalg.norm(ref)
      assert cos > 0.95, (path, cos)
    # GC: every neuron's update has a zero mean over its fan-in; without GC it has not.
    scale = np.abs(centred[path]).mean()
    assert np.abs(centred[path].mean(axis=0)).max() < 1e-4 * scale, path
    assert np.abs(derived[path].mean(axis=0)).max() > 1e-2 * scale, path
    # Muon's default: 2-D kernels to Muon as above, the rest to its (N)Adam, whose first
    # step is the same size for every entry.
    if flat(grads)[path].ndim > 2:
      adam = np.abs(default[path])
      np.testing.assert_allclose(adam, adam.max(), rtol=1e-3, err_msg=path)
    else:
      np.testing.assert_allclose(default[path], derived[path], atol=1e-5 * scale, err_msg=path)
