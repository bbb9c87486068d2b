"""The benchmark runs on tiny sizes and reports what it should. Speed is never asserted here."""

import copy
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from optax_gc import benchmark

# Each GC variant's base comes along; a few variants keep the test fast.
VARIANTS = "centralize,optax_centralize"
GC = benchmark.GC


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "out.json"
  argv = ["--tiny", "--variants", VARIANTS, "--rounds", "2", "--leaves", "10", "--json", str(path)]
  assert benchmark.main(argv) == 0
  with open(path) as f:
    written = json.load(f)
  return written


def _finite_positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_json_holds_every_part(results):
  written = results
  assert set(benchmark.PARTS) <= set(written)
  assert written["command"].startswith("optax-gc-benchmark --tiny")
  assert written["machine"]["cores"] >= 1
  assert sorted(written["update"]) == ["resnet50", "transformer"]


def test_update_rows_and_ratios(results):
  written = results
  want = {"adamw", benchmark.BASELINE, GC}
  for tree in ("resnet50", "transformer"):
    res = written["update"][tree]
    assert res["leaves"] > 0 and res["params"] > 0
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == want
    for row in rows.values():
      assert row["base"] == "adamw"
      for key in ("median_ms", "vs_base", "vs_base_q25", "vs_base_q75", "vs_optax_centralize"):
        assert _finite_positive(row[key]), (tree, row)
      for key in ("gbps", "copy_gbps", "vs_copy"):
        assert _finite_positive(row[key]), (tree, row)
    assert rows["adamw"]["vs_base"] == 1.0


def test_step_bytes_count_each_centred_leaf_once_more():
  resnet = benchmark.resnet50_shapes(0.01)  # shapes only; no kernel has a fan-in of 1
  leaves = jax.tree.leaves(resnet)
  nbytes = sum(4 * math.prod(x.shape) for x in leaves)
  kernels = sum(4 * math.prod(x.shape) for x in leaves if len(x.shape) > 1)
  assert benchmark.step_bytes(resnet, (), "adamw") == 7 * nbytes
  # In ResNet-50 the preset centres exactly the conv and fc kernels, as optax.centralize does.
  for variant in (GC, benchmark.BASELINE, benchmark.PLAIN, "adam_gc"):
    assert benchmark.step_bytes(resnet, (), variant) == 7 * nbytes + kernels, variant
  # In the Transformer optax.centralize also centres the embedding and the scan stack's
  # (layers, features) biases and norm parameters; optax_gc centres kernels only.
  tf = benchmark.transformer_shapes(0.01, 2)
  flat = jax.tree_util.tree_flatten_with_path(tf)[0]
  not_kernels = sum(
    4 * math.prod(x.shape) for path, x in flat if len(x.shape) > 1 and path[-1].key != "kernel"
  )
  assert not_kernels > 4 * math.prod(tf["params"]["embed"]["embedding"].shape)
  rules = benchmark.TRANSFORMER_RULES
  ours = benchmark.step_bytes(tf, rules, GC)
  assert benchmark.step_bytes(tf, rules, benchmark.BASELINE) - ours == not_kernels


def test_train_rows(results):
  written = results
  assert sorted(written["train"]) == ["cnn", "transformer"]
  for res in written["train"].values():
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"adamw", benchmark.BASELINE, GC}
    assert all(_finite_positive(r["vs_base"]) for r in rows.values())


def test_compile_rows(results):
  written = results
  rows = written["compile"]
  assert {(r["phase"], r["variant"]) for r in rows} == {
    (phase, variant)
    for phase in ("trace", "compile", "total")
    for variant in ("adamw", benchmark.BASELINE, GC, benchmark.GC_DERIVED)
  }
  assert all(r["leaves"] == 10 for r in rows)
  assert all(_finite_positive(r["median_ms"]) and _finite_positive(r["vs_base"]) for r in rows)


def test_memory_no_extra_persistent_state(results):
  written = results
  for tree, rows in written["memory"].items():
    by_name = {r["variant"]: r for r in rows}
    assert set(by_name) == {"adamw", benchmark.BASELINE, GC}
    assert by_name[GC]["extra_state_bytes"] == 0, tree
    assert by_name[GC]["state_bytes"] == by_name["adamw"]["state_bytes"] > 0, tree
    assert by_name[GC]["temp_bytes"] >= 0


def test_report_has_every_table(results):
  printed = results
  text = benchmark.report(printed)
  for title in ("### Targets", "### Update alone: resnet50", "### Update alone: transformer"):
    assert title in text
  for title in ("### Train step: cnn", "### Train step: transformer", "### Trace and compile"):
    assert title in text
  assert "### Memory: resnet50" in text and "### Memory: transformer" in text
  assert f"| {GC} |" in text


def test_gpu_bandwidth_target_needs_at_least_085_of_copy(results):
  on_gpu = copy.deepcopy(results)
  on_gpu["machine"]["platform"] = "gpu"
  for vs_copy, met in ((0.9, True), (0.8, False)):
    for res in on_gpu["update"].values():
      for row in res["rows"]:
        row["vs_copy"] = vs_copy
    rows = [t for t in benchmark.targets(on_gpu) if "copy GB/s" in t["target"]]
    assert len(rows) == 2 and all(t["met"] is met for t in rows), rows
  assert not any("copy GB/s" in t["target"] for t in benchmark.targets(results))


def test_bad_arguments_are_refused():
  for argv in (
    ["--parts", "update,nope"],
    ["--variants", "nope"],
    ["--pytrees", "resnet"],
    ["--pytrees", "3x"],
    ["--pytrees", ","],
    ["--dtype", "float16"],
  ):
    with pytest.raises(SystemExit):
      benchmark.parse_args(argv)


def test_uniform_pytree_plain_reference_and_bf16_run():
  argv = ["--tiny", "--parts", "update,memory", "--pytrees", "transformer,64x32"]
  argv += ["--dtype", "bfloat16"]
  results = benchmark.run(
    benchmark.parse_args(argv + ["--variants", "plain"]), log=lambda *a, **k: None
  )
  assert sorted(results["update"]) == ["64x32", "transformer"]
  uniform = benchmark.uniform_shapes(
    (64, 32), benchmark._size(benchmark.resnet50_shapes(0.0005, (1, 0, 0, 1)))[1]
  )
  assert results["update"]["64x32"]["leaves"] == len(jax.tree.leaves(uniform)) >= 1
  for part in ("update", "memory"):
    for tree in ("64x32", "transformer"):
      rows = results[part][tree] if part == "memory" else results[part][tree]["rows"]
      assert {r["variant"] for r in rows} == {"adamw", benchmark.PLAIN}
  # bfloat16 parameters: adamw's state is its int32 count and two bf16 moments.
  params = results["update"]["64x32"]["params"]
  assert results["update"]["64x32"]["dtype"] == "bfloat16"
  assert results["memory"]["64x32"][0]["state_bytes"] == 4 + 2 * 2 * params


def test_plain_reference_is_gc_on_the_same_axes_but_unguarded():
  """Equal to optax_gc.centralize on ordinary gradients; inf where centralize stays finite."""
  shapes = benchmark.transformer_shapes(0.0005, 2)
  grads = benchmark._materialize(shapes, 3, 1.0)
  plain = benchmark.plain_centralize(benchmark.TRANSFORMER_RULES)
  ours = optax_gc.centralize(benchmark.TRANSFORMER_RULES)
  a, _ = plain.update(grads, optax.EmptyState())
  b, _ = ours.update(grads, optax.EmptyState())
  changed = 0
  for x, y, g in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    changed += not np.array_equal(x, g)
  assert changed == 6  # the q, k, v, out and two MLP kernels are centred
  big = {"kernel": jnp.full((4, 3), 3e38, jnp.float32)}
  assert not np.isfinite(plain.update(big, optax.EmptyState())[0]["kernel"]).all()
  assert np.isfinite(ours.update(big, optax.EmptyState())[0]["kernel"]).all()


def test_console_form_exits_0_and_documents_its_options():
  result = subprocess.run(
    [sys.executable, "-m", "optax_gc.benchmark", "--help"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  for option in ("--parts", "--pytrees", "--scale", "--leaves", "--trace-only", "--tiny", "--json"):
    assert option in result.stdout
