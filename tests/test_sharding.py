"""GC on a 2x4 device mesh: runs tests/sharding_check.py in a process of its own.

The device count of the CPU backend is fixed when jax initialises, so the 8
simulated devices need a fresh interpreter with ``XLA_FLAGS`` set before jax is
imported. The script checks, for ``AxisType.Auto`` and ``AxisType.Explicit``
meshes and kernels sharded on the fan-in axes, the output axis and both, that
a jitted ``chain(optax_gc.centralize(), optax.adamw(...))`` step matches one
device and NumPy float64, keeps every leaf's sharding, and compiles with no
collective but all-reduce.
"""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")


def test_gc_on_a_2x4_mesh_matches_one_device_keeps_shardings_and_only_all_reduces():
  env = dict(os.environ)
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
  )
  report = result.stdout + result.stderr
  assert result.returncode == 0, report
  # Every case ran: two axis types, three layouts; all-reduce only where the fan-in is sharded.
  for axis_type in ("Auto", "Explicit"):
    assert f"{axis_type}/fan_in: collectives ['all-reduce']; 0 failures" in report, report
    assert f"{axis_type}/fan_out: collectives none; 0 failures" in report, report
    assert f"{axis_type}/both: collectives ['all-reduce']; 0 failures" in report, report
