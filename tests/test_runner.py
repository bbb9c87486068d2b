"""The runner as installed software: divergence, sweeps, Ctrl-C and resuming, a wheel install.

Runs train a few steps on a tenth of MNIST-1D (400 training signals, generated in a
tenth of the time): what is checked here is the runner's handling of runs, not accuracy.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from optax_gc.experiments import cli, report, sweep, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
  "--config=mnist1d_mlp",
  "--config.data.num_samples=500",
  "--config.seeds=2",
  "--config.num_steps=20",
  "--config.eval_every=10",
]
QUIET = [*TINY, "--config.progress=false"]
DIVERGES = ["--config.optimizer=sgd", "--config.sgd.learning_rate=10000"]


def test_divergence_is_recorded_reported_and_drawn(tmp_path, capsys):
  assert cli.main([*QUIET, *DIVERGES, f"--workdir={tmp_path}"]) == 0
  out = capsys.readouterr().out
  (run,) = tmp_path.iterdir()
  metrics = json.loads((run / "metrics.json").read_text())
  for variant in ("baseline", "gc"):
    curves = metrics["variants"][variant]
    losses = np.asarray(curves["train_loss"])
    # Recorded at a step within the first block: the block's mean loss is already non-finite.
    assert all(1 <= s <= 10 for s in curves["diverged_at"]), curves["diverged_at"]
    assert not np.isfinite(losses[:, 0]).any()
  assert "2/2 (steps" in out
  assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_are_written_first_survive_a_failing_plot_and_report_draws_them(
  tmp_path, capsys, monkeypatch
):
  def broken(results, path):
    raise OSError("No space left on device")

  with monkeypatch.context() as m:
    m.setattr(report, "plot_curves", broken)
    assert cli.main([*QUIET, f"--workdir={tmp_path / 'runs'}"]) == 0
  (run,) = (tmp_path / "runs").iterdir()
  assert json.loads((run / "metrics.json").read_text())["variants"]["gc"]["test_accuracy"]
  assert not (run / "curves.png").exists()
  assert "curves.png not written: OSError: No space left on device" in capsys.readouterr().err
  # The report command reads the metrics back and draws what the run could not.
  assert report.main([str(run), "--png", str(tmp_path / "grid.png")]) == 0
  assert "| mnist1d_mlp | Adam | GC |" in capsys.readouterr().out
  assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def _sweep_args(tmp_path, *extra):
  return [*QUIET, "--sweep=adam.learning_rate=0.001,0.01", *extra, f"--workdir={tmp_path}"]


def test_sweep_writes_every_point_keeps_them_on_ctrl_c_resumes_and_respects_the_time_guard(
  tmp_path, capsys, monkeypatch
):
  # The time guard first: no point starts, and the summary says how to continue.
  assert cli.main(_sweep_args(tmp_path, "--max_minutes=1e-9")) == 0
  assert "0 of 2 points done (--max_minutes=1e-09 reached)" in capsys.readouterr().out
  (folder,) = tmp_path.iterdir()
  # Ctrl-C once the first point is saved: that point is kept.
  with monkeypatch.context() as m:
    m.setattr(cli._Stop, "__call__", lambda self: (folder / "points" / "000.json").exists())
    assert cli.main(_sweep_args(tmp_path)) == 130
  err = capsys.readouterr().err
  assert "interrupted; kept 1 finished point in" in err and err.count("\n") == 1
  assert [p.name for p in (folder / "points").iterdir()] == ["000.json"]
  # The same command continues: it trains the other point alone.
  trained = []

  def compare(config, *args, **kwargs):
    trained.append(config.adam.learning_rate)
    return real_compare(config, *args, **kwargs)

  real_compare = train.compare
  with monkeypatch.context() as m:
    m.setattr(train, "compare", compare)
    assert cli.main(_sweep_args(tmp_path)) == 0
  assert trained == [0.01]
  out = capsys.readouterr().out
  summary = json.loads((folder / "sweep.json").read_text())
  assert summary["complete"] and [p["values"] for p in summary["points"]] == [
    {"adam.learning_rate": 0.001},
    {"adam.learning_rate": 0.01},
  ]
  assert (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"
  # Each arm's best is the point with the highest mean final accuracy, measured here.
  for variant, name in (("baseline", "no GC"), ("gc", "GC")):
    means = [
      np.mean(np.asarray(p["variants"][variant]["test_accuracy"])[:, -1]) for p in summary["points"]
    ]
    best = summary["points"][int(np.argmax(means))]["values"]
    assert summary["arms"][variant]["best"] == best
    assert f"{name:6s} best: adam.learning_rate={best['adam.learning_rate']:g}" in out
  # The same command again trains nothing: every point is read back.
  monkeypatch.setattr(train, "compare", lambda *a, **k: pytest.fail("trained a finished point"))
  assert cli.main(_sweep_args(tmp_path)) == 0
  assert json.loads((folder / "sweep.json").read_text())["points"] == summary["points"]


def test_sweep_summary_against_numpy():
  rng = np.random.default_rng(0)
  acc = rng.uniform(0.5, 1.0, size=(3, 2, 4))  # points, variants, seeds
  results = [
    {
      "values": {"x": i},
      "seeds": [0, 1, 2, 3],
      "variants": {
        v: {"test_accuracy": [[a] for a in acc[i, j]], "diverged_at": [None, None, i or None, None]}
        for j, v in enumerate(("baseline", "gc"))
      },
    }
    for i in range(3)
  ]
  s = sweep.summarize([("x", [0, 1, 2])], results)
  best = {v: int(np.argmax(acc[:, j].mean(1))) for j, v in enumerate(("baseline", "gc"))}
  diff = acc[best["gc"], 1] - acc[best["baseline"], 0]
  assert s["arms"]["gc"]["best"] == {"x": best["gc"]}
  assert s["gc_best_minus_baseline_best"]["mean"] == pytest.approx(diff.mean())
  assert s["gc_best_minus_baseline_best"]["std"] == pytest.approx(diff.std(ddof=1))
  assert s["arms"]["baseline"]["no_divergence"] == [{"x": 0}]


def test_report_command_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    report.main(["--help"])
  assert e.value.code == 0 and "RUN_DIR" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path), "--png"])
  assert e.value.code == 2 and "--png: expected one argument" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path)])
  assert e.value.code == 2 and "no metrics.json" in capsys.readouterr().err


@pytest.mark.long
def test_installed_from_a_wheel_python_dash_m_runs_the_runner_from_any_folder(tmp_path):
  """``python -m optax_gc.experiments``, from a wheel's install, finds its configs and trains."""
  dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
  work.mkdir()
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "-w", str(dist)], check=True)
  (wheel,) = dist.glob("*.whl")
  assert any(n.startswith("optax_gc/configs/") for n in zipfile.ZipFile(wheel).namelist())
  subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
  env = dict(os.environ, PYTHONPATH=str(site))
  # Where `-m` looks the package up, from the same folder and environment: the wheel's copy.
  where = subprocess.run(
    [
      sys.executable,
      "-c",
      "import importlib.util; print(importlib.util.find_spec('optax_gc').origin)",
    ],
    cwd=work,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert where.stdout.startswith(str(site)), where.stdout  # not the checkout
  result = subprocess.run(
    [sys.executable, "-m", "optax_gc.experiments", *QUIET],
    cwd=work,
    env=env,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  assert "GC - no GC" in result.stdout and len(list((work / "runs").iterdir())) == 1
