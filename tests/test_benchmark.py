"""benchmarks/ runs on tiny sizes and reports what it should. Speed is never asserted here."""

import contextlib
import datetime
import io
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

pytestmark = pytest.mark.long  # a tiny run of every part

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytrees  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import variants  # noqa: E402

# Each GC variant's base comes along; a few variants keep the test fast.
IDS = {"adamw", "optax_centralize", "centralize"}
LABELS = {v.id: v.label for v in (*variants.VARIANTS.values(), variants.RULES_FOR)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """The JSON and the printed tables of one tiny run of every part."""
  path = tmp_path_factory.mktemp("bench") / "out.json"
  argv = ["--tiny", "--variants", "centralize,optax_centralize", "--rounds", "2"]
  argv += ["--leaves", "10", "--json", str(path)]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert run.main(argv) == 0
  with open(path) as f:
    return json.load(f), printed.getvalue(), argv


def _finite_positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_ratios(rows):
  """Base rows have no ratio to themselves; every other row a finite one inside its quartiles."""
  for row in rows:
    assert row["label"] == LABELS[row["variant"]], row
    assert _finite_positive(row["median_ms"]), row
    if row["variant"] == row["base"]:
      assert row["vs_base"] is None, row
    else:
      assert row["vs_base_q25"] <= row["vs_base"] <= row["vs_base_q75"], row
      assert _finite_positive(row["vs_base"]), row
    if row["variant"] != "optax_centralize":
      assert _finite_positive(row["vs_optax_centralize"]), row


def test_json_holds_every_part(results):
  written, _, argv = results
  assert set(run.PARTS) <= set(written)
  assert written["command"] == "python benchmarks/run.py " + " ".join(argv)
  assert written["machine"]["cores"] >= 1
  assert abs(datetime.date.fromisoformat(written["date"]) - datetime.date.today()).days <= 1
  assert sorted(written["update"]) == ["resnet50", "transformer"]


def test_update_rows_ratios_and_bandwidth(results):
  written, _, _ = results
  for tree in ("resnet50", "transformer"):
    res = written["update"][tree]
    assert res["leaves"] > 0 and res["params"] > 0 and res["dtype"] == "float32"
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == IDS
    _check_ratios(rows.values())
    for row in rows.values():
      assert row["base"] == "adamw"
      for key in ("gbps", "copy_gbps", "vs_copy"):
        assert _finite_positive(row[key]), (tree, row)
    # GC's step moves more bytes than adamw's: one more read of each centred leaf.
    assert rows["centralize"]["step_bytes"] > rows["adamw"]["step_bytes"]


def test_step_bytes_against_independent_counts():
  resnet = pytrees.resnet50_shapes(0.01)  # no kernel has a fan-in of 1 at this scale
  leaves = jax.tree_util.tree_flatten_with_path(resnet)[0]
  nbytes = sum(4 * math.prod(x.shape) for _, x in leaves)
  kernels = sum(4 * math.prod(x.shape) for path, x in leaves if path[-1].key == "kernel")
  V = variants.VARIANTS
  assert variants.step_bytes(resnet, (), V["adamw"]) == 7 * nbytes
  assert variants.step_bytes(resnet, (), V["adam"]) == 7 * nbytes
  # In ResNet-50 the preset centres exactly the conv and fc kernels, as optax.centralize does.
  for vid in ("centralize", "optax_centralize", "plain", "adam_gc", "adamw_gc"):
    assert variants.step_bytes(resnet, (), V[vid]) == 7 * nbytes + kernels, vid
  # In the Transformer optax.centralize also centres the embedding and the scan stack's
  # (layers, features) biases and norm parameters; optax_gc centres the 6 kernels only.
  tf = pytrees.transformer_shapes(0.01, 2)
  flat = jax.tree_util.tree_flatten_with_path(tf)[0]
  total = sum(4 * math.prod(x.shape) for _, x in flat)
  kernels = [x for path, x in flat if path[-1].key == "kernel"]
  not_kernels = sum(
    4 * math.prod(x.shape) for path, x in flat if len(x.shape) > 1 and path[-1].key != "kernel"
  )
  assert len(kernels) == 6 and not_kernels > 0
  ours = 7 * total + sum(4 * math.prod(x.shape) for x in kernels)
  assert variants.step_bytes(tf, pytrees.TRANSFORMER_RULES, V["centralize"]) == ours
  assert variants.step_bytes(tf, (), V["optax_centralize"]) == ours + not_kernels
  # bfloat16 leaves move half the bytes.
  bf16, rules = pytrees.build("transformer", scale=0.01, layers=2, dtype="bfloat16")
  assert 2 * variants.step_bytes(bf16, rules, V["centralize"]) == ours


def test_train_rows(results):
  written, _, _ = results
  assert sorted(written["train"]) == ["cnn", "transformer"]
  for res in written["train"].values():
    assert res["leaves"] > 0 and res["params"] > 0
    assert {r["variant"] for r in res["rows"]} == IDS
    _check_ratios(res["rows"])


def test_compile_rows(results):
  written, _, _ = results
  rows = written["compile"]
  assert sorted((r["phase"], r["variant"]) for r in rows) == sorted(
    (phase, vid)
    for phase in ("trace", "compile", "total")
    for vid in IDS | {"centralize_rules_for"}
  )
  assert all(r["leaves"] == 10 for r in rows)
  _check_ratios(rows)


def test_derive_rows(results):
  written, printed, _ = results
  rows = {r["variant"]: r for r in written["derive"]}
  assert set(rows) == {"trace", "rules_for"} and rows["rules_for"]["base"] == "trace"
  assert all(r["leaves"] == 10 for r in rows.values())
  assert _finite_positive(rows["rules_for"]["vs_base"]) and rows["trace"]["vs_base"] is None
  assert "### Deriving the rules, seconds: 10 leaves" in printed


def test_trace_only_times_the_trace_alone():
  args = run.parse_args(["--tiny", "--parts", "compile", "--leaves", "5", "--trace-only"])
  rows = run.run(args, log=lambda *a, **k: None)["compile"]
  assert {r["phase"] for r in rows} == {"trace"}
  assert {r["variant"] for r in rows} == IDS | {"centralize_rules_for"}


def test_memory_counts_state_bytes_and_no_extra_state(results):
  written, _, _ = results
  for tree, rows in written["memory"].items():
    by_id = {r["variant"]: r for r in rows}
    assert set(by_id) == IDS
    # adamw's state: an int32 step count and two float32 moments of every parameter.
    params = written["update"][tree]["params"]
    for vid in IDS:
      assert by_id[vid]["state_bytes"] == 4 + 2 * 4 * params, (tree, vid)
      assert by_id[vid]["temp_bytes"] >= 0
    assert by_id["centralize"]["extra_state_bytes"] == 0


def test_report_has_every_table_and_no_pass_fail(results):
  written, printed, _ = results
  text = report.report(written)
  # What main printed after its progress lines is what the JSON reports.
  assert printed[printed.index("Command: ") :].strip() == text.strip()
  for title in ("### Main ratios", "### Update alone: resnet50", "### Update alone: transformer"):
    assert title in text
  for title in ("### Train step: cnn", "### Train step: transformer", "### Trace seconds"):
    assert title in text
  assert "### Memory: resnet50" in text and "### Memory: transformer" in text
  assert "| optax_gc.centralize + adamw | adamw |" in text
  assert "update transformer: GC+adamw bandwidth / a streaming copy's" in text
  for word in ("Target", "goal", "| NO |", "| yes |"):
    assert word not in text, word


def test_uniform_pytree_plain_reference_and_bfloat16_run():
  argv = ["--tiny", "--parts", "update,memory", "--pytrees", "transformer,64x32"]
  argv += ["--dtype", "bfloat16", "--variants", "plain"]
  results = run.run(run.parse_args(argv), log=lambda *a, **k: None)
  assert sorted(results["update"]) == ["64x32", "transformer"]
  resnet_params = pytrees.count(pytrees.resnet50_shapes(0.0005, (1, 0, 0, 1)))[1]
  res = results["update"]["64x32"]
  assert res["leaves"] == round(resnet_params / (64 * 32)) >= 1
  assert res["params"] == res["leaves"] * 64 * 32 and res["dtype"] == "bfloat16"
  for tree in ("64x32", "transformer"):
    assert {r["variant"] for r in results["update"][tree]["rows"]} == {"adamw", "plain"}
    assert {r["variant"] for r in results["memory"][tree]} == {"adamw", "plain"}
  # bfloat16 parameters: adamw's state is its int32 count and two bf16 moments.
  assert results["memory"]["64x32"][0]["state_bytes"] == 4 + 2 * 2 * res["params"]


def test_plain_reference_is_gc_on_the_same_axes_but_unguarded():
  """Equal to optax_gc.centralize on ordinary gradients; inf where centralize stays finite."""
  shapes = pytrees.transformer_shapes(0.0005, 2)
  grads = pytrees.materialize(shapes, 3, 1.0)
  plain = variants.plain_centralize(pytrees.TRANSFORMER_RULES)
  ours = optax_gc.centralize(pytrees.TRANSFORMER_RULES)
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


@pytest.mark.parametrize(
  "argv, says",
  [
    (
      ["--parts", "update,nope"],
      "--parts: unknown part 'nope'; give some of update,train,compile,memory",
    ),
    (["--parts", ","], "--parts: none given"),
    (["--variants", "centralise"], "Unknown variant 'centralise'; the variants are: adamw,"),
    (["--variants", ","], "--variants: none given"),
    (["--tiny", "--lay", "5"], "unrecognized arguments: --lay 5; options are spelled out in full"),
    (["--pytrees", "resnet"], "--pytrees: unknown pytree 'resnet'; give resnet50, transformer"),
    (["--pytrees", "3x"], "kernel shape"),
    (["--pytrees", "0x4"], "positive sizes"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--rounds", "0"], "argument --rounds: '0': give a whole number above 0"),
    (["--scale", "big"], "argument --scale: 'big': give a number above 0"),
    (["--leaves", "12"], "a multiple of 5"),
    (["--resnet-blocks", "3,4,6"], "give 4 whole numbers"),
    (["--depth", "4"], "give 1, 2 or 3"),
    (["--json", "/no/such/folder/out.json"], "its folder does not exist"),
  ],
)
def test_bad_arguments_exit_with_a_message_that_says_what_to_change(argv, says, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run.parse_args(argv)
  assert exit_info.value.code == 2
  assert says in capsys.readouterr().err


def test_tiny_sizes_yield_to_explicit_ones():
  tiny = run.parse_args(["--tiny"])
  assert (tiny.layers, tiny.rounds, tiny.scale) == (2, 3, 0.0005)
  assert run.parse_args(["--tiny", "--layers", "5"]).layers == 5
  assert run.parse_args(["--tiny", "--layers=5"]).layers == 5
  full = run.parse_args([])
  assert (full.layers, full.rounds, full.scale, full.leaves) == (12, 15, 1.0, 2000)


def test_unknown_pytree_name_is_an_error():
  with pytest.raises(ValueError, match="resnet50, transformer or a kernel shape"):
    pytrees.build("resnet")


def test_help_runs_from_any_directory(tmp_path):
  result = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"],
    capture_output=True,
    text=True,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  for option in ("--parts", "--pytrees", "--scale", "--leaves", "--trace-only", "--tiny", "--json"):
    assert option in result.stdout
  for vid in variants.VARIANTS:
    assert f"  {vid} " in result.stdout
