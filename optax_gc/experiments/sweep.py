"""Sweeps: one config trained with and without GC at every point of a grid of field values.

``--sweep=FIELD=V1,V2,...`` (repeatable; the grid is the product) runs the
comparison at every point, the same seeds at each, so GC and no GC can be
compared tuned against tuned. Each finished point is saved at once under
``points/`` in the sweep's folder, whose name comes from the config and the
grid: the same command, run again, skips the finished points. The folder gets
``sweep.json`` (every point's metrics and config) and ``sweep.png``. One
process at a time runs a sweep in its folder.
"""

import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import os
import socket
import time
from pathlib import Path

import ml_collections
import numpy as np

from optax_gc.experiments import config as config_lib
from optax_gc.experiments import data, report, train

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
  config is invalid, naming the point, and for two points that would train
  alike (a swept field that training does not read, see
  :func:`~optax_gc.experiments.train.settings`).
  """
  out: list[tuple[dict, ml_collections.ConfigDict]] = []
  seen: dict[str, dict] = {}
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
    key = json.dumps(train.settings(c), sort_keys=True, default=repr)
    if key in seen:
      fields = ", ".join(f for f in values if values[f] != seen[key][f])
      raise config_lib.UsageError(
        f"sweep points {_label(seen[key])} and {_label(values)} would train alike: training "
        f"does not read {fields} here; drop it from --sweep"
      )
    seen[key] = values
    out.append((values, c))
  return out


def _prepare(todo: list[tuple[dict, ml_collections.ConfigDict]]) -> list[data.Dataset]:
  """Each point's data; first each point is checked against its data and model (train.prepare)."""
  prepared: dict[str, data.Dataset] = {}
  out = []
  for values, c in todo:
    # What train.prepare checks; a sweep of learning rates checks one model.
    key = json.dumps(
      [c.dataset, c.data.to_dict(), c.model.to_dict(), c.batch_size, c.gc_rules, c.gc_preset],
      default=repr,
    )
    if key not in prepared:
      try:
        prepared[key] = train.prepare(c)[0]
      except config_lib.UsageError as e:
        raise config_lib.UsageError(f"sweep point {_label(values)}: {e}") from None
    out.append(prepared[key])
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
  report.write_atomic(path, json.dumps(value, indent=1, default=float))


@contextlib.contextmanager
def _locked(out: Path):
  """Holds the sweep folder ``out`` for this process; another one that runs it refuses.

  The lock is the kernel's (``flock`` on ``out/.lock``): it goes with its
  holder, however that ends, so no dead process holds it. The file names the
  holder, for the message.
  """
  try:
    (out / "points").mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
  except OSError as e:
    raise report.WriteError(f"{out} not created: {e.strerror or e}") from e
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise config_lib.UsageError(
        f"{out} is in use by {holder}, running the same sweep; let it finish or stop it, "
        "then run this again"
      ) from None
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    yield


def _saved(path: Path, values: dict, config: ml_collections.ConfigDict, log) -> dict | None:
  """The point saved at ``path``, or None: none saved, or damaged (said through ``log``)."""
  if not path.exists():
    return None
  seeds = list(range(config.first_seed, config.first_seed + config.seeds))
  steps = train.eval_steps(config)
  try:
    r = json.loads(path.read_text())
    same = (
      r["values"] == json.loads(json.dumps(values))
      and r["seeds"] == seeds
      and r["steps"] == steps
      and all(
        np.asarray(r["variants"][v]["test_accuracy"], dtype=float).shape == (len(seeds), len(steps))
        for v in train.VARIANTS
      )
    )
  except (OSError, ValueError, KeyError, TypeError) as e:
    log(f"{path} is damaged ({type(e).__name__}: {e}); training that point again")
    return None
  if not same:
    log(f"{path} holds another point's results; training that point again")
    return None
  return r


def run(
  config: ml_collections.ConfigDict,
  grid: Grid,
  *,
  max_minutes: float = 0.0,
  interrupt=lambda: False,
  about: dict | None = None,
  log=print,
) -> tuple[Path, dict, str | None]:
  """Runs every unfinished point; returns the sweep's folder, ``sweep.json``'s content and an error.

  Before anything is trained or written, every point's config is checked
  against its data and model, and the folder is locked; either raises
  :class:`~optax_gc.experiments.config.UsageError`. ``max_minutes`` (0: no
  limit) is the time guard: no point starts after it. ``about`` (the command,
  versions) is written into ``sweep.json`` too. Every file is written whole or
  not at all. A saved point that is damaged is named through ``log`` and
  trained again. A point that cannot be saved stops the sweep: the error (None
  if there is none) names the file and why, and the summary still holds that
  point. Raises :class:`~optax_gc.experiments.train.Interrupted` when
  ``interrupt()`` says so, after saving what is finished.
  """
  todo = points(config, grid)
  datasets = _prepare(todo)
  out = folder(config, grid)
  with _locked(out):
    _write_json(out / "grid.json", {"config": config.to_dict(), "grid": grid})
    start = time.perf_counter()
    results: list[dict | None] = []
    stopped = error = None
    bar = train.progress_bar(sum(train.steps_of(c) for _, c in todo), disable=not config.progress)
    with bar:
      for i, ((values, c), ds) in enumerate(zip(todo, datasets, strict=True)):
        path = out / "points" / f"{i:03d}.json"
        r = _saved(path, values, c, log)
        if r is not None:
          bar.update(train.steps_of(c))
        elif stopped is None and max_minutes and time.perf_counter() - start > 60 * max_minutes:
          stopped = f"--max_minutes={max_minutes:g} reached"
        elif stopped is None:
          c.name = f"{config.name} [{_label(values)}]"
          r = train.compare(c, ds, bar, interrupt)
          r.update(values=values, config=c.to_dict(), target_loss=c.target_loss)
          report.summarize(r)
          try:
            _write_json(path, r)
          except report.WriteError as e:
            stopped, error = "a point could not be saved", str(e)
        results.append(r)
    done = [r for r in results if r is not None]
    summary = (
      summarize(grid, done)
      | {
        "complete": len(done) == len(todo) and error is None,
        "stopped": stopped,
        "points_total": len(todo),
        "config": config.to_dict(),
        "grid": grid,
        "wall_s": time.perf_counter() - start,
      }
      | (about or {})
    )
    try:
      _write_json(out / "sweep.json", summary)
    except report.WriteError as e:
      fix = "the table above holds the points, and the same command continues from the saved ones"
      return out, summary, f"{error or e}; {fix}"
    if error:
      return out, summary, f"{error}; sweep.json holds it, and the same command trains it again"
    try:
      plot(summary, out / "sweep.png")
    except Exception as e:  # the metrics are saved; a plot failing must not lose them
      png = out / "sweep.png"
      log(
        str(e)
        if isinstance(e, report.WriteError)
        else f"{png} not written: {type(e).__name__}: {e}"
      )
    return out, summary, None


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
  report.save_png(fig, path)
