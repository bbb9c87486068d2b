"""``optax-gc-compare``: train a config with and without GC over several seeds, or sweep it.

Flags follow the Flax examples (absl, ``ml_collections.config_flags``)::

  optax-gc-compare [--config=NAME_OR_PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]
                   [--sweep=FIELD=V1,V2,... ...] [--max_minutes=M]

Without ``--sweep`` it prints a summary table and names the folder it wrote
(metrics.json, summary.md, gc_plan.txt, curves.png); with it, it trains at
every point of the grid (see :mod:`optax_gc.experiments.sweep`). Bad input
exits with status 2 and a one-line message, before anything is trained or
written; Ctrl-C stops between two blocks of steps and exits with status 130,
saying what was kept.
"""

import os
import platform
import shlex
import signal
import sys
import time

from absl import flags

from optax_gc.experiments import config as config_lib

PROG = "optax-gc-compare"


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
  if values.max_minutes < 0:
    raise config_lib.UsageError(f"--max_minutes={values.max_minutes:g}: must be >= 0 (0: no limit)")
  return config, values.sweep, values.max_minutes


def usage() -> str:
  values = _define([PROG], config_lib.load("default"))
  names = ", ".join(config_lib.config_names())
  return (
    f"usage: {PROG} [--config=NAME_OR_PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]\n"
    f"       [--sweep=FIELD=V1,V2,... ...] [--max_minutes=M]\n\n"
    f"{values.get_help()}\n\nconfigs: {names}"
  )


class _CtrlC:
  """SIGINT asks training to stop between two blocks of steps (never inside XLA); twice quits."""

  def __init__(self):
    self.requested = False

  def __call__(self) -> bool:
    return self.requested

  def _handle(self, signum, frame):
    if self.requested:
      print(f"\n{PROG}: quit; only what was already saved is kept", file=sys.stderr, flush=True)
      os._exit(130)
    self.requested = True
    print(
      f"\n{PROG}: stopping after this block of steps (Ctrl-C again quits at once)", file=sys.stderr
    )

  def __enter__(self):
    self._old = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGINT, self._old)


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
  """Runs the comparison or the sweep; returns the exit status (0; 2 bad input; 130 Ctrl-C)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(usage())
    return 0
  with _CtrlC() as ctrl_c:  # from the start: a Ctrl-C while loading stops before training
    return _run(argv, ctrl_c)


def _run(argv: list[str], ctrl_c: _CtrlC) -> int:
  from optax_gc.experiments import report, sweep, train

  start = time.perf_counter()
  try:
    config, sweeps, max_minutes = parse(argv)
    config_lib.validate(config)
    config_lib.check_writable(config.workdir)
    grid = sweep.parse(sweeps, config)
    if grid:
      sweep.points(config, grid)  # every point's config is checked before any training
    else:
      dataset, plan = train.prepare(config)
  except config_lib.UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  command = shlex.join([PROG, *argv])
  if grid:
    return _sweep(config, grid, max_minutes, ctrl_c, command)
  bar = train.progress_bar(train.steps_of(config), disable=not config.progress)
  try:
    with bar:
      results = train.compare(config, dataset, bar, ctrl_c)
  except train.Interrupted as e:
    print(f"{PROG}: interrupted at {e}; nothing was written", file=sys.stderr)
    return 130
  results.update(
    config=config.to_dict(),
    target_loss=config.target_loss,
    command=command,
    versions=_versions(),
    wall_s=time.perf_counter() - start,
  )
  report.summarize(results)
  run_dir, problems = report.write_run(results, config.workdir, str(plan))
  print(report.text_table(results))
  for problem in problems:
    print(f"{PROG}: warning: {problem}", file=sys.stderr)
  print(f"Wrote {run_dir}/ in {results['wall_s']:.0f} s")
  return 0


def _sweep(config, grid, max_minutes, ctrl_c, command) -> int:
  from optax_gc.experiments import sweep, train

  try:
    out, summary = sweep.run(
      config,
      grid,
      max_minutes=max_minutes,
      interrupt=ctrl_c,
      about={"command": command, "versions": _versions()},
    )
  except train.Interrupted:
    done = len(list((sweep.folder(config, grid) / "points").glob("*.json")))
    print(
      f"{PROG}: interrupted; kept {done} finished point{'s' * (done != 1)} in "
      f"{sweep.folder(config, grid)}/ (the same command continues from there)",
      file=sys.stderr,
    )
    return 130
  print(sweep.text(summary))
  print(f"Wrote {out}/ (sweep.json, sweep.png, points/)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
