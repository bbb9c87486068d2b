"""Sweeps: one config trained with and without GC at every point of a grid of field values.

``--sweep=FIELD=V1,V2,...`` (repeatable; the grid is the product) runs the
comparison at every point, the same seeds at each, so GC and no GC can be
compared tuned against tuned. Each finished point is saved at once under
``points/`` in the sweep's folder, whose name comes from the config and the
grid: the same command, run again, skips the finished points. The folder gets
``sweep.json`` (every point's metrics and config) and ``sweep.png``.
"""

import copy
import hashlib
import itertools
import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from optax_gc.experiments import config as config_lib
from optax_gc.experiments import report, train

Grid = list[tuple[str, list]]


def parse(specs: list[str], config: ml_collections.ConfigDict) -> Grid:
  """``[(field, values)]`` from ``FIELD=V1,V2`` strings, each value read as the field's type.

  Example:
    >>> parse(["sgd.learning_rate=0.1,0.3"], config_lib.base_config())
    [('sgd.learning_rate', [0.1, 0.3])]
  """
  grid: Grid = []
  for spec in specs:
    field, eq, raw = spec.partition("=")
    if not eq or not raw:
      raise config_lib.UsageError(
        f"--sweep={spec}: give FIELD=V1,V2,..., e.g. --sweep=sgd.learning_rate=0.03,0.1,0.3"
      )
    if field in (f for f, _ in grid):
      raise config_lib.UsageError(
        f"--sweep={spec}: {field} is swept twice; give one --sweep for it"
      )
    probe = copy.deepcopy(config)
    values = []
    for item in raw.split(","):
      try:
        config_lib.override(probe, field, item.strip())
      except config_lib.UsageError as e:
        raise config_lib.UsageError(f"--sweep={spec}: {e}") from None
      *parents, last = field.split(".")
      values.append(_node(probe, parents)[last])
    if len(set(map(repr, values))) != len(values):
      raise config_lib.UsageError(f"--sweep={spec}: a value is given twice")
    grid.append((field, values))
  return grid


def _node(config, parents: list[str]):
  """The ConfigDict that holds a dotted field, given the field's parent names."""
  for part in parents:
    config = config[part]
  return config


def points(
  config: ml_collections.ConfigDict, grid: Grid
) -> list[tuple[dict, ml_collections.ConfigDict]]:
  """Every point of the grid: ``(values, config at that point)``, each config validated.

  Raises :class:`~optax_gc.experiments.config.UsageError` for a point whose
  config is invalid, naming the point.
  """
  out = []
  for combo in itertools.product(*(values for _, values in grid)):
    values = dict(zip((f for f, _ in grid), combo, strict=True))
    c = copy.deepcopy(config)
    for field, value in values.items():
      *parents, last = field.split(".")
      _node(c, parents)[last] = value
    try:
      config_lib.validate(c)
    except config_lib.UsageError as e:
      raise config_lib.UsageError(f"sweep point {_label(values)}: {e}") from None
    out.append((values, c))
  return out


def _label(values: dict) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def folder(config: ml_collections.ConfigDict, grid: Grid) -> Path:
  """The sweep's folder: the same config and grid give the same folder, to resume in."""
  settings = {k: v for k, v in config.to_dict().items() if k not in ("workdir", "progress")}
  key = json.dumps({"config": settings, "grid": grid}, sort_keys=True, default=repr)
  digest = hashlib.sha1(key.encode()).hexdigest()[:8]
  return Path(config.workdir) / f"sweep-{config.name}-{config.optimizer}-{digest}"


def _write_json(path: Path, value) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=1, default=float))
  tmp.replace(path)  # a point is saved whole or not at all


def run(
  config: ml_collections.ConfigDict,
  grid: Grid,
  *,
  max_minutes: float = 0.0,
  interrupt=lambda: False,
  about: dict | None = None,
  log=print,
) -> tuple[Path, dict]:
  """Runs every unfinished point; returns the sweep's folder and ``sweep.json``'s content.

  ``max_minutes`` (0: no limit) is the time guard: no point starts after it.
  ``about`` (the command, versions) is written into ``sweep.json`` too.
  Raises :class:`~optax_gc.experiments.train.Interrupted` when ``interrupt()``
  says so, after saving what is finished.
  """
  todo = points(config, grid)
  out = folder(config, grid)
  (out / "points").mkdir(parents=True, exist_ok=True)
  _write_json(out / "grid.json", {"config": config.to_dict(), "grid": grid})
  start = time.perf_counter()
  results: list[dict | None] = []
  bar = train.progress_bar(sum(train.steps_of(c) for _, c in todo), disable=not config.progress)
  stopped = None
  with bar:
    for i, (values, c) in enumerate(todo):
      path = out / "points" / f"{i:03d}.json"
      if path.exists():
        results.append(json.loads(path.read_text()))
        bar.update(train.steps_of(c))
        continue
      if max_minutes and time.perf_counter() - start > 60 * max_minutes:
        stopped = f"--max_minutes={max_minutes:g} reached"
        results.append(None)
        continue
      ds, _ = train.prepare(c)
      c.name = f"{config.name} [{_label(values)}]"
      r = train.compare(c, ds, bar, interrupt)
      r.update(values=values, config=c.to_dict(), target_loss=c.target_loss)
      report.summarize(r)
      _write_json(path, r)
      results.append(r)
  done = [r for r in results if r is not None]
  summary = (
    summarize(grid, done)
    | {
      "complete": len(done) == len(todo),
      "stopped": stopped,
      "points_total": len(todo),
      "config": config.to_dict(),
      "grid": grid,
      "wall_s": time.perf_counter() - start,
    }
    | (about or {})
  )
  _write_json(out / "sweep.json", summary)
  try:
    plot(summary, out / "sweep.png")
  except Exception as e:  # the metrics are saved; a plot failing must not lose them
    log(f"sweep.png not written: {type(e).__name__}: {e}")
  return out, summary


def _finals(r: dict, variant: str) -> np.ndarray:
  return np.asarray(r["variants"][variant]["test_accuracy"], dtype=float)[:, -1]


def summarize(grid: Grid, results: list[dict]) -> dict:
  """Each arm's best point, GC minus no GC at the two bests, and how wide each optimum is.

  The best point of an arm has the highest mean final test accuracy over
  seeds (a diverged seed counts with the accuracy its model has). The two
  bests are compared paired by seed. ``within_1_point`` lists the points
  whose mean is within 1 point of the arm's best; ``no_divergence`` those at
  which no seed diverged.
  """
  out: dict = {"points": results, "arms": {}}
  if not results:
    return out
  for variant in train.VARIANTS:
    means = [float(_finals(r, variant).mean()) for r in results]
    best = int(np.argmax(means))
    out["arms"][variant] = {
      "best": results[best]["values"],
      "best_mean": means[best],
      "best_std": report.mean_std(_finals(results[best], variant))["std"],
      "within_1_point": [
        r["values"] for r, m in zip(results, means, strict=True) if m >= means[best] - 0.01
      ],
      "no_divergence": [
        r["values"]
        for r in results
        if not any(s is not None for s in r["variants"][variant].get("diverged_at", []))
      ],
    }
  bests = {
    v: next(r for r in results if r["values"] == out["arms"][v]["best"]) for v in train.VARIANTS
  }
  diff = _finals(bests["gc"], "gc") - _finals(bests["baseline"], "baseline")
  out["gc_best_minus_baseline_best"] = report.mean_std(diff) | {
    "seeds_gc_better": int((diff > 0).sum()),
    "seeds": len(diff),
  }
  return out


def text(summary: dict) -> str:
  """The printed summary: each arm's best setting and GC minus no GC at the two bests."""
  lines = []
  for variant, arm in summary["arms"].items():
    lines.append(
      f"{report.VARIANT_NAMES[variant]:6s} best: {_label(arm['best'])}: "
      f"{100 * arm['best_mean']:.2f} ± {100 * arm['best_std']:.2f} % "
      f"(within 1 point: {len(arm['within_1_point'])} of {len(summary['points'])} points; "
      f"no divergence: {len(arm['no_divergence'])})"
    )
  if "gc_best_minus_baseline_best" in summary:
    d = summary["gc_best_minus_baseline_best"]
    lines.append(
      f"GC at its best - no GC at its best (paired by seed): {100 * d['mean']:+.2f} ± "
      f"{100 * d['std']:.2f} points, GC better on {d['seeds_gc_better']} of {d['seeds']} seeds"
    )
  for r in summary["points"]:
    cells = []
    for v in train.VARIANTS:
      acc = report.pm(report.mean_std(_finals(r, v)), 100)
      diverged = report.diverged_cell(r["variants"][v].get("diverged_at", []))
      cells.append(f"{report.VARIANT_NAMES[v]} {acc} (diverged {diverged})")
    lines.append(f"  {_label(r['values'])}: " + "; ".join(cells))
  if not summary["complete"]:
    lines.append(
      f"{len(summary['points'])} of {summary['points_total']} points done "
      f"({summary['stopped'] or 'interrupted'}); the same command continues the sweep"
    )
  return "\n".join(lines)


def plot(summary: dict, path) -> None:
  """Final test accuracy against each swept value: mean line, min-max band over seeds.

  One panel per swept field; where several fields are swept, one line per
  setting of the others. An x marks a point where a seed diverged.
  """
  from matplotlib.figure import Figure

  grid, results = summary["grid"], summary["points"]
  fig = Figure(figsize=(max(6.0, 4.5 * len(grid)), 3.8), dpi=90, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(grid)))
  for ax, (field, values) in zip(axes, grid, strict=True):
    others = [f for f, _ in grid if f != field]
    groups: dict = {}
    for r in results:
      groups.setdefault(tuple(r["values"][f] for f in others), []).append(r)
    for key, rs in groups.items():
      rs = sorted(rs, key=lambda r: values.index(r["values"][field]))
      x = [r["values"][field] for r in rs]
      for variant in train.VARIANTS:
        acc = np.asarray([_finals(r, variant) for r in rs]) * 100
        suffix = f" ({_label(dict(zip(others, key, strict=True)))})" if others else ""
        color = report.COLORS[variant]
        ax.plot(x, acc.mean(1), "o-", color=color, label=report.VARIANT_NAMES[variant] + suffix)
        ax.fill_between(x, acc.min(1), acc.max(1), color=color, alpha=0.15, lw=0)
        bad = [
          (xv, a)
          for xv, a, r in zip(x, acc.mean(1), rs, strict=True)
          if any(s is not None for s in r["variants"][variant].get("diverged_at", []))
        ]
        if bad:
          ax.plot(*zip(*bad, strict=True), "x", color=color, ms=9, mew=2)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel("final test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  config = summary["config"]
  seeds = len(results[0]["seeds"]) if results else 0
  fig.suptitle(
    f"{config['name']}, {config['optimizer']}: mean over {seeds} seeds, band = min-max, "
    "x = a seed diverged",
    fontsize=9,
  )
  fig.savefig(path)
