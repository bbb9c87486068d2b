"""The presets: path-only readings of each kernel's fan-in, for trees given without a model.

A path says little about a layer (a stacked Dense kernel ``(L, in, out)`` looks
like a 1-D conv kernel), so the presets are conservative: ``"flax"`` centres
only leaves named ``kernel`` (linen, nnx) or ``w`` (Haiku), ``"torch"`` only
``weight``. A kernel's layout is settled by its rank 2, by a sibling bias
(which holds the output axes and any stack axes in front), or by the logical
axis names of a linen box that name a stack axis. Where the tree contradicts
the layout (a 2-D kernel whose bias matches its input axis, a bias that fits no
split of the kernel) the leaf is left unchanged and marked undecided; where
nothing settles a rank above 2, the reading is a guess and says so. A leaf of 2
or more dimensions with a name the preset does not know (neither a kernel nor a
bias, norm or table name) is left unchanged and marked undecided too:
:func:`optax_gc.rules_for` reads them all from the model.

Each entry is ``(pattern, axes, label)``: the first whose pattern
``re.search``es the leaf's path decides; ``axes`` is as in a user rule, or a
function of ``(path, shape, hint)`` returning a :class:`Layout`.
"""

from typing import NamedTuple


class Hint(NamedTuple):
  """What the tree around a leaf shows: stack axes from logical names, a sibling bias."""

  stack: tuple[int, ...] = ()  # axes whose logical name names a stack (e.g. "layers")
  bias: tuple[int, ...] | None = None  # the sibling bias's shape, its named stack axes removed


NO_HINT = Hint()


class Layout(NamedTuple):
  """A preset's reading of one leaf: fan-in axes (None: unchanged), why, and how sure.

  ``guess``: the axes are the preset's assumption; ``undecided``: left
  unchanged because the preset cannot tell what the leaf is.
  """

  axes: tuple[int, ...] | None
  label: str
  guess: bool = False
  conv: bool = False  # a conv kernel: what the conv-only presets keep
  undecided: bool = False


_ATTENTION_IN = ("query", "key", "value")


def _from_bias(kernel: tuple[int, ...], bias: tuple[int, ...], torch: bool):
  """The fan-in axes the bias allows, or None when it fits no split of the kernel.

  A kernel is ``(stack..., in..., out...)`` (Flax) or ``(stack..., out..., in...)``
  (PyTorch) and its bias ``(stack..., out...)``: every split of the bias into
  shared stack axes and output axes that matches the kernel is a candidate.
  Returns ``(axes, ambiguous)``.
  """
  if torch:  # Equinox's conv bias is (out, 1, ..., 1): broadcast over the spatial axes
    while len(bias) > 1 and bias[-1] == 1:
      bias = bias[:-1]
  found = []
  for s in range(len(bias)):
    n_out = len(bias) - s
    n_in = len(kernel) - s - n_out
    if n_in < 1 or kernel[:s] != bias[:s]:
      continue
    out = kernel[s : s + n_out] if torch else kernel[len(kernel) - n_out :]
    if out == bias[s:]:
      found.append(tuple(range(s + n_out, len(kernel)) if torch else range(s, s + n_in)))
  if not found:
    return None
  # Several splits: the one with the most stack axes (a bias of rank 2 is more
  # often a stacked (L, out) than a 2-D output).
  return found[-1], len(set(found)) > 1


def kernel_layout(path: str, shape: tuple[int, ...], hint: Hint, *, torch: bool) -> Layout:
  """The fan-in of a ``kernel``/``w`` (Flax) or ``weight`` (PyTorch) leaf from its tree."""
  kept = [i for i in range(len(shape)) if i not in hint.stack]
  k = tuple(shape[i] for i in kept)
  parts = path.split("/")
  layer = "" if torch or len(parts) < 2 else parts[-2]  # query, key, value, out: attention
  stacked = f", stack axes {hint.stack} kept (logical names)" if hint.stack else ""
  layout = "(out, in, ...) weight" if torch else "(..., in, out) kernel"
  if len(k) < 2:
    return Layout(None, f"fewer than 2 dims{stacked}, unchanged")
  if len(k) == 2:
    label = ("(out, in) weight" if torch else "(in, out) kernel") + stacked
    out_axis = 0 if torch else 1
    if hint.bias is not None and hint.bias != (k[out_axis],) and hint.bias == (k[1 - out_axis],):
      stored = "(in, out)" if torch else "(out, in)"
      return Layout(
        None,
        f"its bias {hint.bias} fits axis {kept[1 - out_axis]}: stored {stored}?{stacked}",
        undecided=True,
      )
    return Layout((kept[1],) if torch else (kept[0],), label)
  from_bias = _from_bias(k, hint.bias, torch) if hint.bias is not None else None
  if hint.bias is not None and from_bias is None:
    return Layout(None, f"its bias {hint.bias} fits no split of {shape}{stacked}", undecided=True)
  if from_bias is not None:
    fan_in, ambiguous = from_bias
    label = f"{layout}, out axes from its bias {hint.bias}{stacked}"
    if ambiguous:
      label += "; guessed (the bias fits several splits)"
  else:
    ambiguous = True
    if torch:
      fan_in, label = tuple(range(1, len(k))), layout
    elif layer in _ATTENTION_IN and len(k) >= 3:
      fan_in, label = (len(k) - 3,), "attention q/k/v kernel (in, heads, head_dim)"
      ambiguous = len(k) > 3
    elif layer == "out" and len(k) >= 3:
      fan_in, label = (len(k) - 3, len(k) - 2), "attention output kernel (heads, head_dim, out)"
      ambiguous = len(k) > 3
    else:
      fan_in, label = tuple(range(len(k) - 1)), layout
    label += stacked
    if ambiguous:
      label += "; guessed (rank > 2, no bias or logical names)"
  conv = len(k) >= 3 and layer not in (*_ATTENTION_IN, "out")
  return Layout(tuple(kept[a] for a in fan_in), label, ambiguous, conv)


def _flax(path, shape, hint):
  return kernel_layout(path, shape, hint, torch=False)


def _torch(path, shape, hint):
  return kernel_layout(path, shape, hint, torch=True)


def _unknown(path, shape, hint):
  del path, hint
  if len(shape) < 2:
    return Layout(None, "not a kernel")
  return Layout(None, "a name the preset does not know", undecided=True)


_KERNEL = r"(^|/)(kernel|w)$"
_WEIGHT = r"(^|/)weight$"
# Leaf names that are never a neuron's weights: biases, norm scales and
# offsets, batch statistics, embedding tables.
_NOT_KERNEL = (
  r"(?i)(^|/)(b|bias|[^/]*_bias|biases|scale|[^/]*_scale|offset|gamma|beta|mean|var|"
  r"variance|average|running_mean|running_var|[^/]*embed[^/]*)$"
)
# PyTorch-layout leaves named "weight" that are not a layer's kernel.
_TORCH_UNTOUCHED = (
  (r"(^|/)[^/]*embed[^/]*/weight$", None, "embedding"),
  (r"(?i)(^|/)([^/]*norm[^/]*|ln[^/]*|bn[^/]*)/weight$", None, "norm weight"),
)

PRESETS = {
  "flax": (
    (_KERNEL, _flax, "kernel"),
    (_NOT_KERNEL, None, "not a kernel"),
    (r"", _unknown, "unknown"),
  ),
  "torch": _TORCH_UNTOUCHED
  + ((_WEIGHT, _torch, "weight"), (_NOT_KERNEL, None, "not a weight"), (r"", _unknown, "unknown")),
}
# The conv-only presets (the reference's "GCC") centre a kernel only where it
# has 3 or more dims outside any stack and is not an attention kernel.
PRESETS["flax_conv"] = PRESETS["flax"]
PRESETS["torch_conv"] = PRESETS["torch"]
CONV_ONLY = frozenset({"flax_conv", "torch_conv"})
