"""The benchmark's results as Markdown tables.

The first table gathers the main measured ratios (GC+adamw against adamw and
against ``optax.centralize`` + adamw, with quartiles); one table per part and
pytree or model follows. A ratio to a variant's own base is shown as ``-``.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import jax
import optax

GC = "centralize"


def machine() -> dict:
  """The CPU model, core count, jax device and library versions of this machine.

  The CPU model comes from /proc/cpuinfo where there is one (``platform``
  names only the architecture on Linux).
  """
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass  # not Linux: platform's name will do
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
  }


def table(header: list[str], rows: list[list[str]]) -> str:
  """A Markdown table.

  Example:
    >>> print(table(["a", "b"], [["1", "2"]]))
    | a | b |
    |---|---|
    | 1 | 2 |
  """
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _x(value: float | None, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _spread(row: dict) -> str:
  if row.get("vs_base") is None:
    return "-"
  return f"{row['vs_base']:.3f} ({row['vs_base_q25']:.3f}-{row['vs_base_q75']:.3f})"


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def _time_table(rows: list[dict], unit: str = "ms") -> str:
  bandwidth = all("gbps" in r for r in rows)
  by_id = {r["variant"]: r for r in rows}
  scale = 1e-3 if unit == "s" else 1.0
  return table(
    ["variant", "base", f"median {unit}", "x base (quartiles)", "x optax.centralize"]
    + (["GB/s", "x copy's GB/s"] if bandwidth else []),
    [
      [
        r["label"],
        "-" if r["base"] == r["variant"] else by_id[r["base"]]["label"],
        f"{r['median_ms'] * scale:.3f}",
        _spread(r),
        _x(r.get("vs_optax_centralize")),
      ]
      + ([f"{r['gbps']:.1f}", f"{r['vs_copy']:.2f}"] if bandwidth else [])
      for r in rows
    ],
  )


def main_ratios(results: dict) -> list[list[str]]:
  """The headline measurements: ``[what, measured]`` rows, from whichever parts ran.

  Example:
    >>> rows = [{"variant": "adamw", "vs_base": None}, {"variant": "centralize",
    ...   "vs_base": 1.1, "vs_base_q25": 1.0, "vs_base_q75": 1.2, "vs_optax_centralize": 0.9}]
    >>> for row in main_ratios({"train": {"cnn": {"rows": rows}}}):
    ...   print(row)
    ['train step cnn: GC+adamw / adamw', '1.100 (1.000-1.200)']
    ['train step cnn: GC+adamw / optax.centralize+adamw', '0.900']
  """
  out = []

  def gc_rows(what: str, rows: list[dict], variant: str = GC, label: str = "GC+adamw") -> None:
    row = next((r for r in rows if r["variant"] == variant), None)
    if row is None:
      return
    out.append([f"{what}: {label} / adamw", _spread(row)])
    if row.get("vs_optax_centralize") is not None:
      out.append([f"{what}: {label} / optax.centralize+adamw", _x(row["vs_optax_centralize"])])

  for tree, res in results.get("update", {}).items():
    gc_rows(f"update {tree}", res["rows"])
    gc_rows(f"update {tree}", res["rows"], "plain", "plain GC+adamw")
    for r in res["rows"]:
      if r["variant"] in ("adamw", GC):
        label = "adamw" if r["variant"] == "adamw" else "GC+adamw"
        out.append([f"update {tree}: {label} bandwidth / a streaming copy's", _x(r["vs_copy"], 2)])
  for model, res in results.get("train", {}).items():
    gc_rows(f"train step {model}", res["rows"])
  for phase in ("total", "trace"):
    rows = [r for r in results.get("compile", []) if r["phase"] == phase]
    if rows:
      what = f"{'trace+compile' if phase == 'total' else 'trace'} {rows[0]['leaves']} leaves"
      gc_rows(what, rows)
      gc_rows(what, rows, "centralize_rules_for", "GC(rules_for)+adamw")
  derive = {r["variant"]: r for r in results.get("derive", [])}
  if "rules_for" in derive:
    what = f"rules_for, {derive['rules_for']['leaves']} leaves: / tracing init + forward once"
    out.append([what, _spread(derive["rules_for"])])
  for tree, rows in results.get("memory", {}).items():
    ours = [r for r in rows if r["variant"] not in (r["base"], "optax_centralize", "plain")]
    if ours:
      extra = max(r["extra_state_bytes"] for r in ours)
      temp = max(r["extra_temp_bytes"] for r in ours)
      largest = _mib(rows[0]["largest_leaf_bytes"])
      out.append([f"memory {tree}: optax_gc's extra optimizer-state bytes", str(extra)])
      temp_text = f"{_mib(temp)} (largest leaf {largest})"
      out.append([f"memory {tree}: optax_gc's extra temporaries, MiB", temp_text])
  return out


def report(results: dict[str, Any]) -> str:
  """The results (as ``run.run`` returns them, or as ``--json`` wrote them) as Markdown.

  The command and the machine first, then the main ratios, then one table per
  part and pytree or model, with every variant's label, time and ratios.
  """
  out = []
  if "command" in results:
    out.append(f"Command: `{results['command']}`\n")
  if "machine" in results:
    m = results["machine"]
    out.append(
      f"Measured on {results.get('date', '?')}: {m['cpu']}, {m['cores']} cores "
      f"({m['device']}); jax {m['jax']}, optax {m['optax']}, Python {m['python']}\n"
    )
  ratios = main_ratios(results)
  if ratios:
    out.append("### Main ratios\n\n" + table(["measured", "median (quartiles)"], ratios) + "\n")
  for tree, res in results.get("update", {}).items():
    out.append(
      f"### Update alone: {tree} ({res['leaves']} leaves, "
      f"{res['params'] / 1e6:.2f}M params, {res['dtype']})\n\n{_time_table(res['rows'])}\n\n"
      f"A streaming copy of as many bytes (x + 1, donated): "
      f"{res['rows'][0]['copy_gbps']:.1f} GB/s.\n"
    )
  for model, res in results.get("train", {}).items():
    out.append(
      f"### Train step: {model} ({res['leaves']} leaves, "
      f"{res['params'] / 1e6:.3f}M params)\n\n{_time_table(res['rows'])}\n"
    )
  rows = results.get("compile", [])
  for phase in dict.fromkeys(r["phase"] for r in rows):
    out.append(
      f"### {phase.capitalize()} seconds: {rows[0]['leaves']} leaves\n\n"
      + _time_table([r for r in rows if r["phase"] == phase], unit="s")
      + "\n"
    )
  rows = results.get("derive", [])
  if rows:
    out.append(
      f"### Deriving the rules, seconds: {rows[0]['leaves']} leaves\n\n"
      + _time_table(rows, unit="s")
      + "\n"
    )
  for tree, mem in results.get("memory", {}).items():
    out.append(
      f"### Memory: {tree} (largest leaf {_mib(mem[0]['largest_leaf_bytes'])} MiB)\n\n"
      + table(
        ["variant", "state MiB", "extra state bytes vs base", "temp MiB", "extra temp MiB vs base"],
        [
          [
            r["label"],
            _mib(r["state_bytes"]),
            "-" if r["base"] == r["variant"] else str(r["extra_state_bytes"]),
            # -1: the backend gave no memory analysis
            "-" if r["temp_bytes"] < 0 else _mib(r["temp_bytes"]),
            "-"
            if r["temp_bytes"] < 0 or r["base"] == r["variant"]
            else _mib(r["extra_temp_bytes"]),
          ]
          for r in mem
        ],
      )
      + "\n"
    )
  return "\n".join(out)
