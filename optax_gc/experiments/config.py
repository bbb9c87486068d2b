"""Configs: the common fields, loading ``configs/NAME.py``, overrides, validation.

A config file follows the Flax examples' convention: ``get_config()`` returns an
``ml_collections.ConfigDict``. Ours start from :func:`base_config`, so every
config has the same fields and every field can be overridden on the command
line (``--config.seeds=3``, ``--config.adam.learning_rate=3e-3``).
"""

import ast
import difflib
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import ml_collections

import optax_gc

# The repository's configs/ folder (found when running from a checkout or an
# editable install); names are also looked up in ./configs.
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

DATASETS = {"mnist1d": ("cnn1d", "mlp", "transformer"), "digits": ("cnn2d", "mlp")}
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
PRESETS = ("flax", "flax_conv", "torch", "torch_conv", "none")


class UsageError(Exception):
  """Bad input from the command line or a config file: a one-line message."""


def base_config() -> ml_collections.ConfigDict:
  """The fields every experiment config has, with their defaults.

  Example:
    >>> c = base_config()
    >>> c.optimizer, c.adam.learning_rate, c.seeds
    ('adam', 0.01, 5)
  """
  c = ml_collections.ConfigDict()
  c.name = "base"
  # Data: "mnist1d" (fields of mnist1d's get_dataset_args) or "digits".
  c.dataset = "mnist1d"
  c.data = ml_collections.ConfigDict({"num_samples": 5000, "seed": 42})
  # Model: `kind` is cnn1d, cnn2d, mlp or transformer; other fields go to its constructor.
  c.model = ml_collections.ConfigDict({"kind": "cnn1d"})
  # Optimizer: "sgd" (heavy-ball momentum) or "adam", with the hyperparameters of
  # the one selected. GC on: optax_gc.sgd_gc / adam_gc; off: the same without GC.
  c.optimizer = "adam"
  c.sgd = ml_collections.ConfigDict({"learning_rate": 0.1, "momentum": 0.9, "nesterov": False})
  c.adam = ml_collections.ConfigDict({"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8})
  c.weight_decay = 5e-4  # coupled L2, added to the gradient before GC (the paper's order)
  c.schedule = "cosine"  # decay to 0 over num_steps, or "constant"
  c.batch_size = 100
  c.num_steps = 6000
  c.eval_every = 250
  # Seeds first_seed, ..., first_seed + seeds - 1; each seed's initial weights and
  # batch order are shared by the runs with and without GC.
  c.seeds = 5
  c.first_seed = 0
  c.target_loss = 0.1  # reported: the first step at which the train loss is <= this
  # GC: rules (pattern, axes) tried before the preset; see optax_gc.centralize.
  c.gc_rules = ()
  c.gc_preset = "flax"
  c.workdir = "runs"
  c.progress = True
  return c


def config_names() -> list[str]:
  """The names of the configs in ``./configs`` and the repository's ``configs/``."""
  dirs = {Path("configs"), REPO_CONFIGS}
  return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.py") if p.stem[0] != "_"})


def find_config(spec: str) -> Path:
  """The file for ``--config=spec``: a path to a .py file, or a bare config name.

  Example:
    >>> find_config("default").name
    'default.py'
  """
  if spec.endswith(".py") or os.sep in spec:
    path = Path(spec)
    if not path.is_file():
      raise UsageError(
        f"config file {spec!r} does not exist; pass a path to a configs/NAME.py file"
      )
    return path
  for d in (Path("configs"), REPO_CONFIGS):
    if (d / f"{spec}.py").is_file():
      return d / f"{spec}.py"
  raise UsageError(
    f"unknown config {spec!r}; pass --config=NAME with NAME one of {', '.join(config_names())}, "
    "or a path to a config file"
  )


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from the config file that ``spec`` names.

  Example:
    >>> load("mnist1d_mlp").model.kind
    'mlp'
  """
  path = find_config(spec)
  module_spec = importlib.util.spec_from_file_location(f"_optax_gc_config_{path.stem}", path)
  if module_spec is None or module_spec.loader is None:
    raise UsageError(f"config file {str(path)!r} cannot be loaded as Python")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is the user's input, not our bug
    raise UsageError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"config file {str(path)!r} defines no get_config(); add one")
  return module.get_config()


def fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf field of ``config`` as a dotted name.

  Example:
    >>> fields(base_config())[:3]
    ['adam.b1', 'adam.b2', 'adam.eps']
  """
  out = []
  for key, value in sorted(config.items()):
    if isinstance(value, ml_collections.ConfigDict):
      out += fields(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _parse_value(key: str, raw: str, old):
  def bad(expected):
    return UsageError(
      f"--config.{key}={raw}: expected {expected}; pass e.g. --config.{key}={old!r}"
    )

  if isinstance(old, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise bad("true or false")
  if isinstance(old, int):
    try:
      return int(raw)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(old, float):
    try:
      return float(raw)
    except ValueError:
      raise bad("a number") from None
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise bad(f"a Python literal like {old!r}") from None
  if isinstance(old, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise bad(f"a tuple like {old!r}")
    return tuple(value)
  return value


def override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets the dotted field ``key`` of ``config`` from the command-line string ``raw``.

  The string is read as the field's current type (bool, int, float, str, or a
  Python literal for tuples).

  Example:
    >>> c = base_config()
    >>> override(c, "adam.learning_rate", "3e-3")
    >>> c.adam.learning_rate
    0.003
  """
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = fields(config)
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"did you mean --config.{close[0]}?" if close else f"fields: {', '.join(known)}"
      raise UsageError(f"unknown config field {key!r} in --config.{key}={raw}; {hint}")
    if i < len(parts) - 1:
      node = node[part]
  old = node[parts[-1]]
  if isinstance(old, ml_collections.ConfigDict):
    raise UsageError(
      f"--config.{key} is a group of fields; set one of them, e.g. "
      f"--config.{fields(old, key + '.')[0]}=..."
    )
  node[parts[-1]] = _parse_value(key, raw, old)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`UsageError` naming the first invalid field and how to fix it.

  Example:
    >>> c = base_config()
    >>> c.seeds = 0
    >>> try:
    ...   validate(c)
    ... except UsageError as e:
    ...   print(e)
    --config.seeds=0: must be an integer >= 1; pass e.g. --config.seeds=5
  """

  def check(key, ok, requirement, example):
    node = config
    for part in key.split("."):
      node = node[part]
    if not ok(node):
      raise UsageError(
        f"--config.{key}={node}: must be {requirement}; pass e.g. --config.{key}={example}"
      )

  def positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

  def count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

  def unit(v):
    return isinstance(v, (int, float)) and 0 <= v < 1

  check("dataset", lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}", "mnist1d")
  kinds = DATASETS[config.dataset]
  check(
    "model.kind", lambda v: v in kinds, f"one of {', '.join(kinds)} for {config.dataset}", kinds[0]
  )
  check("optimizer", lambda v: v in OPTIMIZERS, "sgd or adam", "adam")
  check("sgd.learning_rate", positive, "a positive number", 0.1)
  check("sgd.momentum", unit, "in [0, 1)", 0.9)
  check("adam.learning_rate", positive, "a positive number", 0.01)
  check("adam.b1", unit, "in [0, 1)", 0.9)
  check("adam.b2", unit, "in [0, 1)", 0.999)
  check("adam.eps", positive, "a positive number", 1e-8)
  check("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a number >= 0", 0.0)
  check("schedule", lambda v: v in SCHEDULES, "constant or cosine", "cosine")
  for key, example in (("seeds", 5), ("num_steps", 6000), ("eval_every", 250), ("batch_size", 100)):
    check(key, count, "an integer >= 1", example)
  check("first_seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0", 0)
  check("target_loss", positive, "a positive number", 0.1)
  check("gc_preset", lambda v: v in PRESETS, f"one of {', '.join(PRESETS)}", "flax")
  try:
    optax_gc.centralize(tuple(config.gc_rules), preset=preset(config))
  except (ValueError, TypeError) as e:
    raise UsageError(f"--config.gc_rules={config.gc_rules!r}: {e}") from e


def preset(config: ml_collections.ConfigDict) -> optax_gc.Preset | None:
  """The GC preset the config names (``"none"`` is no preset: only ``gc_rules``)."""
  return None if config.gc_preset == "none" else config.gc_preset


def check_writable(workdir: str) -> None:
  """Raises :class:`UsageError` unless ``workdir`` is, or can be made, a writable folder.

  Nothing is left behind: the probe folder it creates is removed.

  Example:
    >>> import tempfile
    >>> check_writable(tempfile.gettempdir() + "/not/yet/there")
  """
  path = Path(workdir).absolute()
  existing = path
  while not existing.exists():
    existing = existing.parent
  fix = "pass --workdir=DIR with DIR a writable folder"
  if not existing.is_dir():
    raise UsageError(
      f"work directory {workdir!r} is not usable: {str(existing)!r} is a file; {fix}"
    )
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".optax-gc-probe-", dir=existing))
  except OSError as e:
    raise UsageError(f"work directory {workdir!r} is not writable ({e.strerror}); {fix}") from e
