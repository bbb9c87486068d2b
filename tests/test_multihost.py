"""GC in a multi-controller JAX job: 2 processes x 4 CPU devices on localhost, over gloo.

On a TPU pod or a multi-node GPU job each host runs its own process, holding
only its shards of global arrays that no process can read whole. This test
starts tests/multihost_worker.py twice, as processes 0 and 1 of one job whose
2x4 mesh puts its ``data`` axis across them, and checks that each ran every
check in ``multihost_worker.CHECKS`` without a failure: ``explain`` and strict
``init`` on global arrays, a jitted ``chain(centralize(), adamw)`` step against
NumPy float64 with the shardings kept and no all-gather, an orbax checkpoint of
``with_centralization(adamw)`` written by both processes, restored and resumed,
and a Flax nnx model trained data parallel over the processes.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from helpers import with_host_device_count
from multihost_worker import CHECKS, LOCAL_DEVICES, PROCESSES

pytestmark = pytest.mark.long  # two processes of one job

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 120  # a passing run takes about 10 s
# Once one process has failed, the other may wait on it in a collective (or in
# jax.distributed.initialize, up to 5 minutes): it gets this long to finish.
GRACE_S = 10
# Layout checks: where the fan-in is sharded, the means' all-reduce is the only collective.
SUMMARIES = {
  "fan_in": "collectives ['all-reduce']",
  "fan_out": "collectives none",
  "both": "collectives ['all-reduce']",
}


def _free_port():
  # Another program could take the port before the coordinator binds it: unlikely
  # enough on a test machine that the test does not retry.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(workdir):
  """Runs every process to the end (or kills it); returns their exit codes and outputs."""
  env = dict(os.environ)
  # Not the 8 devices conftest.py gives this process: 4 for each of the two.
  env["XLA_FLAGS"] = with_host_device_count(env.get("XLA_FLAGS", ""), LOCAL_DEVICES)
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  # Files, not pipes: a process blocked on a full pipe would stall the other in a collective.
  logs = [workdir / f"process_{i}.log" for i in range(PROCESSES)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      cmd = [sys.executable, str(WORKER), str(port), str(i), str(workdir)]
      procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() for p in procs):  # one failed: the others need not wait for it
        deadline = min(deadline, time.monotonic() + GRACE_S)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [p.returncode for p in procs], [log.read_text() for log in logs]


# The layout checks' collective lines are read from the compiled step's HLO text.
@pytest.mark.xla_cpu_internals
def test_gc_in_a_two_process_job_explains_steps_checkpoints_and_trains(tmp_path):
  start = time.monotonic()
  codes, outputs = _run_workers(tmp_path)
  report = f"after {time.monotonic() - start:.0f} s, exit codes {codes} (negative: killed)\n"
  report += "\n".join(f"----- process {i} -----\n{out}" for i, out in enumerate(outputs))
  assert codes == [0] * PROCESSES, report
  for i, out in enumerate(outputs):
    for name in CHECKS:
      head = f"process {i}: {name}: "
      lines = [line for line in out.splitlines() if line.startswith(head)]
      assert len(lines) == 1 and lines[0].endswith("; 0 failures"), report
      if name in SUMMARIES:
        assert lines[0] == f"{head}{SUMMARIES[name]}; 0 failures", report
  # Every process saw the same global values: their lines differ only in the process number.
  lines = [
    [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"process {i}: ")]
    for i, out in enumerate(outputs)
  ]
  assert all(own == lines[0] for own in lines), report
