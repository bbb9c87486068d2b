"""Muon with the axes the model defines against Muon's default and Adam, each tuned.

  python results/muon.py                 # from the repository root; resumes where it stopped
  python results/muon.py --dry-run       # print the commands only

For the MNIST-1D CNN and Transformer configs, Muon (``optax.contrib.muon``)
orthogonalises each kernel's update over the axes ``--config.muon.dims`` names:
``derived``, those ``optax_gc.rules_for`` reads from the model
(``optax_gc.muon_dimension_numbers``), or ``default``, Muon's own (2-D leaves
only). Each is a learning-rate sweep (5 rates, 3 seeds), then 5 seeds at each
arm's best rate, with and without GC; the leaves Muon does not take get Adam's
step at the config's best Adam rate of the GC study (``results/study.py``),
whose Adam rows are the Adam arm here. Sweep folders go to
``results/study/runs/``, sweep.json files to ``results/study/``, the tables to
``results/study/muon.md``.
"""

import argparse
import json
import sys
import time

import numpy as np
import study

CONFIGS = ("mnist1d_cnn", "mnist1d_transformer")
RATES = (0.003, 0.01, 0.03, 0.1, 0.3)
DIMS = ("derived", "default")
KEY = "muon.learning_rate"
ARMS = ("baseline", "gc")


def _adam(config: str) -> tuple[float, dict]:
  """The GC study's Adam: its best no-GC rate, and its 5-seed sweep at each arm's best rate."""
  rates = json.loads((study.OUT / f"{config}-adam-rates.json").read_text())
  bests = json.loads((study.OUT / f"{config}-adam-bests.json").read_text())
  return rates["arms"]["baseline"]["best"]["adam.learning_rate"], {"rates": rates, "bests": bests}


def run(dry: bool) -> dict:
  """Every sweep; returns ``{(config, dims): {"rates", "bests"}}`` and the Adam rows."""
  found = {}
  for config in CONFIGS:
    adam_rate, found[config, "adam"] = _adam(config)
    for dims in DIMS:
      extra = (f"--config.muon.dims={dims}", f"--config.muon.adam_learning_rate={adam_rate:g}")
      rates = study.sweep(
        f"{config}-muon-{dims}-rates",
        config,
        "muon",
        [f"{KEY}={study._csv(RATES)}"],
        "--config.seeds=3",
        *extra,
        dry=dry,
      )
      if dry:
        continue
      best = sorted({rates["arms"][v]["best"][KEY] for v in ARMS})
      bests = study.sweep(
        f"{config}-muon-{dims}-bests",
        config,
        "muon",
        [f"{KEY}={study._csv(best)}"] if len(best) > 1 else [],
        "--config.seeds=5",
        *extra,
        *([f"--config.{KEY}={best[0]:g}", "--sweep=first_seed=0"] if len(best) == 1 else []),
        dry=dry,
      )
      found[config, dims] = {"rates": rates, "bests": bests}
  return found


def best_finals(sweeps: dict, key: str, arm: str) -> tuple[float, np.ndarray]:
  """An arm's best rate in the rate sweep and its 5 seeds' final test accuracies there."""
  rate = sweeps["rates"]["arms"][arm]["best"][key]
  points = sweeps["bests"]["points"]
  point = points[0] if key not in points[0]["values"] else study._at(points, {key: rate})
  return rate, study._finals(point, arm)


def tables(found: dict) -> str:
  """Best against best, per config and GC arm: Muon derived, Muon default, Adam."""
  rows = []
  for config in CONFIGS:
    for arm in ARMS:
      cells, acc = [], {}
      for what, key in (("derived", KEY), ("default", KEY), ("adam", "adam.learning_rate")):
        rate, acc[what] = best_finals(found[config, what], key, arm)
        cells.append(f"{rate:g} | {acc[what].mean():.2f} ± {acc[what].std(ddof=1):.2f}")
      diff = acc["derived"] - acc["default"]
      rows.append(
        f"| {config} | {study.NAMES[arm]} | " + " | ".join(cells) + f" | {diff.mean():+.2f} ± "
        f"{diff.std(ddof=1):.2f} | {int((diff > 0).sum())}/{len(diff)} |"
      )
  return "\n".join(
    [
      "### Best against best: 5 seeds at each arm's best learning rate",
      "",
      "| config | GC | Muon, derived axes: best rate | final test acc % | Muon, default: best "
      "rate | final test acc % | Adam: best rate | final test acc % | derived − default "
      "(paired by seed) | seeds derived better |",
      "|---|---|---|---|---|---|---|---|---|---|",
      *rows,
    ]
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  study.OUT.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  found = run(args.dry_run)
  if args.dry_run:
    return 0
  text = tables(found)
  cost = study.cost_minutes({k: v for k, v in found.items() if k[1] != "adam"})
  (study.OUT / "muon.md").write_text(
    text + f"\n\nTraining time of the Muon sweeps (both arms, every seed): {cost:.0f} minutes.\n"
  )
  print(text)
  print(f"muon study: {(time.perf_counter() - start) / 60:.0f} minutes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
