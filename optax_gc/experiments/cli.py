"""``optax-gc-compare``: train one config with and without GC over several seeds.

Usage::

  optax-gc-compare --config=NAME_OR_PATH [--config.FIELD=VALUE ...] [--workdir=DIR]
  python -m optax_gc.experiments --config=configs/mnist1d_cnn.py --config.seeds=3

Prints a summary table and names the folder it wrote (metrics.json,
curves.png, summary.md, gc_plan.txt). Bad input exits with status 2 and a
one-line message, before any training and without writing anything.
"""

import platform
import shlex
import sys
import time

USAGE = (
  "usage: optax-gc-compare [--config=NAME_OR_PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]\n"
  "  --config           a configs/NAME.py file or a bare NAME (default: default)\n"
  "  --config.FIELD     override a config field, e.g. --config.seeds=3 "
  "--config.optimizer=sgd --config.adam.learning_rate=3e-3\n"
  "  --workdir          where the run's folder is written (default: the config's workdir)\n"
)


def parse_args(argv: list[str]) -> tuple[str, list[tuple[str, str]], str | None]:
  """Splits ``argv`` into the config spec, the field overrides and the workdir.

  Accepts ``--flag=value`` and ``--flag value``.

  Example:
    >>> parse_args(["--config", "mnist1d_mlp", "--config.seeds=2"])
    ('mnist1d_mlp', [('seeds', '2')], None)
  """
  from optax_gc.experiments.config import UsageError

  spec, overrides, workdir = "default", [], None
  args = list(argv)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--"):
      raise UsageError(f"unexpected argument {arg!r}; flags look like --config.seeds=3")
    name, eq, value = arg[2:].partition("=")
    if not eq:
      if not args:
        raise UsageError(f"--{name} needs a value: --{name}=VALUE")
      value = args.pop(0)
    if name == "config":
      spec = value
    elif name.startswith("config."):
      overrides.append((name[len("config.") :], value))
    elif name == "workdir":
      workdir = value
    else:
      raise UsageError(
        f"unknown flag --{name}; use --config=NAME, --config.FIELD=VALUE or --workdir=DIR "
        "(see --help)"
      )
  return spec, overrides, workdir


def main(argv: list[str] | None = None) -> int:
  """Runs the comparison; returns the exit status (0, or 2 for bad input)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help") for a in argv):
    from optax_gc.experiments.config import config_names

    print(USAGE + f"configs: {', '.join(config_names())}")
    return 0
  from optax_gc.experiments import config as config_lib
  from optax_gc.experiments import report, train

  start = time.perf_counter()
  try:
    spec, overrides, workdir = parse_args(argv)
    config = config_lib.load(spec)
    for key, value in overrides:
      config_lib.override(config, key, value)
    if workdir is not None:
      config.workdir = workdir
    config_lib.validate(config)
    config_lib.check_writable(config.workdir)
    dataset, plan = train.prepare(config)
  except config_lib.UsageError as e:
    print(f"optax-gc-compare: error: {e}", file=sys.stderr)
    return 2

  import flax
  import jax
  import optax

  import optax_gc

  results = train.compare(config, dataset)
  results.update(
    config=config.to_dict(),
    target_loss=config.target_loss,
    command=shlex.join(["optax-gc-compare", *argv]),
    versions={
      "optax_gc": optax_gc.__version__,
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "device": str(jax.devices()[0].device_kind),
    },
    wall_s=time.perf_counter() - start,
  )
  report.summarize(results)
  run_dir = report.write_run(results, config.workdir, str(plan))
  print(report.text_table(results))
  print(
    f"Wrote {run_dir}/ (metrics.json, curves.png, summary.md, gc_plan.txt) "
    f"in {results['wall_s']:.0f} s"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
