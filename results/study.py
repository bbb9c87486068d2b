"""When does GC help? The study of results/README.md, as the optax-gc-compare commands it runs.

  python results/study.py                 # from the repository root; resumes where it stopped
  python results/study.py --dry-run       # print the commands only

For every config and both optimizers: a learning-rate sweep (SGD-momentum: 6
rates over 2.5 decades; Adam: 7 over 3; 3 seeds), then 5 seeds at each arm's
best rate; for the batch-norm
ResNets with SGD-momentum, a weight-decay sweep at each arm's best rate. Every
sweep is an ``optax-gc-compare --sweep=...`` command (printed as it starts);
their folders go to ``results/study/runs/``, the sweep.json files to
``results/study/``, and the tables to ``results/study/tables.md``.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from optax_gc.experiments import cli, report

HERE = Path(__file__).resolve().parent
OUT = HERE / "study"
CONFIGS = [
  "mnist1d_cnn",
  "mnist1d_mlp",
  "digits_cnn",
  "mnist1d_transformer",
  "mnist1d_resnet",
  "digits_resnet",
]
BATCH_NORM = ("mnist1d_resnet", "digits_resnet")
RATES = {
  "sgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
  "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}
DECAYS = (0.0, 1e-4, 5e-4, 2e-3, 5e-3)
NAMES = {"baseline": "no GC", "gc": "GC"}


def _csv(values) -> str:
  return ",".join(f"{v:g}" for v in values)


def sweep(name: str, config: str, optimizer: str, sweeps: list[str], *extra: str, dry: bool):
  """Runs one sweep (or reads it back: finished points are skipped) and keeps its sweep.json."""
  args = [
    f"--config={config}",
    f"--config.optimizer={optimizer}",
    "--config.progress=false",
    f"--workdir={os.path.relpath(OUT / 'runs')}",
    *(f"--sweep={s}" for s in sweeps),
    *extra,
  ]
  print("$ optax-gc-compare " + shlex.join(args), flush=True)
  if dry:
    return None
  if cli.main(args) != 0:
    raise SystemExit(f"the sweep {name} failed")
  found = sorted((OUT / "runs").glob(f"sweep-{config}-{optimizer}-*/sweep.json"))
  latest = max(found, key=lambda p: p.stat().st_mtime)
  shutil.copy(latest, OUT / f"{name}.json")
  return json.loads(latest.read_text())


def _rate_key(optimizer: str) -> str:
  return f"{optimizer}.learning_rate"


def _finals(point: dict, variant: str) -> np.ndarray:
  return np.asarray(point["variants"][variant]["test_accuracy"], dtype=float)[:, -1] * 100


def _diverged(point: dict, variant: str) -> bool:
  return any(s is not None for s in point["variants"][variant]["diverged_at"])


def _trained(point: dict, variant: str) -> bool:
  """Every seed ends with a finite train loss below half of ln(10), a constant guess's loss.

  At too large a rate, runs without GC tend to collapse to a constant output
  (loss ln 10, finite); runs with GC to go non-finite. Neither has trained.
  """
  final = np.asarray(point["variants"][variant]["train_loss"], dtype=float)[:, -1]
  return bool(np.all(np.isfinite(final) & (final < 0.5 * np.log(10))))


def cost_minutes(found: dict) -> float:
  """Training time of every point of every sweep (both arms, all seeds at once), in minutes."""
  return (
    sum(
      p["variants"][v]["wall_s"]
      for sweeps in found.values()
      for result in sweeps.values()
      if result is not None
      for p in result["points"]
      for v in ("baseline", "gc")
    )
    / 60
  )


def run(dry: bool) -> dict:
  """Every sweep of the study; returns ``{(config, optimizer): {"rates", "bests", "decays"}}``."""
  found = {}
  for config in CONFIGS:
    for optimizer in ("sgd", "adam"):
      key = _rate_key(optimizer)
      rates = sweep(
        f"{config}-{optimizer}-rates",
        config,
        optimizer,
        [f"{key}={_csv(RATES[optimizer])}"],
        "--config.seeds=3",
        dry=dry,
      )
      if dry:
        continue
      best = sorted({rates["arms"][v]["best"][key] for v in ("baseline", "gc")})
      bests = sweep(
        f"{config}-{optimizer}-bests",
        config,
        optimizer,
        [f"{key}={_csv(best)}"] if len(best) > 1 else [],
        "--config.seeds=5",
        *([f"--config.{key}={best[0]:g}", "--sweep=first_seed=0"] if len(best) == 1 else []),
        dry=dry,
      )
      decays = None
      if config in BATCH_NORM and optimizer == "sgd":
        decays = sweep(
          f"{config}-{optimizer}-decays",
          config,
          optimizer,
          [f"weight_decay={_csv(DECAYS)}", f"{key}={_csv(best)}"],
          "--config.seeds=3",
          dry=dry,
        )
      found[config, optimizer] = {"rates": rates, "bests": bests, "decays": decays}
  return found


def _at(points: list[dict], values: dict) -> dict:
  return next(p for p in points if all(p["values"].get(k) == v for k, v in values.items()))


def tables(found: dict) -> str:
  """The study's tables, in markdown."""
  label = {"sgd": "SGD-momentum", "adam": "Adam"}
  best_rows, range_rows, decay_rows = [], [], []
  for (config, optimizer), sweeps in found.items():
    key = _rate_key(optimizer)
    rates, bests = sweeps["rates"], sweeps["bests"]
    best = {v: rates["arms"][v]["best"][key] for v in ("baseline", "gc")}
    # One best rate for both arms: its 5-seed run is the bests sweep's only point.
    one = key not in bests["points"][0]["values"]
    acc = {
      v: _finals(bests["points"][0] if one else _at(bests["points"], {key: best[v]}), v)
      for v in best
    }
    diff = acc["gc"] - acc["baseline"]
    best_rows.append(
      f"| {config} | {label[optimizer]} | {best['baseline']:g} | "
      f"{acc['baseline'].mean():.2f} ± {acc['baseline'].std(ddof=1):.2f} | {best['gc']:g} | "
      f"{acc['gc'].mean():.2f} ± {acc['gc'].std(ddof=1):.2f} | "
      f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f} | {int((diff > 0).sum())}/{len(diff)} |"
    )
    cells = []
    for v in ("baseline", "gc"):
      means = {p["values"][key]: _finals(p, v).mean() for p in rates["points"]}
      top = max(means.values())
      near = sorted(r for r, m in means.items() if m >= top - 1.0)
      trains = [p["values"][key] for p in rates["points"] if _trained(p, v)]
      unstable = [p["values"][key] for p in rates["points"] if _diverged(p, v)]
      cells += [
        f"{', '.join(f'{r:g}' for r in near)} ({len(near)})",
        f"{max(trains):g}" if trains else "none",
        f"{min(unstable):g}" if unstable else "-",
      ]
    range_rows.append(f"| {config} | {label[optimizer]} | " + " | ".join(cells) + " |")
    if sweeps["decays"] is not None:
      for wd in DECAYS:
        row = [f"{wd:g}"]
        for v in ("baseline", "gc"):
          a = _finals(_at(sweeps["decays"]["points"], {"weight_decay": wd, key: best[v]}), v)
          row.append(f"{a.mean():.2f} ± {a.std(ddof=1):.2f}")
        decay_rows.append(f"| {config} | " + " | ".join(row) + " |")
  return "\n".join(
    [
      "### Best against best: 5 seeds at each arm's best learning rate",
      "",
      "| config | optimizer | no GC: best rate | no GC: final test acc % | GC: best rate | "
      "GC: final test acc % | GC − no GC (paired by seed) | seeds GC better |",
      "|---|---|---|---|---|---|---|---|",
      *best_rows,
      "",
      "### Learning rates within 1 point of each arm's best, the largest that trains, the "
      "smallest that diverges",
      "",
      "| config | optimizer | no GC: rates within 1 point (count) | no GC: largest rate, every "
      "seed trained | no GC: smallest rate, a seed diverged | GC: rates within 1 point (count) | "
      "GC: largest rate, every seed trained | GC: smallest rate, a seed diverged |",
      "|---|---|---|---|---|---|---|---|",
      *range_rows,
      "",
      "### Weight decay at each arm's best rate (batch-norm ResNets, SGD-momentum, 3 seeds)",
      "",
      "| config | weight decay | no GC: final test acc % | GC: final test acc % |",
      "|---|---|---|---|",
      *decay_rows,
    ]
  )


def figure(found: dict, path: Path) -> None:
  """Final test accuracy against the learning rate, every config and optimizer, both arms."""
  from matplotlib.figure import Figure

  keys = list(found)
  cols = 4
  rows = -(-len(keys) // cols)
  fig = Figure(figsize=(3.3 * cols, 2.7 * rows), dpi=80, layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (config, optimizer) in zip(axes, keys, strict=False):
    key = _rate_key(optimizer)
    points = sorted(found[config, optimizer]["rates"]["points"], key=lambda p: p["values"][key])
    x = [p["values"][key] for p in points]
    for v in ("baseline", "gc"):
      acc = np.asarray([_finals(p, v) for p in points])
      ax.plot(x, acc.mean(1), "o-", color=report.COLORS[v], label=NAMES[v], ms=3)
      ax.fill_between(x, acc.min(1), acc.max(1), color=report.COLORS[v], alpha=0.15, lw=0)
      bad = [(xv, a) for xv, a, p in zip(x, acc.mean(1), points, strict=True) if _diverged(p, v)]
      if bad:
        ax.plot(*zip(*bad, strict=True), "x", color=report.COLORS[v], ms=7, mew=2)
    top = max(_finals(p, v).mean() for p in points for v in ("baseline", "gc"))
    ax.set_ylim(max(0, top - 25), min(100, top + 3))
    ax.set_xscale("log")
    ax.set_title(f"{config}, {'SGD-m' if optimizer == 'sgd' else 'Adam'}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[len(keys) :]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7)
  axes[0].set_ylabel("final test accuracy %")
  fig.suptitle("Learning-rate sweeps: mean over 3 seeds, band = min-max, x = a seed diverged")
  fig.savefig(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  OUT.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  found = run(args.dry_run)
  if args.dry_run:
    return 0
  text = tables(found)
  minutes = (time.perf_counter() - start) / 60
  cost = cost_minutes(found)
  (OUT / "tables.md").write_text(
    text + f"\n\nTraining time of all sweeps (both arms, every seed): {cost:.0f} minutes.\n"
  )
  figure(found, HERE / "study.png")
  print(text)
  print(f"study: {minutes:.0f} minutes now; training time of all sweeps {cost:.0f} minutes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
