"""Configs: the common fields, finding ``NAME.py`` by name, field values, validation.

A config file follows the Flax examples' convention: ``get_config()`` returns an
``ml_collections.ConfigDict``. Ours start from :func:`base_config`, so every
config has the same fields and every field can be overridden on the command
line (``--config.seeds=3``, ``--config.adam.learning_rate=3e-3``, by
``ml_collections.config_flags``) or swept (``--sweep=sgd.learning_rate=0.1,0.3``).
The configs ship in the package (``optax_gc.configs``, from the repository's
``configs/``); ``./configs/NAME.py`` in the working directory comes first.
"""

import ast
import difflib
import importlib.resources
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import ml_collections

import optax_gc
from optax_gc.experiments import data, models

DATASETS = {
  "mnist1d": ("cnn1d", "mlp", "transformer", "resnet1d"),
  "digits": ("cnn2d", "mlp", "resnet2d"),
}
OPTIMIZERS = ("sgd", "adam", "muon")
MUON_DIMS = ("derived", "default")
SCHEDULES = ("constant", "cosine", "step")
PRESETS = ("flax", "flax_conv", "torch", "torch_conv", "none")


class UsageError(Exception):
  """Input the runner refuses before it trains: a one-line message naming it and the fix."""


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
  # Model: `kind` is cnn1d, cnn2d, mlp, transformer, resnet1d or resnet2d; other fields go to
  # its constructor.
  c.model = ml_collections.ConfigDict({"kind": "cnn1d"})
  # Optimizer: "sgd" (heavy-ball momentum), "adam" or "muon", with the hyperparameters
  # of the one selected. GC on: optax_gc.sgd_gc / adam_gc / GC before Muon; off: the
  # same without GC. Muon (optax.contrib.muon) orthogonalises each kernel's update
  # over the axes `dims` names: "derived", those optax_gc.rules_for reads from the
  # model (optax_gc.muon_dimension_numbers), or "default", Muon's own (2-D leaves
  # only); every other leaf takes Adam's step at `adam_learning_rate`.
  c.optimizer = "adam"
  c.sgd = ml_collections.ConfigDict({"learning_rate": 0.1, "momentum": 0.9, "nesterov": False})
  c.adam = ml_collections.ConfigDict({"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8})
  c.muon = ml_collections.ConfigDict(
    {"learning_rate": 0.02, "beta": 0.95, "adam_learning_rate": 1e-2, "dims": "derived"}
  )
  c.weight_decay = 5e-4  # coupled L2, added to the gradient before GC (the paper's order)
  # "cosine": decay to 0 over num_steps; "step": x0.1 at 50% and 75% of num_steps; "constant".
  c.schedule = "cosine"
  c.batch_size = 100
  c.num_steps = 6000
  c.eval_every = 250
  # Seeds first_seed, ..., first_seed + seeds - 1; each seed's initial weights and
  # batch order are shared by the runs with and without GC.
  c.seeds = 5
  c.first_seed = 0
  c.target_loss = 0.1  # reported: the first step at which the train loss is <= this
  # GC: rules (pattern, axes) tried first, then those optax_gc.rules_for derives from the
  # model, then the preset; see optax_gc.centralize.
  c.gc_rules = ()
  c.gc_preset = "flax"
  c.workdir = "runs"
  c.progress = True
  return c


def _packaged() -> dict[str, Path]:
  folder = importlib.resources.files("optax_gc.configs")
  return {
    p.name[:-3]: Path(str(p))
    for p in folder.iterdir()
    if p.name.endswith(".py") and not p.name.startswith("_")
  }


def config_names() -> list[str]:
  """The names of the installed configs and of those in ``./configs``."""
  local = Path("configs")
  mine = {p.stem for p in local.glob("*.py") if p.stem[0] != "_"} if local.is_dir() else set()
  return sorted(mine | set(_packaged()))


def find_config(spec: str) -> Path:
  """The file for ``--config=spec``: a path to a .py file, or a config's name.

  A name is looked up in ``./configs`` first, then among the installed configs.

  Example:
    >>> find_config("default").name
    'default.py'
  """
  if spec.endswith(".py") or os.sep in spec:
    path = Path(spec)
    if not path.is_file():
      raise UsageError(
        f"config file {spec!r} does not exist; pass a path to a NAME.py file or a config's name"
      )
    return path
  local = Path("configs") / f"{spec}.py"
  if local.is_file():
    return local
  packaged = _packaged()
  if spec in packaged:
    return packaged[spec]
  close = difflib.get_close_matches(spec, config_names(), n=1)
  hint = f"did you mean --config={close[0]}? " if close else ""
  raise UsageError(
    f"unknown config {spec!r}; {hint}configs: {', '.join(config_names())}, or a path to a .py file"
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
  config = module.get_config()
  problem = _schema_problem(config)
  if problem:
    raise UsageError(
      f"config file {str(path)!r}: {problem}; start get_config() from "
      "optax_gc.experiments.config.base_config() and change its fields"
    )
  return config


def _schema_problem(config) -> str | None:
  """What keeps ``config`` from being a runner config (its fields are :func:`base_config`'s)."""
  if not isinstance(config, ml_collections.ConfigDict):
    return f"get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict"
  base = base_config()
  if not isinstance(config.get("model"), ml_collections.ConfigDict) or "kind" not in config.model:
    return "it has no model.kind"
  # model and data hold the model's and the data set's own arguments, checked by validate().
  expected = [f for f in fields(base) if f.partition(".")[0] not in ("model", "data")]
  given = [f for f in fields(config) if f.partition(".")[0] not in ("model", "data")]
  missing = sorted(set(expected) - set(given))
  if missing:
    return f"it lacks the field{'s' * (len(missing) > 1)} {', '.join(missing)}"
  unknown = sorted(set(given) - set(expected))
  if unknown:
    close = difflib.get_close_matches(unknown[0], expected, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"the runner has no field {unknown[0]}{hint}"
  if not isinstance(config.get("data"), ml_collections.ConfigDict):
    return "it has no data group"
  return None


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
    return UsageError(f"{key}={raw}: expected {expected}, like {key}={old!r}")

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
  """Sets the dotted field ``key`` of ``config`` from the string ``raw``, read as its type.

  Raises :class:`UsageError` for an unknown field (with the closest name) or a
  value of the wrong type.

  Example:
    >>> c = base_config()
    >>> override(c, "adam.learning_rate", "3e-3")
    >>> c.adam.learning_rate
    0.003
  """
  node, last = holder(config, key)
  old = node[last]
  if isinstance(old, ml_collections.ConfigDict):
    raise UsageError(
      f"{key} is a group of fields; give one of them, e.g. {fields(old, key + '.')[0]}"
    )
  node[last] = _parse_value(key, raw, old)


def holder(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """``(ConfigDict, name)`` holding the dotted field ``key``; :class:`UsageError` if none does.

  Example:
    >>> try:
    ...   holder(base_config(), "sgd.learning_rat")
    ... except UsageError as e:
    ...   print(e)
    unknown config field 'sgd.learning_rat'; did you mean sgd.learning_rate?
  """
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, fields(config), n=1, cutoff=0.5)
      hint = f"did you mean {close[0]}?" if close else "see --help"
      raise UsageError(f"unknown config field {key!r}; {hint}")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


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

  def name(v):
    return isinstance(v, str) and v and not set(v) & {"/", "\\", "\0"} and v not in (".", "..")

  check("name", name, "a folder name, without / or \\", "my_run")
  check("dataset", lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}", "mnist1d")
  kinds = DATASETS[config.dataset]
  check(
    "model.kind", lambda v: v in kinds, f"one of {', '.join(kinds)} for {config.dataset}", kinds[0]
  )
  _check_arguments(config, "data", data.arguments(config.dataset), "dataset", config.dataset)
  kind = config.model.kind
  _check_arguments(config, "model", models.arguments(kind), "model.kind", kind)
  check("optimizer", lambda v: v in OPTIMIZERS, "sgd, adam or muon", "adam")
  check("sgd.learning_rate", positive, "a positive number", 0.1)
  check("sgd.momentum", unit, "in [0, 1)", 0.9)
  check("sgd.nesterov", lambda v: isinstance(v, bool), "true or false", False)
  if config.optimizer == "sgd" and config.sgd.nesterov and not config.sgd.momentum:
    raise UsageError(
      "--config.sgd.nesterov=True needs momentum, but --config.sgd.momentum=0; "
      "pass e.g. --config.sgd.momentum=0.9"
    )
  check("adam.learning_rate", positive, "a positive number", 0.01)
  check("adam.b1", unit, "in [0, 1)", 0.9)
  check("adam.b2", unit, "in [0, 1)", 0.999)
  check("adam.eps", positive, "a positive number", 1e-8)
  check("muon.learning_rate", positive, "a positive number", 0.02)
  check("muon.beta", unit, "in [0, 1)", 0.95)
  check("muon.adam_learning_rate", positive, "a positive number", 0.01)
  check("muon.dims", lambda v: v in MUON_DIMS, " or ".join(MUON_DIMS), "derived")
  check("weight_decay", lambda v: v == 0 or positive(v), "a number >= 0", 0.0)
  check("schedule", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}", "cosine")
  for key, example in (("seeds", 5), ("num_steps", 6000), ("eval_every", 250), ("batch_size", 100)):
    check(key, count, "an integer >= 1", example)
  check("first_seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0", 0)
  check("target_loss", positive, "a positive number", 0.1)
  check("progress", lambda v: isinstance(v, bool), "true or false", True)
  check("gc_preset", lambda v: v in PRESETS, f"one of {', '.join(PRESETS)}", "flax")
  try:
    optax_gc.centralize(tuple(config.gc_rules), preset=preset(config))
  except (ValueError, TypeError) as e:
    raise UsageError(f"--config.gc_rules={config.gc_rules!r}: {e}") from e


def _check_arguments(config, group: str, allowed: dict, owner: str, value: str) -> None:
  """Every field of ``config[group]`` must be an argument of the model or data set it builds."""
  for field, given in config[group].items():
    if field != "kind" and field not in allowed:
      example = _config_for(owner, value)
      fix = f"use a config made for it, e.g. --config={example}" if example else "drop the field"
      raise UsageError(
        f"--config.{group}.{field}={given!r}: {owner}={value} takes no {field} (it takes "
        f"{', '.join(allowed) or 'nothing'}); {fix}"
      )


def _config_for(key: str, value: str) -> str | None:
  """The name of a config whose ``key`` (dataset or model.kind) is ``value``, for a hint."""
  for name in config_names():
    try:
      config = load(name)
    except UsageError:
      continue
    if name != "default" and (config.dataset if key == "dataset" else config.model.kind) == value:
      return name
  return None


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
