"""Flax (nnx) models for the experiments, and a convolution that is fast on CPU."""

import inspect
import itertools
import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx


def matmul_conv(
  inputs,
  kernel,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **unused,
):
  """``lax.conv_general_dilated`` for Flax's channels-last layout, as one matmul.

  Gathers the strided windows (im2col) and contracts them with the kernel.
  Inside a ``lax.scan`` of training steps, XLA's CPU convolution runs several
  times slower than this matmul; the kernel keeps Flax's ``(*window, in, out)``
  layout, so the parameters, their paths and what GC does to them are those of
  ``nnx.Conv``. Pass it as ``nnx.Conv(..., conv_general_dilated=matmul_conv)``.
  Only what ``nnx.Conv`` uses here is supported: explicit padding, no dilation,
  one feature group.

  Example:
    >>> import numpy as np
    >>> from jax import lax
    >>> x, k = jnp.ones((2, 9, 3)), jnp.arange(24.0).reshape(4, 3, 2)
    >>> dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NWC", "WIO", "NWC"))
    >>> ref = lax.conv_general_dilated(x, k, (2,), [(1, 1)], dimension_numbers=dn)
    >>> bool(np.allclose(matmul_conv(x, k, (2,), [(1, 1)]), ref))
    True
  """
  del dimension_numbers, unused
  spatial = kernel.ndim - 2
  if feature_group_count != 1 or any(
    d is not None and any(v != 1 for v in d) for d in (lhs_dilation, rhs_dilation)
  ):
    raise NotImplementedError("matmul_conv supports no dilation and one feature group")
  if isinstance(padding, str):
    raise NotImplementedError("matmul_conv needs explicit padding, e.g. padding=1")
  x = jnp.pad(inputs, ((0, 0), *padding, (0, 0)))
  window = kernel.shape[:spatial]
  out = [(x.shape[1 + d] - window[d]) // window_strides[d] + 1 for d in range(spatial)]
  cols = [
    x[
      (
        slice(None),
        *(
          slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(off, window_strides, out, strict=True)
        ),
      )
    ]
    for off in itertools.product(*(range(w) for w in window))
  ]
  patches = jnp.stack(cols, axis=-2)  # (batch, *out, window size, in)
  k = kernel.reshape(-1, *kernel.shape[-2:])
  return jnp.einsum("...wi,wio->...o", patches, k, precision=precision)


class CNN1D(nnx.Module):
  """The MNIST-1D paper's CNN: three strided 1-D convolutions and a linear head.

  Example:
    >>> import jax
    >>> jax.eval_shape(lambda x: CNN1D(rngs=nnx.Rngs(0))(x), jnp.ones((2, 40))).shape
    (2, 10)
  """

  def __init__(self, length=40, channels=25, num_classes=10, *, rngs: nnx.Rngs):
    def conv(cin, k):
      return nnx.Conv(
        cin, channels, (k,), strides=2, padding=1, conv_general_dilated=matmul_conv, rngs=rngs
      )

    self.conv1, self.conv2, self.conv3 = conv(1, 5), conv(channels, 3), conv(channels, 3)
    for k in (5, 3, 3):
      length = (length + 2 - k) // 2 + 1
    self.head = nnx.Linear(length * channels, num_classes, rngs=rngs)

  def __call__(self, x):
    x = x[..., None]
    for conv in (self.conv1, self.conv2, self.conv3):
      x = nnx.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


class CNN2D(nnx.Module):
  """A small 2-D CNN for 8x8 digits: two 3x3 convolutions (the second strided).

  Example:
    >>> import jax
    >>> jax.eval_shape(lambda x: CNN2D(rngs=nnx.Rngs(0))(x), jnp.ones((2, 8, 8, 1))).shape
    (2, 10)
  """

  def __init__(self, size=8, channels=(16, 32), num_classes=10, *, rngs: nnx.Rngs):
    if len(channels) != 2:
      raise ValueError(
        f"channels={channels!r}: must be two numbers, one per convolution, e.g. (16, 32)"
      )
    self.conv1 = nnx.Conv(
      1, channels[0], (3, 3), padding=1, conv_general_dilated=matmul_conv, rngs=rngs
    )
    self.conv2 = nnx.Conv(
      channels[0], channels[1], (3, 3), 2, padding=1, conv_general_dilated=matmul_conv, rngs=rngs
    )
    out = (size + 2 - 3) // 2 + 1
    self.head = nnx.Linear(out * out * channels[1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
  """A ReLU MLP on flattened inputs (the MNIST-1D paper's: two hidden layers of 100).

  Example:
    >>> import jax
    >>> jax.eval_shape(lambda x: MLP(40, rngs=nnx.Rngs(0))(x), jnp.ones((2, 40))).shape
    (2, 10)
  """

  def __init__(self, in_features, hidden: Sequence[int] = (100, 100), num_classes=10, *, rngs):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List(
      nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)


def _conv(cin, cout, ndim, kernel, stride, rngs):
  padding = kernel // 2
  return nnx.Conv(
    cin,
    cout,
    (kernel,) * ndim,
    strides=stride,
    padding=padding,
    use_bias=False,  # the batch norm after it has the offset
    conv_general_dilated=matmul_conv,
    rngs=rngs,
  )


def _norm(channels, rngs):
  # PyTorch's running-average momentum (0.1): runs here are a few thousand steps.
  return nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)


class ResidualBlock(nnx.Module):
  """Two 3-wide convolutions with batch norm, and a projected shortcut where the shape changes."""

  def __init__(self, cin, cout, stride, ndim, *, rngs: nnx.Rngs):
    self.conv1, self.norm1 = _conv(cin, cout, ndim, 3, stride, rngs), _norm(cout, rngs)
    self.conv2, self.norm2 = _conv(cout, cout, ndim, 3, 1, rngs), _norm(cout, rngs)
    projected = stride != 1 or cin != cout
    self.shortcut = nnx.data(
      nnx.Sequential(_conv(cin, cout, ndim, 1, stride, rngs), _norm(cout, rngs))
      if projected
      else None
    )

  def __call__(self, x):
    h = nnx.relu(self.norm1(self.conv1(x)))
    h = self.norm2(self.conv2(h))
    return nnx.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
  """A small batch-norm ResNet (the paper's regime): a stem, one residual block per stage.

  Each stage after the first halves the length (or height and width) and
  doubles the channels; global average pooling and a linear head follow.
  ``ndim`` is 1 for signals ``(batch, length)``, 2 for images ``(batch, h, w, c)``.

  Example:
    >>> import jax
    >>> def net(x):
    ...   return ResNet(1, channels=(8, 16), ndim=1, rngs=nnx.Rngs(0))(x)
    >>> jax.eval_shape(net, jnp.ones((2, 40))).shape
    (2, 10)
  """

  def __init__(self, in_channels, channels=(16, 32, 64), num_classes=10, *, ndim, rngs):
    if not channels:
      raise ValueError("channels=(): must give one number per stage, e.g. (16, 32, 64)")
    self.ndim = ndim
    self.stem = _conv(in_channels, channels[0], ndim, 3, 1, rngs)
    self.stem_norm = _norm(channels[0], rngs)
    sizes = [channels[0], *channels]
    self.blocks = nnx.List(
      ResidualBlock(a, b, 1 if i == 0 else 2, ndim, rngs=rngs)
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    )
    self.head = nnx.Linear(channels[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    if x.ndim == self.ndim + 1:  # no channel axis: one channel
      x = x[..., None]
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=tuple(range(1, 1 + self.ndim))))


class Block(nnx.Module):
  """A pre-norm Transformer block: self-attention and a GELU MLP."""

  def __init__(self, d_model, num_heads, mlp_dim, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads, d_model, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, d_model, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class Transformer(nnx.Module):
  """A ViT-style Transformer on 1-D signals cut into patches, blocks stacked by ``nnx.vmap``.

  The blocks' parameters carry a leading layer axis (``blocks/mlp_in/kernel``
  is ``(num_layers, d_model, mlp_dim)``), so GC needs rules with negative axes
  for them; see ``configs/mnist1d_transformer.py``.

  Example:
    >>> import jax
    >>> jax.eval_shape(lambda x: Transformer(rngs=nnx.Rngs(0))(x), jnp.ones((2, 40))).shape
    (2, 10)
  """

  def __init__(
    self,
    length=40,
    patch_size=4,
    d_model=32,
    num_heads=4,
    num_layers=2,
    mlp_dim=64,
    num_classes=10,
    *,
    rngs: nnx.Rngs,
  ):
    if length % patch_size:
      divisors = [d for d in range(1, length + 1) if length % d == 0]
      raise ValueError(
        f"patch_size={patch_size}: must divide the input length {length}, e.g. one of {divisors}"
      )
    if d_model % num_heads:
      raise ValueError(
        f"num_heads={num_heads}: must divide d_model={d_model} (each head gets an equal share), "
        f"e.g. {max(h for h in range(1, num_heads) if d_model % h == 0)}"
      )
    self.patch_size = patch_size
    self.patch_proj = nnx.Linear(patch_size, d_model, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.pos_embedding = nnx.Param(init(rngs.params(), (length // patch_size, d_model)))

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
      return Block(d_model, num_heads, mlp_dim, rngs=rngs)

    self.blocks = stack(rngs)
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1, self.patch_size)
    x = self.patch_proj(x) + self.pos_embedding[None]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    x = forward(x, self.blocks)
    return self.head(self.norm(x).mean(axis=1))


# The models by config name (``config.model.kind``).
MODELS: dict[str, type[nnx.Module]] = {
  "cnn1d": CNN1D,
  "cnn2d": CNN2D,
  "mlp": MLP,
  "transformer": Transformer,
  "resnet1d": ResNet,
  "resnet2d": ResNet,
}
# Constructor arguments that ``make`` sets from the data (input shape, classes), not a config.
_FROM_DATA = ("self", "length", "size", "in_features", "in_channels", "num_classes", "ndim", "rngs")


def arguments(kind: str) -> dict:
  """The arguments a config may give model ``kind`` (the fields of ``config.model``), with defaults.

  Example:
    >>> arguments("mlp"), arguments("cnn1d")
    ({'hidden': (100, 100)}, {'channels': 25})
  """
  parameters = inspect.signature(MODELS[kind].__init__).parameters
  return {name: p.default for name, p in parameters.items() if name not in _FROM_DATA}


def _count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def make(kind: str, input_shape: tuple[int, ...], num_classes: int, seed: int, **kwargs):
  """Builds model ``kind`` (cnn1d, cnn2d, mlp, transformer, resnet1d, resnet2d) for ``input_shape``.

  ``kwargs`` are the model's :func:`arguments`. Every size is checked first: a
  ``ValueError`` names the argument, what it must be and an example.

  Example:
    >>> model = make("mlp", (40,), 10, seed=0, hidden=(8,))
    >>> model.head.kernel.shape
    (8, 10)
    >>> make("cnn1d", (40,), 10, seed=0, channels=0)
    Traceback (most recent call last):
    ...
    ValueError: channels=0: must be an integer >= 1, e.g. 25
  """
  if kind not in MODELS:
    raise ValueError(f"unknown model {kind!r}; expected one of {', '.join(MODELS)}")
  defaults = arguments(kind)
  for name, value in kwargs.items():
    default = defaults.get(name)
    if isinstance(default, int) and not _count(value):
      raise ValueError(f"{name}={value!r}: must be an integer >= 1, e.g. {default!r}")
    if isinstance(default, tuple) and not (
      isinstance(value, (tuple, list)) and all(_count(v) for v in value)
    ):
      raise ValueError(f"{name}={value!r}: must be a tuple of integers >= 1, e.g. {default!r}")
  rngs = nnx.Rngs(seed)
  if kind == "cnn1d":
    return CNN1D(input_shape[0], num_classes=num_classes, rngs=rngs, **kwargs)
  if kind == "cnn2d":
    return CNN2D(input_shape[0], num_classes=num_classes, rngs=rngs, **kwargs)
  if kind == "transformer":
    return Transformer(input_shape[0], num_classes=num_classes, rngs=rngs, **kwargs)
  if kind == "mlp":
    return MLP(math.prod(input_shape), num_classes=num_classes, rngs=rngs, **kwargs)
  ndim = 1 if kind == "resnet1d" else 2
  channels_in = 1 if len(input_shape) == ndim else input_shape[-1]
  return ResNet(channels_in, num_classes=num_classes, ndim=ndim, rngs=rngs, **kwargs)
