"""``optax-gc-compare``: train a config with and without GC over several seeds, or sweep it.

Flags follow the Flax examples (absl, ``ml_collections.config_flags``)::

  optax-gc-compare [--config=NAME_OR_PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]
                   [--sweep=FIELD=V1,V2,... ...] [--max_minutes=M]

Without ``--sweep`` it prints a summary table, then writes the folder it names
(metrics.json, summary.md, gc_plan.txt, curves.png); with it, it trains at
every point of the grid (see :mod:`optax_gc.experiments.sweep`). Bad input
exits with status 2 and a one-line message, before anything is trained or
written. Results that cannot be written (a full disk) exit with status 1 and a
line naming the file, after the table is printed. Ctrl-C or SIGTERM stops
within about a second, keeping what was evaluated (a single run's results up
to its last evaluation, a sweep's finished points), and exits with status 130
or 143; a second one quits at once.
"""

import math
import os
import platform
import shlex
import signal
import sys
import time

from absl import flags

from optax_gc.experiments import PROG
from optax_gc.experiments import config as config_lib


def _define(argv: list[str], config) -> flags.FlagValues:
  from ml_collections import config_flags

  values = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    "config",
    config,
    "the config: --config=NAME (one listed below) or --config=PATH.py; override its fields "
    "with --config.FIELD=VALUE, e.g. --config.seeds=3 --config.sgd.learning_rate=0.05",
    flag_values=values,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_string(
    "workdir", None, "where the run's folder goes (default: the config's)", flag_values=values
  )
  flags.DEFINE_multi_string(
    "sweep",
    [],
    "FIELD=V1,V2,...: train at every value (repeatable; the grid is the product), "
    "e.g. --sweep=sgd.learning_rate=0.03,0.1,0.3",
    flag_values=values,
  )
  flags.DEFINE_float(
    "max_minutes",
    0.0,
    "sweeps: start no point after this many minutes (0: no limit)",
    flag_values=values,
  )
  return values


def _split_config(argv: list[str]) -> tuple[list[str], str]:
  """The arguments without ``--config=SPEC``, and the spec (a name or a path; default: default)."""
  out, spec = [], "default"
  args = iter(argv)
  for arg in args:
    if arg == "--config":
      arg = f"--config={next(args, '')}"
    if arg.startswith("--config="):
      spec = arg.partition("=")[2]
    else:
      out.append(arg)
  return out, spec


def parse(argv: list[str]):
  """``(config, sweeps, max_minutes)`` from the command line; :class:`UsageError` if it is bad."""
  argv, spec = _split_config(argv)
  try:
    values = _define([PROG, *argv], config_lib.load(spec))
    rest = values([PROG, *argv])[1:]
  except flags.Error as e:
    raise config_lib.UsageError(str(e).splitlines()[0]) from None
  except AttributeError:  # config_flags: an unknown --config.FIELD; say which, and the closest
    for arg in argv:
      if arg.startswith("--config."):
        config_lib.holder(config_lib.load(spec), arg.removeprefix("--config.").partition("=")[0])
    raise
  if rest:
    raise config_lib.UsageError(
      f"unexpected argument {rest[0]!r}; flags look like --config.seeds=3 (see --help)"
    )
  config = values.config
  if values.workdir is not None:
    with config.unlocked():
      config.workdir = values.workdir
  if not (math.isfinite(values.max_minutes) and values.max_minutes >= 0):
    raise config_lib.UsageError(
      f"--max_minutes={values.max_minutes:g}: must be a number >= 0 (0: no limit), e.g. 30"
    )
  return config, values.sweep, values.max_minutes


def usage() -> str:
  values = _define([PROG], config_lib.load("default"))
  names = ", ".join(config_lib.config_names())
  return (
    f"usage: {PROG} [--config=NAME_OR_PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]\n"
    f"       [--sweep=FIELD=V1,V2,... ...] [--max_minutes=M]\n\n"
    f"{values.get_help()}\n\nconfigs: {names}"
  )


class _Stop:
  """Ctrl-C (SIGINT) or SIGTERM asks training to stop; a second one quits at once.

  Training asks this object (``stop()``) between two calls into XLA, about
  every second; the handler itself runs at once, since the main thread waits
  for XLA on a lock (see ``train``). ``status`` is the exit status for the
  signal received: 130 for Ctrl-C, 143 for SIGTERM.
  """

  NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

  def __init__(self):
    self.signal: int | None = None

  def __call__(self) -> bool:
    return self.signal is not None

  @property
  def status(self) -> int:
    return 128 + (self.signal or signal.SIGINT)

  def _handle(self, signum, frame):
    if self.signal is not None:
      print(f"\n{PROG}: quit; only what was already saved is kept", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signal = signum
    print(
      f"\n{PROG}: {self.NAMES[signum]}: stopping, keeping what was evaluated "
      "(Ctrl-C again quits at once)",
      file=sys.stderr,
      flush=True,
    )

  def __enter__(self):
    self._old = {s: signal.signal(s, self._handle) for s in self.NAMES}
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


def _versions() -> dict:
  import flax
  import jax
  import optax

  import optax_gc

  return {
    "optax_gc": optax_gc.__version__,
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "device": str(jax.devices()[0].device_kind),
  }


def main(argv: list[str] | None = None) -> int:
  """Runs the comparison or the sweep; returns the exit status.

  0; 1 results not written; 2 bad input; 130 Ctrl-C; 143 SIGTERM.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(usage())
    return 0
  with _Stop() as stop:  # from the start: a Ctrl-C while loading stops before training
    return _run(argv, stop)


def _tell(message: str) -> None:
  print(f"{PROG}: {message}", file=sys.stderr)


def _error(message: str) -> None:
  _tell(f"error: {message}")


def _warn(message: str) -> None:
  from tqdm import tqdm

  tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)  # keeps a progress bar whole


def _run(argv: list[str], stop: _Stop) -> int:
  from optax_gc.experiments import report, sweep, train

  start = time.perf_counter()
  try:
    config, sweeps, max_minutes = parse(argv)
    config_lib.validate(config)
    config_lib.check_writable(config.workdir)
    grid = sweep.parse(sweeps, config)
    if grid:
      sweep.points(config, grid)  # every point's config is checked before the data loads
    else:
      dataset, plan = train.prepare(config)
  except config_lib.UsageError as e:
    _error(str(e))
    return 2
  command = shlex.join([PROG, *argv])
  if grid:
    return _sweep(config, grid, max_minutes, stop, command)
  bar = train.progress_bar(train.steps_of(config), disable=not config.progress)
  try:
    with bar:
      results = train.compare(config, dataset, bar, stop)
  except train.Interrupted as e:
    if e.results is None:
      _tell(f"interrupted at {e}, before the first evaluation; nothing was written")
      return stop.status
    results = e.results
  results.update(
    config=config.to_dict(),
    target_loss=config.target_loss,
    command=command,
    versions=_versions(),
    wall_s=time.perf_counter() - start,
  )
  report.summarize(results)
  print(report.text_table(results), flush=True)  # shown before anything that can fail
  try:
    run_dir, problems = report.write_run(results, config.workdir, str(plan))
  except report.WriteError as e:
    _error(f"{e}; the table above is what is kept")
    return 1
  for problem in problems:
    _warn(problem)
  if results["stopped"]:
    _tell(f"{results['stopped']}; kept the results up to there in {run_dir}/")
    return stop.status
  print(f"Wrote {run_dir}/ in {results['wall_s']:.0f} s")
  return 0


def _sweep(config, grid, max_minutes, stop: _Stop, command) -> int:
  from optax_gc.experiments import report, sweep, train

  try:
    out, summary, error = sweep.run(
      config,
      grid,
      max_minutes=max_minutes,
      interrupt=stop,
      about={"command": command, "versions": _versions()},
      log=_warn,
    )
  except config_lib.UsageError as e:
    _error(str(e))
    return 2
  except report.WriteError as e:
    _error(f"{e}; nothing was trained")
    return 1
  except train.Interrupted:
    done = len(list((sweep.folder(config, grid) / "points").glob("*.json")))
    _tell(
      f"interrupted; kept {done} finished point{'s' * (done != 1)} in "
      f"{sweep.folder(config, grid)}/ (the same command continues from there)"
    )
    return stop.status
  print(sweep.text(summary), flush=True)
  if error:
    _error(error)
    return 1
  print(f"Wrote {out}/ (sweep.json, sweep.png, points/)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
