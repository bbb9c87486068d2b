"""What a layer says of its parameters: which is the kernel, and the kernel's fan-in axes.

Layers are recognised by what they hold, as Flax's and Equinox's own hold it:
an einsum string (``einsum_str``, or a string the layer was called with, in
linen), a ``kernel_size`` (convolutions, with ``transpose_kernel`` and
``shared_weights`` telling transposed and unshared ones), ``num_embeddings``
(embeddings), or features (``features``, ``out_features``,
``out_features_shape``) with ``axis``/``in_features`` and batch axes (Dense,
DenseGeneral, LinearGeneral). Norm layers are recognised by class. Fan-in axes
are of one layer's kernel; a stack of layers adds its own axes in front (see
``derive``).
"""

import dataclasses
import re
import sys

_BIAS = re.compile(r"^(bias|b|.*_bias)$")
_EINSUM = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]+)(->([a-zA-Z.]*))?$")
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm")


@dataclasses.dataclass(frozen=True)
class Layer:
  """What :func:`read` found of one layer (no stack axes): its kernel and the kernel's fan-in.

  ``kernel`` is None for a layer with nothing to centre (embeddings, norms).
  """

  label: str
  kernel: str | None = None
  rank: int = 0
  fan_in: tuple[int, ...] = ()
  conv: bool = False
  shape: tuple[int, ...] | None = None  # the kernel's shape, where the layer holds it


def class_label(module) -> str:
  """``nn.Dense``, ``nnx.Linear``, ``eqx.nn.Linear``, or a user's own class name."""
  cls = type(module)
  for prefix, short in (("flax.linen", "nn"), ("flax.nnx", "nnx"), ("equinox", "eqx.nn")):
    if cls.__module__.startswith(prefix):
      return f"{short}.{cls.__name__}"
  return cls.__name__


def _sizes(value) -> tuple[int, ...] | None:
  if isinstance(value, int) and not isinstance(value, bool):
    return (value,)
  if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
    return tuple(value)
  return None


def is_bias(name: object) -> bool:
  return bool(_BIAS.match(str(name)))


def _is_norm(module) -> bool:
  """A norm of Flax's or Equinox's, or a subclass of one."""
  return any(
    c.__name__ in _NORMS and c.__module__.startswith(("flax.linen", "flax.nnx", "equinox"))
    for c in type(module).__mro__
  )


def parse_einsum(spec: str) -> tuple[str, str] | None:
  """``(kernel indices, output indices)`` of a two-operand einsum, or None.

  Example:
    >>> parse_einsum("BTD,NDH->BTNH")
    ('NDH', 'BTNH')
  """
  match = _EINSUM.match(spec.replace(" ", ""))
  if match is None:
    return None
  x, kernel, _, out = match.groups()
  if out is None:  # implicit output: the indices that appear once, sorted
    both = x.replace(".", "") + kernel
    out = "".join(sorted(c for c in set(both) if both.count(c) == 1))
  if len(set(kernel)) != len(kernel):
    return None
  return kernel, out


def _einsum(module, rank, strings, label):
  specs = [getattr(module, "einsum_str", None), *strings]
  for spec in specs:
    parsed = parse_einsum(spec) if isinstance(spec, str) else None
    if parsed is None or (rank is not None and len(parsed[0]) != rank):
      continue
    kernel, out = parsed
    fan_in = tuple(i for i, c in enumerate(kernel) if c not in out)
    shape = _sizes(getattr(module, "kernel_shape", None) or getattr(module, "shape", None))
    shape = shape if shape is not None and len(shape) == len(kernel) else None
    return len(kernel), fan_in, f"{label} {spec.replace(' ', '')!r}", False, shape
  return None


def _conv(module, rank, label):
  kernel_size = _sizes(getattr(module, "kernel_size", None))
  if kernel_size is None:
    return None
  r = len(kernel_size) + 2
  fan_in: tuple[int, ...]
  if getattr(module, "shared_weights", True) is False:  # ConvLocal: (*out, prod(k) * in, out)
    fan_in = (r - 2,)
  elif getattr(module, "transpose_kernel", False):  # (*k, out, in)
    fan_in = (*range(r - 2), r - 1)
  else:  # (*k, in / groups, out)
    fan_in = tuple(range(r - 1))
  shape = _sizes(getattr(module, "kernel_shape", None))
  return r, fan_in, label, True, shape


def _first(module, *attrs) -> tuple[int, ...] | None:
  """The sizes held in the first of ``attrs`` the module holds as an int or ints."""
  for attr in attrs:
    sizes = _sizes(getattr(module, attr, None))
    if sizes is not None:
      return sizes
  return None


def _dense(module, label):
  out = _first(module, "out_features_shape", "features", "out_features")
  if out is None:
    return None
  batch = getattr(module, "batch_axis", None) or {}  # nnx: {axis: size}
  n_batch = len(batch) or len(getattr(module, "batch_dims", ()) or ())  # linen: axes
  inputs = _first(module, "in_features_shape", "in_features")
  if inputs is None:  # linen: the kernel's input axes are those of `axis`
    axis = getattr(module, "axis", -1)
    n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
  else:
    n_in = len(inputs)
  shape = None
  if inputs is not None and len(batch) == n_batch:
    shape = (*batch.values(), *inputs, *out)
  return n_batch + n_in + len(out), tuple(range(n_batch, n_batch + n_in)), label, False, shape


def read(module, params: dict, strings=(), *, torch: bool = False) -> Layer | None:
  """Reads one layer's parameters; None where the layer is not one this module knows.

  Args:
    module: the layer (a linen or nnx Module, an Equinox Module).
    params: ``{name: rank of one layer's leaf, or None if unknown}`` of its own
      parameters (not its sublayers').
    strings: the strings the layer was called with (linen): an einsum given at
      call time.
    torch: PyTorch layout (Equinox): weights ``(out, in, ...)``.

  Returns:
    A :class:`Layer`, or None: an unknown layer, or one whose parameters do not
    fit what it holds.

  Example:
    >>> import flax.linen as nn
    >>> read(nn.DenseGeneral((4, 8), axis=(-2, -1)), {"kernel": 4, "bias": 2})
    Layer(label='nn.DenseGeneral', kernel='kernel', rank=4, fan_in=(0, 1), conv=False, shape=None)
  """
  label = class_label(module)
  if _is_norm(module) or hasattr(module, "num_embeddings"):
    return Layer(label)
  weights = [n for n in params if not is_bias(n)]
  if len(weights) != 1:
    return None
  (name,) = weights
  rank = params[name]
  if torch:
    found = _torch(module, label)
  else:
    found = (
      _einsum(module, rank, strings, label)
      or _conv(module, rank, label)
      or (_dense(module, label) if _holds_features(module) else None)
    )
  if found is None or (rank is not None and rank != found[0]):
    return None
  r, fan_in, label, conv, shape = found
  return Layer(label, name, r, fan_in, conv, shape)


def _holds_features(module) -> bool:
  """Dense-like: a Flax Dense/DenseGeneral/Linear/LinearGeneral, or a layer holding the same."""
  held = [("features", "axis"), ("in_features_shape", "out_features_shape")]
  held.append(("in_features", "out_features"))
  return type(module).__name__ in ("Dense", "DenseGeneral", "Linear", "LinearGeneral") or any(
    all(hasattr(module, name) for name in names) for names in held
  )


def _torch(module, label):
  """Equinox (PyTorch layout): Linear ``(out, in)``; Conv, ConvTranspose ``(out, in / g, *k)``."""
  eqx = sys.modules.get("equinox")
  if eqx is None:
    return None
  if isinstance(module, eqx.nn.Linear):  # "scalar" features are stored as a size of 1
    shape = tuple(1 if n == "scalar" else n for n in (module.out_features, module.in_features))
    return 2, (1,), label, False, shape
  if isinstance(module, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
    k = tuple(module.kernel_size)
    shape = (module.out_channels, module.in_channels // module.groups, *k)
    return len(shape), tuple(range(1, len(shape))), label, True, shape
  return None
