"""The presets: which axes are each neuron's fan-in in common layouts.

Each entry is ``(pattern, axes, label, min_ndim)``; the entry applies to a leaf
whose path matches ``pattern`` (``re.search``) and that has at least
``min_ndim`` dimensions. User rules are tried first; the first match wins.
"""

# Leaves GC must never touch in either layout: embedding tables (their gradient
# is sparse by row), biases of any rank (attention biases are (heads,
# head_dim)), and norm scales and offsets.
_EMBEDDING = (r"(^|/)[^/]*embeddings?$", None, "embedding", 0)
_BIAS = (r"(^|/)([^/]*bias|b)$", None, "bias", 0)
_NORM = (r"(^|/)(scale|offset)$", None, "norm scale/offset", 0)

_TORCH_UNTOUCHED = (
  (r"(^|/)[^/]*embed[^/]*/weight$", None, "embedding", 0),
  _EMBEDDING,
  _BIAS,
  (r"(?i)(^|/)([^/]*norm[^/]*|ln[^/]*|bn[^/]*)/weight$", None, "norm weight", 0),
  _NORM,
)
# The conv-only presets (the reference's "GCC") end with this: kernels of
# fewer than 3 dimensions (Dense, Linear) stay unchanged.
_NOT_CONV = (r"", None, "not a conv kernel", 0)

PRESETS = {
  # Flax linen and nnx, Haiku: kernels are (..., in, out).
  "flax": (
    _EMBEDDING,
    _BIAS,
    _NORM,
    # (in, heads, head_dim): averaging across heads would mix neurons.
    # The rank guard lets a 2-D Dense that happens to be named "query" fall
    # through to the default, and keeps a stacked (L, in, heads, head_dim)
    # kernel right, since -3 counts from the end.
    (r"(^|/)(query|key|value)/kernel$", (-3,), "attention q/k/v kernel", 3),
    (r"(^|/)out/kernel$", (-3, -2), "attention output kernel", 3),
    (r"", "all_but_last", "(..., in, out) kernel", 0),
  ),
  # Equinox and weights kept in PyTorch layout: (out, in, *k).
  "torch": _TORCH_UNTOUCHED + ((r"", "all_but_first", "(out, in, ...) weight", 0),),
  "flax_conv": (
    _EMBEDDING,
    _BIAS,
    _NORM,
    (r"(^|/)(query|key|value|out)/kernel$", None, "attention kernel, not conv", 3),
    (r"", "all_but_last", "conv kernel", 3),
    _NOT_CONV,
  ),
  "torch_conv": _TORCH_UNTOUCHED + ((r"", "all_but_first", "conv weight", 3), _NOT_CONV),
}
