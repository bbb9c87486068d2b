"""Summaries, tables, plots and the run's output folder.

``python -m optax_gc.experiments.report RUN_DIR... [--png PATH]`` prints a
markdown table of several runs (one row per config, optimizer and GC setting)
and can draw their test accuracy curves side by side.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANT_NAMES = {"baseline": "no GC", "gc": "GC"}


def _mean_std(values) -> dict:
  v = np.asarray(values, dtype=float)
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

  Means and standard deviations (ddof=1) are over seeds. ``steps_to_target``
  lists each seed's first step with train loss <= ``target_loss``.

  Example:
    >>> curves = {"train_loss": [[1.0, 0.05]], "test_loss": [[1.0, 0.5]],
    ...           "test_accuracy": [[0.5, 0.9]], "wall_s": [1.0]}
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
      "final_test_accuracy": _mean_std(acc[:, -1]),
      "best_test_accuracy": _mean_std(acc.max(axis=1)),
      "final_train_loss": _mean_std(loss[:, -1]),
      "final_test_loss": _mean_std(np.asarray(curves["test_loss"])[:, -1]),
      "steps_to_target": [first_step_below(steps, run, target) for run in loss],
      "wall_s": _mean_std(curves["wall_s"]),
    }
  v = results["variants"]
  diff = (
    np.asarray(v["gc"]["test_accuracy"])[:, -1] - np.asarray(v["baseline"]["test_accuracy"])[:, -1]
  )
  results["gc_minus_baseline"] = {
    "final_test_accuracy": _mean_std(diff),
    "seeds_gc_better": int((diff > 0).sum()),
    "seeds_gc_worse": int((diff < 0).sum()),
  }
  return results


def _pm(stat: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
  return f"{stat['mean'] * scale:{fmt}} ± {stat['std'] * scale:{fmt}}"


def _steps_cell(steps_to_target: list) -> str:
  reached = [s for s in steps_to_target if s is not None]
  if not reached:
    return f"never (0/{len(steps_to_target)})"
  return f"{int(np.median(reached))} ({len(reached)}/{len(steps_to_target)})"


def rows(results: dict) -> list[list[str]]:
  """Table rows for a summarized run: config, optimizer, GC, then the statistics."""
  out = []
  for variant, curves in results["variants"].items():
    s = curves["summary"]
    out.append(
      [
        results["config"]["name"],
        results["label"],
        VARIANT_NAMES[variant],
        _pm(s["final_test_accuracy"], 100),
        _pm(s["best_test_accuracy"], 100),
        _pm(s["final_train_loss"], 1, ".2g"),
        _steps_cell(s["steps_to_target"]),
        _paired_cell(results) if variant == "gc" else "",
        str(len(results["seeds"])),
      ]
    )
  return out


def _paired_cell(results: dict) -> str:
  d = results["gc_minus_baseline"]
  return f"{_pm(d['final_test_accuracy'], 100)} ({d['seeds_gc_better']}/{len(results['seeds'])})"


def header(target_loss) -> list[str]:
  return [
    "config",
    "optimizer",
    "GC",
    "final test acc %",
    "best test acc %",
    "final train loss",
    f"steps to loss ≤ {target_loss:g} (median, seeds)",
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
    f"GC - no GC, final test accuracy (paired by seed): {_pm(d['final_test_accuracy'], 100)} "
    f"points; GC better on {d['seeds_gc_better']} of {len(results['seeds'])} seeds, "
    f"worse on {d['seeds_gc_worse']}"
  )
  return "\n".join(lines)


def markdown_table(runs: list[dict]) -> str:
  """A markdown table of several summarized runs (mean ± std over seeds).

  Example:
    >>> curves = {"train_loss": [[0.05]], "test_loss": [[0.5]],
    ...           "test_accuracy": [[0.9]], "wall_s": [1.0]}
    >>> r = summarize({"steps": [10], "target_loss": 0.1, "seeds": [0], "label": "Adam",
    ...                "config": {"name": "demo"}, "variants": {"baseline": curves, "gc": curves}})
    >>> print(markdown_table([r]).splitlines()[3])
    | demo | Adam | GC | 90.00 ± 0.00 | 90.00 ± 0.00 | 0.05 ± 0 | 10 (1/1) | 0.00 ± 0.00 (0/1) | 1 |
  """
  targets = sorted({r["target_loss"] for r in runs})
  head = header(targets[0])
  if len(targets) > 1:
    head[6] = "steps to target loss"
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(row) + " |" for r in runs for row in rows(r)]
  return "\n".join(lines)


def _band(ax, steps, runs, color, label, scale=1.0):
  a = np.asarray(runs) * scale
  ax.plot(steps, a.mean(0), color=color, label=label, lw=1.5)
  ax.fill_between(steps, a.min(0), a.max(0), color=color, alpha=0.2, lw=0)


COLORS = {"baseline": "tab:blue", "gc": "tab:orange"}


def plot_curves(results: dict, path) -> None:
  """Train loss, test loss and test accuracy against step: mean line, min-max band over seeds."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 3.2), dpi=90, layout="constrained")
  axes = fig.subplots(1, 3)
  panels = [("train_loss", "train loss", 1), ("test_loss", "test loss", 1)]
  panels.append(("test_accuracy", "test accuracy %", 100))
  for ax, (key, title, scale) in zip(axes, panels, strict=False):
    for variant, curves in results["variants"].items():
      name = f"{results['label']}{' + GC' if variant == 'gc' else ''}"
      _band(ax, results["steps"], curves[key], COLORS[variant], name, scale)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[2].set_ylim(max(0, axes[2].get_ylim()[0]), 100)
  axes[2].legend(loc="lower right")
  fig.suptitle(
    f"{results['config']['name']}: mean over {len(results['seeds'])} seeds, band = min-max"
  )
  fig.savefig(path)


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
  fig.savefig(path)


def write_run(results: dict, workdir: str, plan_text: str) -> Path:
  """Writes metrics.json, curves.png, summary.md and gc_plan.txt into a new folder.

  The files are written into a hidden temporary folder inside ``workdir`` that
  is renamed into place at the end, so an interrupted write leaves no partial
  run. Returns the folder, named ``{config}-{optimizer}-{time}``.
  """
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  base = (
    f"{results['config']['name']}-{results['config']['optimizer']}-{time.strftime('%Y%m%d-%H%M%S')}"
  )
  tmp = Path(tempfile.mkdtemp(prefix=f".{base}.", dir=root))
  try:
    (tmp / "metrics.json").write_text(json.dumps(results, indent=1))
    plot_curves(results, tmp / "curves.png")
    summary = f"`{results['command']}`\n\n{markdown_table([results])}\n"
    (tmp / "summary.md").write_text(summary)
    (tmp / "gc_plan.txt").write_text(plan_text + "\n")
    for n in range(1, 1000):
      final = root / (base if n == 1 else f"{base}-{n}")
      try:
        os.rename(tmp, final)  # fails if final exists (non-empty), so no run is overwritten
        return final
      except OSError:
        if not final.exists():
          raise
    raise OSError(f"no free name for {base} in {root}")
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(argv=None) -> int:
  """Prints the markdown table of the runs in the given folders; ``--png PATH`` also plots them."""
  args = list(sys.argv[1:] if argv is None else argv)
  png = None
  if "--png" in args:
    i = args.index("--png")
    png = args[i + 1]
    del args[i : i + 2]
  if not args:
    print("usage: python -m optax_gc.experiments.report RUN_DIR... [--png PATH]", file=sys.stderr)
    return 2
  runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in args]
  print(markdown_table(runs))
  if png:
    plot_grid(runs, png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
