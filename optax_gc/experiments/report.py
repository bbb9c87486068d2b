"""Summaries, tables, plots and the run's output folder.

``python -m optax_gc.experiments.report RUN_DIR... [--png PATH]`` prints a
markdown table of several runs (one row per config, optimizer and GC setting)
and can draw their test accuracy curves side by side.
"""

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

VARIANT_NAMES = {"baseline": "no GC", "gc": "GC"}
COLORS = {"baseline": "tab:blue", "gc": "tab:orange"}


class WriteError(Exception):
  """A file could not be written: the message names it and why. Nothing of it was left."""


def write_atomic(path, content: str | bytes) -> None:
  """Writes ``content`` to ``path`` whole or not at all.

  It goes to a temporary file of a name no other process uses, in the same
  folder, flushed to the disk, then renamed over ``path``: a reader, a crash,
  a full disk or a second process never sees half a file. Raises
  :class:`WriteError` naming ``path`` and the reason; the temporary file is
  removed.

  Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.json"
    >>> write_atomic(path, "{}")
    >>> path.read_text(), [p.name for p in path.parent.iterdir()]
    ('{}', ['a.json'])
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(content.encode() if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())  # a full disk can first show here; the rename must come after
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise WriteError(f"{path} not written: {e.strerror or e}") from e


def save_png(fig, path) -> None:
  """Saves a matplotlib figure as a PNG at ``path``, whole or not at all (:func:`write_atomic`)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  write_atomic(path, buffer.getvalue())


def mean_std(values) -> dict:
  """Mean and standard deviation (ddof=1) over the finite values; NaN if there are none."""
  v = np.asarray(values, dtype=float)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return {"mean": float("nan"), "std": float("nan")}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def first_step_below(steps, losses, target: float) -> int | None:
  """The first evaluation step at which ``losses`` is at or below ``target`` (None: never).

  Example:
    >>> first_step_below([10, 20, 30], [0.5, 0.09, 0.2], 0.1)
    20
  """
  for step, loss in zip(steps, losses, strict=False):
    if loss <= target:
      return int(step)
  return None


def summarize(results: dict) -> dict:
  """Adds ``summary`` to each variant, and ``gc_minus_baseline``, to ``results``.

  Means and standard deviations (ddof=1) are over seeds: test accuracies over
  every seed, diverged or not (a diverged model's accuracy is measured as it
  is); losses over the seeds that stayed finite. ``steps_to_target`` lists
  each seed's first step with train loss <= ``target_loss``; ``diverged_at``
  each seed's first step with a non-finite loss (None: never).

  Example:
    >>> curves = {"train_loss": [[1.0, 0.05]], "test_loss": [[1.0, 0.5]],
    ...           "test_accuracy": [[0.5, 0.9]], "wall_s": 1.0, "diverged_at": [None]}
    >>> r = summarize({"steps": [10, 20], "target_loss": 0.1,
    ...                "variants": {"baseline": curves, "gc": curves}})
    >>> r["variants"]["gc"]["summary"]["steps_to_target"]
    [20]
  """
  steps, target = results["steps"], results["target_loss"]
  for curves in results["variants"].values():
    acc = np.asarray(curves["test_accuracy"])
    loss = np.asarray(curves["train_loss"])
    curves["summary"] = {
      "final_test_accuracy": mean_std(acc[:, -1]),
      "best_test_accuracy": mean_std(acc.max(axis=1)),
      "final_train_loss": mean_std(loss[:, -1]),
      "final_test_loss": mean_std(np.asarray(curves["test_loss"])[:, -1]),
      "steps_to_target": [first_step_below(steps, run, target) for run in loss],
      "diverged_at": list(curves.get("diverged_at", [None] * len(acc))),
    }
  v = results["variants"]
  diff = (
    np.asarray(v["gc"]["test_accuracy"])[:, -1] - np.asarray(v["baseline"]["test_accuracy"])[:, -1]
  )
  results["gc_minus_baseline"] = {
    "final_test_accuracy": mean_std(diff),
    "seeds_gc_better": int((diff > 0).sum()),
    "seeds_gc_worse": int((diff < 0).sum()),
  }
  return results


def pm(stat: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
  if not math.isfinite(stat["mean"]):
    return "-"
  return f"{stat['mean'] * scale:{fmt}} ± {stat['std'] * scale:{fmt}}"


def _steps_cell(steps_to_target: list) -> str:
  reached = [s for s in steps_to_target if s is not None]
  if not reached:
    return f"never (0/{len(steps_to_target)})"
  return f"{int(np.median(reached))} ({len(reached)}/{len(steps_to_target)})"


def diverged_cell(diverged_at: list) -> str:
  """``"0/5"``, or ``"2/5 (steps 40, 251)"``: how many seeds diverged, and at which step."""
  hit = [s for s in diverged_at if s is not None]
  where = f" (steps {', '.join(map(str, sorted(hit)))})" if hit else ""
  return f"{len(hit)}/{len(diverged_at)}{where}"


def rows(results: dict) -> list[list[str]]:
  """Table rows for a summarized run: config, optimizer, GC, then the statistics.

  A run stopped early has its config named with the last step it reached.
  """
  name = results["config"]["name"]
  if results.get("stopped"):
    name += f" (stopped at step {results['steps'][-1]})"
  out = []
  for variant, curves in results["variants"].items():
    s = curves["summary"]
    out.append(
      [
        name,
        results["label"],
        VARIANT_NAMES[variant],
        pm(s["final_test_accuracy"], 100),
        pm(s["best_test_accuracy"], 100),
        pm(s["final_train_loss"], 1, ".2g"),
        _steps_cell(s["steps_to_target"]),
        diverged_cell(s["diverged_at"]),
        _paired_cell(results) if variant == "gc" else "",
        str(len(results["seeds"])),
      ]
    )
  return out


def _paired_cell(results: dict) -> str:
  d = results["gc_minus_baseline"]
  return f"{pm(d['final_test_accuracy'], 100)} ({d['seeds_gc_better']}/{len(results['seeds'])})"


def header(target_loss) -> list[str]:
  return [
    "config",
    "optimizer",
    "GC",
    "final test acc %",
    "best test acc %",
    "final train loss",
    f"steps to loss ≤ {target_loss:g} (median, seeds)",
    "diverged (seeds)",
    "GC − no GC, final acc (seeds better)",
    "seeds",
  ]


def text_table(results: dict) -> str:
  """The summary of one run as an aligned plain-text table, with the paired GC difference."""
  cells = [header(results["target_loss"])] + rows(results)
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  d = results["gc_minus_baseline"]
  lines.append(
    f"GC - no GC, final test accuracy (paired by seed): {pm(d['final_test_accuracy'], 100)} "
    f"points; GC better on {d['seeds_gc_better']} of {len(results['seeds'])} seeds, "
    f"worse on {d['seeds_gc_worse']}"
  )
  return "\n".join(lines)


def markdown_table(runs: list[dict]) -> str:
  """A markdown table of several summarized runs (mean ± std over seeds).

  Example:
    >>> curves = {"train_loss": [[0.05]], "test_loss": [[0.5]],
    ...           "test_accuracy": [[0.9]], "wall_s": 1.0, "diverged_at": [None]}
    >>> r = summarize({"steps": [10], "target_loss": 0.1, "seeds": [0], "label": "Adam",
    ...                "config": {"name": "demo"}, "variants": {"baseline": curves, "gc": curves}})
    >>> print(markdown_table([r]).splitlines()[3].split(" | ")[2:9])
    ['GC', '90.00 ± 0.00', '90.00 ± 0.00', '0.05 ± 0', '10 (1/1)', '0/1', '0.00 ± 0.00 (0/1)']
  """
  targets = sorted({r["target_loss"] for r in runs})
  head = header(targets[0])
  if len(targets) > 1:
    head[6] = "steps to target loss"
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(row) + " |" for r in runs for row in rows(r)]
  return "\n".join(lines)


def _band(ax, steps, runs, color, label, scale=1.0):
  """Mean line and min-max band over seeds; non-finite values (diverged seeds) are left out."""
  a = np.asarray(runs, dtype=float) * scale
  finite = np.where(np.isfinite(a), a, np.nan)
  with np.errstate(all="ignore"):
    ok = np.isfinite(finite).any(axis=0)
    mean = np.where(ok, np.nanmean(np.where(ok, finite, 0.0), axis=0), np.nan)
    low = np.where(ok, np.nanmin(np.where(ok, finite, 0.0), axis=0), np.nan)
    high = np.where(ok, np.nanmax(np.where(ok, finite, 0.0), axis=0), np.nan)
  ax.plot(steps, mean, color=color, label=label, lw=1.5)
  ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)


def _mark_divergence(ax, steps, curves, color, scale):
  """An x at each diverged seed's divergence step, on its curve."""
  for run, at in zip(curves["test_accuracy"], curves.get("diverged_at", []), strict=False):
    if at is not None:
      i = min(np.searchsorted(steps, at), len(steps) - 1)
      ax.plot([at], [run[i] * scale], "x", color=color, ms=7, mew=2)


def plot_curves(results: dict, path) -> None:
  """Train loss, test loss and test accuracy against step: mean line, min-max band over seeds.

  A diverged seed's losses are left out from its divergence on, and an x marks
  where it diverged.
  """
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 3.2), dpi=90, layout="constrained")
  axes = fig.subplots(1, 3)
  panels = [("train_loss", "train loss", 1), ("test_loss", "test loss", 1)]
  panels.append(("test_accuracy", "test accuracy %", 100))
  for ax, (key, title, scale) in zip(axes, panels, strict=False):
    for variant, curves in results["variants"].items():
      name = f"{results['label']}{' + GC' if variant == 'gc' else ''}"
      _band(ax, results["steps"], curves[key], COLORS[variant], name, scale)
      if key == "test_accuracy":
        _mark_divergence(ax, results["steps"], curves, COLORS[variant], scale)
    if key != "test_accuracy":
      values = np.asarray([c[key] for c in results["variants"].values()], dtype=float)
      if not np.isfinite(values).any():
        ax.text(0.5, 0.5, "every run diverged", ha="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  train = np.asarray([c["train_loss"] for c in results["variants"].values()], dtype=float)
  if np.any(np.isfinite(train) & (train > 0)):  # all diverged: no log scale to draw on
    axes[0].set_yscale("log")
  axes[2].set_ylim(0, 100)
  axes[2].legend(loc="lower right")
  fig.suptitle(
    f"{results['config']['name']}: mean over {len(results['seeds'])} seeds, band = min-max, "
    "x = diverged"
  )
  save_png(fig, path)


def plot_grid(runs: list[dict], path) -> None:
  """Test accuracy curves of several runs, one panel per run, for the README."""
  from matplotlib.figure import Figure

  cols = min(4, len(runs))
  nrows = math.ceil(len(runs) / cols)
  fig = Figure(figsize=(3.2 * cols, 2.6 * nrows), dpi=80, layout="constrained")
  axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
  for ax, r in zip(axes, runs, strict=False):
    for variant, curves in r["variants"].items():
      _band(ax, r["steps"], curves["test_accuracy"], COLORS[variant], VARIANT_NAMES[variant], 100)
    final = [c["summary"]["final_test_accuracy"]["mean"] * 100 for c in r["variants"].values()]
    ax.set_ylim(max(0, min(final) - 15), min(100, max(final) + 4))
    ax.set_title(f"{r['config']['name']}, {r['label']}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[len(runs) :]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7, loc="lower right")
  axes[0].set_ylabel("test accuracy %")
  save_png(fig, path)


def new_folder(workdir: str, base: str) -> Path:
  """A new folder ``workdir/base`` (``base-2``, ... if taken): no earlier run is overwritten."""
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  for n in range(1, 1000):
    folder = root / (base if n == 1 else f"{base}-{n}")
    try:
      folder.mkdir()
      return folder
    except FileExistsError:
      continue
  raise OSError(f"no free name for {base} in {root}")


def write_run(results: dict, workdir: str, plan_text: str) -> tuple[Path, list[str]]:
  """Writes metrics.json, then summary.md, gc_plan.txt and curves.png, into a new folder.

  Each file is written whole or not at all (:func:`write_atomic`). The
  metrics are what training produced: they come first, and when they or the
  folder cannot be written, :class:`WriteError` is raised and no folder is
  left. A later file that fails (a plot, a full disk) is returned as a
  problem, not raised. Returns the folder, named ``{config}-{optimizer}-{time}``,
  and those problems.
  """
  config = results["config"]
  base = f"{config['name']}-{config['optimizer']}-{time.strftime('%Y%m%d-%H%M%S')}"
  try:
    folder = new_folder(workdir, base)
  except OSError as e:
    raise WriteError(f"{Path(workdir) / base} not created: {e.strerror or e}") from e
  try:
    write_atomic(folder / "metrics.json", json.dumps(results, indent=1))
  except WriteError:
    with contextlib.suppress(OSError):
      folder.rmdir()  # empty: nothing was written into it
    raise
  stopped = f"\nStopped early: {results['stopped']}.\n" if results.get("stopped") else ""
  summary = f"`{results['command']}`\n\n{markdown_table([results])}\n{stopped}"
  problems = []
  for name, write in (
    ("summary.md", lambda p: write_atomic(p, summary)),
    ("gc_plan.txt", lambda p: write_atomic(p, plan_text + "\n")),
    ("curves.png", lambda p: plot_curves(results, p)),
  ):
    try:
      write(folder / name)
    except WriteError as e:
      problems.append(str(e))
    except Exception as e:  # a plot that fails must not lose the metrics
      problems.append(f"{folder / name} not written: {type(e).__name__}: {e}")
  return folder, problems


def main(argv: list[str] | None = None) -> int:
  """Prints the markdown table of the runs in the given folders; ``--png PATH`` also plots them."""
  parser = argparse.ArgumentParser(
    prog="python -m optax_gc.experiments.report",
    description="A markdown table (and a plot) of runs written by optax-gc-compare.",
    allow_abbrev=False,
  )
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding metrics.json")
  parser.add_argument("--png", metavar="PATH", help="also draw the runs' test accuracy curves")
  args = parser.parse_args(argv)
  runs = []
  for d in args.runs:
    path = Path(d) / "metrics.json"
    if not path.is_file():
      parser.error(f"{d}: no metrics.json; give folders that optax-gc-compare wrote")
    try:
      runs.append(summarize(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
      parser.error(
        f"{path} is not a metrics.json that optax-gc-compare wrote ({type(e).__name__}: {e}); "
        "leave that folder out, or run its comparison again"
      )
  print(markdown_table(runs))
  if args.png:
    plot_grid(runs, args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
