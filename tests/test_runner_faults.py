"""The runner when things go wrong: a full disk, damaged files, two runs at once, signals.

Each failure is met as a user meets it: a real file-size limit
(``RLIMIT_FSIZE``) in a process of its own, real signals, a real second
process. Every training here is tiny; the long ones are stopped by the test.
"""

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

import optax_gc.experiments
from optax_gc.experiments import cli, report

pytestmark = pytest.mark.long  # a process per fault

ROOT = Path(__file__).resolve().parents[1]
TINY = [
  "--config=mnist1d_mlp",
  "--config.data.num_samples=500",  # 400 training signals: made in a tenth of the time
  "--config.seeds=1",
  "--config.num_steps=4",
  "--config.eval_every=2",
  "--config.progress=false",
]
# One block of many short steps: long enough that a test must stop it.
LONG = [
  "--config=mnist1d_mlp",
  "--config.data.num_samples=500",
  "--config.seeds=1",
  "--config.batch_size=10",
  "--config.num_steps=300000",
]
MAIN = "import sys; from optax_gc.experiments import main; sys.exit(main(sys.argv[1:]))"


class _Process:
  """The runner in a process of its own; its output is collected as it comes."""

  def __init__(self, args, cwd, *, before=""):
    self.proc = subprocess.Popen(
      [sys.executable, "-c", before + MAIN, *args],
      cwd=cwd,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.out: list[str] = []
    self.err: list[str] = []
    self.collectors = [
      threading.Thread(target=self._collect, args=(stream, into), daemon=True)
      for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
    ]
    for collector in self.collectors:
      collector.start()

  @staticmethod
  def _collect(stream, into):
    with stream:
      for char in iter(lambda: stream.read(1), ""):
        into.append(char)

  def wait_for(self, pattern: str, timeout: float) -> bool:
    """Whether stderr shows ``pattern`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and self.proc.poll() is None:
      if re.search(pattern, "".join(self.err)):
        return True
      time.sleep(0.05)
    return bool(re.search(pattern, "".join(self.err)))

  def finish(self, timeout: float) -> tuple[int, str, str]:
    """``(status, stdout, stderr)`` once it ends; killed after ``timeout`` seconds."""
    try:
      status = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f"still running {timeout} s later; stderr: {''.join(self.err)[-2000:]}")
    for collector in self.collectors:
      collector.join()
    return status, "".join(self.out), "".join(self.err)


def _lines(err: str) -> list[str]:
  """The runner's own lines of stderr (a progress bar's are left out)."""
  return [line for line in err.splitlines() if line.startswith("optax-gc-compare:")]


def _limited(size: int) -> str:
  """Code that caps the size of every file the process writes, before jax is imported.

  The process leaves the run's compilation cache (conftest.py) alone: an entry cut
  short by the cap would be read, damaged, by the processes after it.
  """
  return (
    "import os, resource; os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)\n"
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size}))\n"
  )


def test_results_that_cannot_be_written_are_printed_and_the_file_named(tmp_path):
  """A run's metrics.json, then a sweep's first point, in one process with a full disk.

  Each is a few kB: a 2 kB file-size limit stops it, as a full disk would. The process
  runs the comparison, prints a line with its exit status on both streams, then the sweep.
  """
  runs, sweeps = tmp_path / "runs", tmp_path / "sweeps"
  first = (
    "import sys\nfrom optax_gc.experiments import main\n"
    f"status = main({[*TINY, f'--workdir={runs}']!r})\n"
    "for stream in (sys.stdout, sys.stderr):\n  print(f'--- {status}', file=stream, flush=True)\n"
  )
  args = [*TINY, "--sweep=adam.learning_rate=0.001,0.01", f"--workdir={sweeps}"]
  status, out, err = _Process(args, tmp_path, before=_limited(2000) + first).finish(120)
  assert "Traceback" not in err, err
  (run_out, run_status, out), (run_err, _, err) = (
    re.split(r"^--- (\d+)\n", t, flags=re.M) for t in (out, err)
  )

  # The comparison: its results, then the file it could not write; no folder is left.
  assert run_status == "1", run_err
  assert "GC - no GC, final test accuracy" in run_out  # the results, before the write
  (line,) = _lines(run_err)
  assert re.fullmatch(
    rf"optax-gc-compare: error: {runs}/mnist1d_mlp-adam-[\d-]+/metrics.json not "
    r"written: File too large; the table above is what is kept",
    line,
  ), line
  assert list(runs.iterdir()) == []  # no folder, no half file, no temporary

  # The sweep stops at the point it could not save, and prints that point's result.
  assert status == 1, err
  assert re.search(r"adam.learning_rate=0.001: no GC [\d.]+ ± [\d.]+ ", out)  # its result
  assert "1 of 2 points done (a point could not be saved)" in out
  (line,) = _lines(err)
  assert re.fullmatch(
    rf"optax-gc-compare: error: {sweeps}/sweep-mnist1d_mlp-adam-\w+/points/000.json not "
    r"written: File too large; the table above holds the points, .*",
    line,
  ), line
  (folder,) = sweeps.glob("sweep-*")
  assert list((folder / "points").iterdir()) == []
  assert not (folder / "sweep.json").exists()


def test_a_damaged_point_file_is_named_and_trained_again(tmp_path, capsys):
  args = [*TINY, "--sweep=adam.learning_rate=0.001,0.01", f"--workdir={tmp_path}"]
  assert cli.main([*args, "--max_minutes=1e-9"]) == 0  # the folder, no point trained
  (points,) = tmp_path.glob("sweep-*/points")
  # Not JSON (empty, as a write cut short at its start leaves it; a half-written file is
  # read alike), and JSON of another schema.
  damaged = {
    "000.json": "",
    "001.json": '{"values": {"adam.learning_rate": 0.01}, "accuracy": 0.9}',
  }
  for name, text in damaged.items():
    (points / name).write_text(text)
  capsys.readouterr()
  assert cli.main(args) == 0
  err = capsys.readouterr().err
  for name, kind in zip(damaged, ("JSONDecodeError", "KeyError"), strict=True):
    assert f"warning: {points / name} is damaged ({kind}" in err, err
    assert "training that point again" in err
    assert json.loads((points / name).read_text())["variants"]["gc"]["test_accuracy"]
  assert len(_lines(err)) == 2


@pytest.mark.parametrize(
  "text, kind",
  [("", "JSONDecodeError"), ('{"steps": [10, 2', "JSONDecodeError"), ("{}", "KeyError")],
  ids=["empty", "truncated", "another schema"],
)
def test_report_names_a_damaged_metrics_file(text, kind, tmp_path, capsys):
  (tmp_path / "metrics.json").write_text(text)
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path)])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert f"{tmp_path}/metrics.json is not a metrics.json that optax-gc-compare wrote ({kind}" in err
  assert "Traceback" not in err


def test_one_process_at_a_time_runs_a_sweep_and_a_dead_one_holds_nothing(tmp_path, capsys):
  sweep = ["--sweep=adam.learning_rate=0.001,0.01", f"--workdir={tmp_path}"]
  first = _Process([*LONG, *sweep], tmp_path)
  try:
    assert first.wait_for(r"[1-9]\d*/1200000", 120), "".join(first.err)  # it trains
    # The same sweep again, while the first trains: refused, naming the folder and the process.
    assert cli.main([*LONG, *sweep, "--config.progress=false", "--max_minutes=1e-9"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
      rf"optax-gc-compare: error: {tmp_path}/sweep-mnist1d_mlp-adam-\w+ is in use by process "
      rf"{first.proc.pid} on .+, running the same sweep; .*\n",
      err,
    ), err
  finally:
    first.proc.kill()  # SIGKILL: it dies holding the lock
    first.proc.wait()
  assert cli.main([*LONG, *sweep, "--config.progress=false", "--max_minutes=1e-9"]) == 0
  assert "0 of 2 points done" in capsys.readouterr().out


def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_what_was_evaluated(tmp_path):
  run = _Process([*LONG, "--config.eval_every=50", f"--workdir={tmp_path}"], tmp_path)
  assert run.wait_for("test.acc", 120), "".join(run.err)  # an evaluation is done
  run.proc.send_signal(signal.SIGTERM)
  status, out, err = run.finish(60)
  assert status == 143, err
  assert "Traceback" not in err
  stopping, kept = _lines(err)
  assert stopping == "optax-gc-compare: SIGTERM: stopping, keeping what was evaluated " + (
    "(Ctrl-C again quits at once)"
  )
  step = int(re.fullmatch(r".*: interrupted at step (\d+) of 300000; kept .*", kept)[1])
  (folder,) = tmp_path.iterdir()
  metrics = json.loads((folder / "metrics.json").read_text())
  assert metrics["steps"][-1] == step and step % 50 == 0
  assert metrics["stopped"] == f"interrupted at step {step} of 300000"
  assert f"mnist1d_mlp (stopped at step {step})" in out
  assert {p.name for p in folder.iterdir()} >= {"metrics.json", "summary.md", "curves.png"}


def test_ctrl_c_in_a_long_block_of_steps_stops_within_a_second(tmp_path):
  run = _Process([*LONG, "--config.eval_every=300000", f"--workdir={tmp_path}"], tmp_path)
  assert run.wait_for(r"[1-9]\d*/600000", 120), "".join(run.err)  # inside the block
  run.proc.send_signal(signal.SIGINT)
  sent = time.monotonic()
  status, _, err = run.finish(60)
  assert time.monotonic() - sent < 5  # about a second, on a busy machine
  assert status == 130, err
  assert _lines(err) == [
    "optax-gc-compare: Ctrl-C: stopping, keeping what was evaluated (Ctrl-C again quits at once)",
    "optax-gc-compare: interrupted at step 0 of 300000, before the first evaluation; "
    "nothing was written",
  ]
  assert list(tmp_path.iterdir()) == []


def test_a_second_ctrl_c_quits_at_once(tmp_path):
  # Calls into XLA of many minutes: the first Ctrl-C is heard at once but waits for the call.
  slow = "import optax_gc.experiments.train as t; t.SECONDS_PER_CALL = 600\n"
  args = [*LONG, "--config.eval_every=300000", f"--workdir={tmp_path}"]
  run = _Process(args, tmp_path, before=slow)
  assert run.wait_for(r"[1-9]\d*/600000", 120), "".join(run.err)
  time.sleep(3)  # the next calls: one more to measure the speed, then the long one
  run.proc.send_signal(signal.SIGINT)
  assert run.wait_for("Ctrl-C: stopping", 5), "".join(run.err)
  run.proc.send_signal(signal.SIGINT)
  sent = time.monotonic()
  status, _, err = run.finish(60)
  assert time.monotonic() - sent < 5
  assert status == 130 and "Traceback" not in err
  assert _lines(err)[-1] == "optax-gc-compare: quit; only what was already saved is kept"
  assert list(tmp_path.iterdir()) == []


def test_without_the_experiments_extra_the_command_names_what_to_install(tmp_path):
  # As if ml_collections and mnist1d were not installed: importing them fails as it would.
  (tmp_path / "sitecustomize.py").write_text(
    "import sys\nsys.modules['ml_collections'] = sys.modules['mnist1d'] = None\n"
  )
  command = shutil.which("optax-gc-compare", path=Path(sys.executable).parent)
  path = os.environ.get("PYTHONPATH")
  result = subprocess.run(
    [command, *TINY, f"--workdir={tmp_path}/runs"],
    cwd=tmp_path,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), path]))),
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2, result.stderr
  assert result.stderr == (
    "optax-gc-compare: error: the runner needs the experiments extra (missing: ml_collections, "
    'mnist1d); install it with: pip install "optax_gc[experiments]"\n'
  )
  assert not (tmp_path / "runs").exists()


def test_the_modules_checked_for_are_those_the_experiments_extra_installs():
  extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  wanted = {re.split(r"[\[<>=]", r)[0] for r in extra["experiments"]} - {"optax_gc"} | {"flax"}
  provides = importlib.metadata.packages_distributions()  # import name: its distributions

  def name(distribution):
    return distribution.lower().replace("_", "-")

  checked = {name(d) for m in optax_gc.experiments.EXTRA_MODULES for d in provides[m]}
  assert {name(w) for w in wanted} <= checked
