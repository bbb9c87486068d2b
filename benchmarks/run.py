"""What Gradient Centralization costs, measured as ratios in one process.

Five parts, each comparing a variant against its base on this machine, in
this process, the variants interleaved round by round so that load from
other processes hits every variant alike:

  update   the jitted optimizer update alone, on a ResNet-50-shaped and a
           Transformer-shaped Flax pytree (or kernels of one shape, --pytrees),
           with the bandwidth each step achieves against a streaming copy's
  train    a whole train step of a small CNN and a small Transformer
  compile  trace and compile time of the update of a many-leaf pytree, GC's
           axes from the preset or from optax_gc.rules_for(model)
  memory   optimizer-state bytes and XLA's temporary bytes for the update
  derive   seconds of optax_gc.rules_for(model) against tracing that model's
           init and forward pass once, on the compile part's many-leaf model

A ratio is the median over rounds of a variant's time divided by its base's
(adamw or adam; for derive, the two traces) in the same round, with the quartiles of those ratios.
Variants (--variants, by id):
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import parts as parts_lib
import pytrees
import report as report_lib
import variants as variants_lib

PARTS = ("update", "train", "compile", "memory", "derive")
# Sizes that --tiny replaces, with the full sizes they default to otherwise.
FULL = {
  "scale": 1.0,
  "resnet_blocks": "3,4,6,3",
  "layers": 12,
  "rounds": 15,
  "target_ms": 200.0,
  "batch": 32,
  "width": 32,
  "d_model": 128,
  "depth": 2,
  "seq_len": 64,
  "leaves": 2000,
  "compile_rounds": 3,
}
TINY = {
  "scale": 0.0005,
  "resnet_blocks": "1,0,0,1",
  "layers": 2,
  "rounds": 3,
  "target_ms": 2.0,
  "batch": 2,
  "width": 4,
  "d_model": 16,
  "depth": 1,
  "seq_len": 8,
  "leaves": 20,
  "compile_rounds": 1,
}
EXAMPLES = """examples:
  python benchmarks/run.py                                   # every part, full sizes
  python benchmarks/run.py --json full.json                  # and the results as JSON
  python benchmarks/run.py --parts update --pytrees resnet50,2304x256 --variants centralize,plain
  python benchmarks/run.py --parts update,memory --dtype bfloat16
  python benchmarks/run.py --parts compile --leaves 10000 --trace-only
  python benchmarks/run.py --tiny                            # seconds: checks that it runs

Full sizes take 5-8 minutes on 2 CPU cores; --tiny a few seconds."""


def _positive(kind: type) -> Callable[[str], Any]:
  def parse(text: str) -> Any:
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not value > 0:
      noun = "whole number" if kind is int else "number"
      raise argparse.ArgumentTypeError(f"{text!r}: give a {noun} above 0")
    return value

  return parse


def _sized(parser: argparse.ArgumentParser, flag: str, kind: Any, help: str) -> None:
  """An option whose default depends on --tiny; the help shows both defaults."""
  key = flag[2:].replace("-", "_")
  parser.add_argument(
    flag, type=kind, default=None, help=f"{help} (default {FULL[key]}; --tiny: {TINY[key]})"
  )


def _parser() -> argparse.ArgumentParser:
  description = __doc__ + "".join(
    f"  {v.id:20s} {v.label}\n" for v in variants_lib.VARIANTS.values()
  )
  parser = argparse.ArgumentParser(
    prog="python benchmarks/run.py",
    description=description,
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,  # a mistyped --lay must fail, not silently mean --layers
  )
  add = parser.add_argument
  add("--parts", default=",".join(PARTS), help="comma-separated parts to run (default %(default)s)")
  add(
    "--variants",
    default=",".join(variants_lib.VARIANTS),
    help="update and memory parts: comma-separated variant ids (default: all); "
    "each variant's base, adamw or adam, always runs too",
  )
  add(
    "--pytrees",
    default="resnet50,transformer",
    help="update and memory parts: comma-separated pytrees, of resnet50, transformer, or a "
    "kernel shape such as 2304x256 (as many such kernels as ResNet-50 has parameters) "
    "(default %(default)s)",
  )
  add(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="update and memory parts: the parameters' and gradients' dtype (default %(default)s)",
  )
  _sized(
    parser,
    "--scale",
    _positive(float),
    "update and memory parts: multiplies the pytrees' "
    "parameter count (ResNet-50 25.6M, Transformer 100M at 1)",
  )
  _sized(parser, "--resnet-blocks", str, "update and memory parts: bottleneck blocks per stage")
  _sized(parser, "--layers", _positive(int), "layers in the Transformer pytree's scanned stack")
  _sized(parser, "--rounds", _positive(int), "update and train parts: interleaved rounds")
  _sized(parser, "--target-ms", _positive(float), "update and train parts: ms per variant a round")
  _sized(parser, "--batch", _positive(int), "train part: batch size")
  _sized(parser, "--width", _positive(int), "train part: channels of the CNN's first stage")
  _sized(parser, "--d-model", _positive(int), "train part: Transformer width")
  _sized(parser, "--depth", _positive(int), "train part: Transformer blocks; CNN stages - 1 (1-3)")
  _sized(parser, "--seq-len", _positive(int), "train part: Transformer sequence length")
  _sized(parser, "--leaves", _positive(int), "compile part: leaves of the pytree, a multiple of 5")
  _sized(parser, "--compile-rounds", _positive(int), "compile part: rounds after a warm-up one")
  add(
    "--trace-only",
    action="store_true",
    help="compile part: time the trace only (where optax_gc decides each leaf), not XLA",
  )
  add("--tiny", action="store_true", help="tiny sizes and few rounds, to check that it runs")
  add("--json", metavar="PATH", help="also write the results to PATH as JSON")
  return parser


def _split(text: str) -> list[str]:
  return [x for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses and checks the command line; exits with a message that says what to change.

  Sizes not given take ``TINY``'s values with ``--tiny`` and ``FULL``'s without;
  the comma-separated lists become lists and tuples.

  Example:
    >>> args = parse_args(["--tiny", "--leaves", "50"])
    >>> args.leaves, args.layers, args.parts, args.resnet_blocks
    (50, 2, ['update', 'train', 'compile', 'memory', 'derive'], (1, 0, 0, 1))
  """
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  if extra:
    parser.error(
      f"unrecognized arguments: {' '.join(extra)}; options are spelled out in full "
      "(python benchmarks/run.py --help lists them)"
    )
  for key, value in (TINY if args.tiny else FULL).items():
    if getattr(args, key) is None:  # not given: the size --tiny (or not) says
      setattr(args, key, value)
  args.parts = _split(args.parts)
  unknown = [p for p in args.parts if p not in PARTS]
  if unknown or not args.parts:
    what = f"unknown part {', '.join(map(repr, unknown))}" if unknown else "none given"
    parser.error(f"--parts: {what}; give some of {','.join(PARTS)}, comma-separated")
  args.variants = tuple(_split(args.variants))
  if not args.variants:
    parser.error(f"--variants: none given; give some of {','.join(variants_lib.VARIANTS)}")
  try:
    variants_lib.select(args.variants)
  except ValueError as e:
    parser.error(f"--variants: {e}")
  args.pytrees = tuple(_split(args.pytrees))
  bad = [t for t in args.pytrees if t not in pytrees.NAMED and pytrees.kernel_shape(t) is None]
  if bad or not args.pytrees:
    what = f"unknown pytree {', '.join(map(repr, bad))}" if bad else "none given"
    parser.error(
      f"--pytrees: {what}; give resnet50, transformer or a kernel shape of positive sizes "
      "such as 2304x256, comma-separated"
    )
  blocks = _split(args.resnet_blocks)
  if len(blocks) != 4 or not all(b.isdigit() for b in blocks):
    parser.error(f"--resnet-blocks {args.resnet_blocks!r}: give 4 whole numbers, such as 3,4,6,3")
  args.resnet_blocks = tuple(int(b) for b in blocks)
  if args.leaves % 5:
    parser.error(f"--leaves {args.leaves}: give a multiple of 5 (each block has 5 leaves)")
  if args.depth > 3:
    parser.error(f"--depth {args.depth}: give 1, 2 or 3 (the CNN has at most 4 stages)")
  needs_flax = [p for p in args.parts if p in ("train", "compile", "derive")]
  if needs_flax and importlib.util.find_spec("flax") is None:
    parser.error(
      f"the {' and '.join(needs_flax)} part(s) need flax: pip install 'optax_gc[flax]', "
      "or leave them out with --parts update,memory"
    )
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    parser.error(f"--json {args.json}: its folder does not exist; create it or give another path")
  return args


def run(args: argparse.Namespace, log: Callable[..., None] = print) -> dict:
  """Runs the parts ``args`` asks for; returns the results (what ``--json`` writes).

  The results hold the date, the machine, the arguments and one entry per part
  run, each of rows of plain numbers with the variants named by id; ``log``
  receives one progress line per part.
  """
  target_s = args.target_ms / 1e3
  trees = {
    name: pytrees.build(
      name,
      scale=args.scale,
      resnet_blocks=args.resnet_blocks,
      layers=args.layers,
      dtype=args.dtype,
    )
    for name in args.pytrees
  }
  results: dict[str, Any] = {
    "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
    "machine": report_lib.machine(),
    "args": vars(args),
  }
  log("machine:", results["machine"], flush=True)
  # Part 1 hands part 4 the memory analysis of the steps it compiled.
  stats: dict[str, dict] = {tree: {} for tree in trees}
  if "update" in args.parts:
    results["update"] = {}
    for tree, (shapes, rules) in trees.items():
      n_leaves, n_params = pytrees.count(shapes)
      rows = parts_lib.bench_update(
        shapes, rules, args.variants, args.rounds, target_s, stats[tree]
      )
      results["update"][tree] = {
        "leaves": n_leaves,
        "params": n_params,
        "dtype": args.dtype,
        "rows": rows,
      }
      log(f"update {tree} done", flush=True)
  if "train" in args.parts:
    results["train"] = parts_lib.bench_train(
      args.rounds,
      batch=args.batch,
      width=args.width,
      d_model=args.d_model,
      seq_len=args.seq_len,
      depth=args.depth,
      target_s=target_s,
    )
    log("train done", flush=True)
  if "compile" in args.parts:
    results["compile"] = parts_lib.bench_compile(args.leaves, args.compile_rounds, args.trace_only)
    log("compile done", flush=True)
  if "memory" in args.parts:
    results["memory"] = {
      tree: parts_lib.bench_memory(shapes, rules, args.variants, stats[tree])
      for tree, (shapes, rules) in trees.items()
    }
    log("memory done", flush=True)
  if "derive" in args.parts:
    results["derive"] = parts_lib.bench_derive(args.leaves, args.compile_rounds)
    log("derive done", flush=True)
  return results


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmark and prints Markdown tables (``--json PATH``: the results too); returns 0.

  ``argv`` defaults to the command line; a bad one exits with status 2 and a
  message that says what to change.
  """
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  results = run(args)
  results["command"] = " ".join(["python benchmarks/run.py", *argv])
  print()
  print(report_lib.report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
