"""Timing by interleaved rounds in one process, and ratios with their quartiles.

On a machine shared with other work, absolute times move by tens of percent
from minute to minute. So every variant is compiled first, then the variants
take turns, round by round, in an order that rotates, each for about the same
time per round; a variant's cost is the median over rounds of its time divided
by its base's time *in the same round*, which load from elsewhere hits alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Runner = Callable[[int], None]


def step_runner(compiled: Callable, params: Any, state: Any, *args: Any) -> Runner:
  """Returns ``run(n)``: ``n`` calls of ``compiled(params, state, *args)``, threading both.

  ``compiled`` donates ``params`` and ``state`` and returns their new values
  first; ``run`` keeps the latest, so each call reuses the previous call's buffers.
  """
  box = [params, state]

  def run(n: int) -> None:
    p, s = box
    for _ in range(n):
      p, s = compiled(p, s, *args)[:2]
    jax.block_until_ready((p, s))
    box[:] = p, s

  return run


def copy_runner(nbytes: int) -> Runner:
  """Returns ``run(n)``: ``n`` donated ``x + 1`` over ``nbytes`` of float32.

  A streaming copy: it reads and writes each byte once, which is the most
  bandwidth a step can expect from this machine's memory.
  """
  box = [jnp.zeros(max(1, nbytes // 4), jnp.float32)]
  add1 = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(box[0]).compile()

  def run(n: int) -> None:
    x = box[0]
    for _ in range(n):
      x = add1(x)
    box[0] = jax.block_until_ready(x)

  return run


def interleave(runners: dict[str, Runner], rounds: int, target_s: float = 0.2) -> dict:
  """Seconds per step of each runner, one entry a round, the runners interleaved.

  Every runner is warmed up, then takes the same number of steps per round
  (enough for about ``target_s`` seconds of the first runner); the order
  rotates from round to round, so that no runner always follows the same one.

  Example:
    >>> times = interleave({"a": lambda n: None, "b": lambda n: None}, rounds=3)
    >>> {name: len(t) for name, t in times.items()}
    {'a': 3, 'b': 3}
  """
  names = list(runners)
  for run in runners.values():
    run(1)
  t0 = time.perf_counter()
  runners[names[0]](1)
  inner = max(1, round(target_s / max(time.perf_counter() - t0, 1e-9)))
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t0 = time.perf_counter()
      runners[name](inner)
      times[name].append((time.perf_counter() - t0) / inner)
  return times


def ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  """Median, first and third quartile of the per-round ratios ``a[i] / b[i]``.

  Example:
    >>> ratio([2.0, 3.0, 4.0], [1.0, 1.0, 2.0])
    (2.0, 2.0, 2.5)
  """
  q = np.quantile(np.asarray(a) / np.asarray(b), [0.5, 0.25, 0.75])
  return float(q[0]), float(q[1]), float(q[2])


def summarize(
  times: dict[str, list[float]], bases: dict[str, str], reference: str | None = None
) -> list[dict]:
  """One row a variant: its median time, and its ratios to its base and to ``reference``.

  Each row has ``variant``, ``base``, ``median_ms``, ``vs_base`` with its
  quartiles ``vs_base_q25`` and ``vs_base_q75``, and, if ``reference`` was
  timed, ``vs_reference``. A ratio of a variant to itself is None.

  Example:
    >>> rows = summarize({"a": [1.0, 1.0], "b": [1.5, 2.0]}, {"a": "a", "b": "a"}, "b")
    >>> [(r["variant"], r["vs_base"], r["vs_reference"]) for r in rows]
    [('a', None, 0.5833333333333333), ('b', 1.75, None)]
  """
  rows = []
  for name, t in times.items():
    row: dict[str, Any] = {"variant": name, "base": bases[name]}
    row["median_ms"] = 1e3 * float(np.median(t))
    if bases[name] == name:
      row["vs_base"] = row["vs_base_q25"] = row["vs_base_q75"] = None
    else:
      row["vs_base"], row["vs_base_q25"], row["vs_base_q75"] = ratio(t, times[bases[name]])
    if reference in times:
      row["vs_reference"] = None if name == reference else ratio(t, times[reference])[0]
    rows.append(row)
  return rows
