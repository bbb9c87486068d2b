"""The benchmark's parameter pytrees, in Flax layout, as shapes.

The update and memory parts run on a ResNet-50-shaped and a Transformer-shaped
pytree, or on pytrees of kernels of one shape (``--pytrees 2304x256``); the
compile part runs on a pytree of many small leaves, with the rules
``optax_gc.rules_for`` derives from a linen model of the same parameters. Only
shapes are built here, so that a 100M-parameter pytree costs nothing until a
part draws its values with :func:`materialize`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NAMED = ("resnet50", "transformer")
# nn.scan stacks the MLP kernels as (layers, in, out): average over `in` only.
# The preset's attention entries already use negative axes, so they need no rule.
TRANSFORMER_RULES = ((r"layers/mlp/[^/]+/kernel$", (-2,)),)
_KERNEL_SHAPE = re.compile(r"[1-9]\d*(x[1-9]\d*)+")


def sds(*shape: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
  """A ``jax.ShapeDtypeStruct`` of ``shape``, float32 unless ``dtype`` says otherwise.

  The pytrees are built of these, so that planning and compiling a 100M-parameter
  step allocates nothing.
  """
  return jax.ShapeDtypeStruct(shape, dtype)


def resnet50_shapes(scale: float = 1.0, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> dict:
  """ResNet-50 in Flax layout: 161 leaves, 25.6M parameters at ``scale=1``.

  ``scale`` multiplies the parameter count (every width by its square root);
  ``blocks`` is the number of bottleneck blocks in each of the four stages.

  Example:
    >>> shapes = resnet50_shapes()
    >>> count(shapes), shapes["params"]["layer4"]["block0"]["conv2"]["kernel"].shape
    ((161, 25557032), (3, 3, 512, 512))
  """
  f = math.sqrt(scale)

  def w(n: int) -> int:
    return max(1, round(n * f))

  def conv_bn(k: int, cin: int, cout: int) -> tuple[dict, dict]:
    return {"kernel": sds(k, k, cin, cout)}, {"scale": sds(cout), "bias": sds(cout)}

  params: dict[str, Any] = {}
  params["conv1"], params["bn1"] = conv_bn(7, 3, w(64))
  cin = w(64)
  for stage, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), 1):
    layer = {}
    for b in range(n_blocks):
      mid, out = w(width), w(4 * width)
      block: dict[str, Any] = {}
      block["conv1"], block["bn1"] = conv_bn(1, cin, mid)
      block["conv2"], block["bn2"] = conv_bn(3, mid, mid)
      block["conv3"], block["bn3"] = conv_bn(1, mid, out)
      if b == 0:
        block["downsample_conv"], block["downsample_bn"] = conv_bn(1, cin, out)
      layer[f"block{b}"] = block
      cin = out
    if layer:
      params[f"layer{stage}"] = layer
  params["fc"] = {"kernel": sds(cin, w(1000)), "bias": sds(w(1000))}
  return {"params": params}


def transformer_shapes(scale: float = 1.0, layers: int = 12) -> dict:
  """A decoder stacked by ``nn.scan``: 19 leaves, 100M parameters at ``scale=1``.

  Embedding (20000, 768) tied to the output; each of ``layers`` layers has
  attention q/k/v kernels (768, 12, 64), an output kernel (12, 64, 768), an
  MLP 768 -> 3072 -> 768 and two LayerNorms, stacked along a leading axis, so
  that most of the parameters sit in a few large leaves.
  ``scale`` multiplies the parameter count (every width by its square root).

  Example:
    >>> count(transformer_shapes())
    (19, 100416000)
  """
  f = math.sqrt(scale)
  d, mlp, vocab = (max(1, round(n * f)) for n in (768, 3072, 20000))
  heads, hd = (max(1, round(n * math.sqrt(f))) for n in (12, 64))
  L = layers
  attention = {
    name: {"kernel": sds(L, d, heads, hd), "bias": sds(L, heads, hd)}
    for name in ("query", "key", "value")
  }
  attention["out"] = {"kernel": sds(L, heads, hd, d), "bias": sds(L, d)}
  stack = {
    "ln1": {"scale": sds(L, d), "bias": sds(L, d)},
    "attention": attention,
    "ln2": {"scale": sds(L, d), "bias": sds(L, d)},
    "mlp": {
      "Dense_0": {"kernel": sds(L, d, mlp), "bias": sds(L, mlp)},
      "Dense_1": {"kernel": sds(L, mlp, d), "bias": sds(L, d)},
    },
  }
  return {
    "params": {
      "embed": {"embedding": sds(vocab, d)},
      "layers": stack,
      "final_ln": {"scale": sds(d), "bias": sds(d)},
    }
  }


def uniform_shapes(shape: tuple[int, ...], params: int) -> dict:
  """Kernels ``layer{i}/kernel``, all of one ``shape``, about ``params`` parameters in all.

  These show how GC's cost depends on the size of a leaf, apart from the mix
  of sizes a real model has.

  Example:
    >>> count(uniform_shapes((2304, 256), 25_600_000))
    (43, 25362432)
  """
  n = max(1, round(params / math.prod(shape)))
  return {"params": {f"layer{i}": {"kernel": sds(*shape)} for i in range(n)}}


def many_leaves_shapes(leaves: int = 2000) -> dict:
  """``leaves // 5`` blocks of a conv kernel, a norm's scale and bias, a Dense kernel and bias.

  Example:
    >>> count(many_leaves_shapes(10))
    (10, 12992)
  """
  block = {
    "conv": {"kernel": sds(3, 3, 16, 16)},
    "norm": {"scale": sds(16), "bias": sds(16)},
    "dense": {"kernel": sds(64, 64), "bias": sds(64)},
  }
  return {"params": {f"block{i}": block for i in range(max(1, leaves // 5))}}


def many_leaves_model(leaves: int = 2000) -> tuple[Any, tuple]:
  """A linen model whose parameters are ``many_leaves_shapes``'s, and its example inputs.

  Needs flax.
  """
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, y):
      x = nn.LayerNorm(name="norm")(nn.Conv(16, (3, 3), use_bias=False, name="conv")(x))
      return x, nn.Dense(64, name="dense")(y)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, y):
      for i in range(max(1, leaves // 5)):
        x, y = Block(name=f"block{i}")(x, y)
      return x, y

  return Model(), (sds(2, 4, 4, 16), sds(2, 64))


def many_leaves_rules(leaves: int = 2000) -> Any:
  """``optax_gc.rules_for`` of ``many_leaves_model``: the rules for ``many_leaves_shapes``.

  The rules are derived from an abstract trace of the model, so a 10,000-leaf
  model costs no parameter memory. Needs flax.
  """
  import optax_gc

  model, inputs = many_leaves_model(leaves)
  return optax_gc.rules_for(model, *inputs)


def kernel_shape(name: str) -> tuple[int, ...] | None:
  """The shape a ``--pytrees`` entry such as ``2304x256`` names; None if it names none.

  Example:
    >>> kernel_shape("3x3x512x512"), kernel_shape("resnet50"), kernel_shape("0x4")
    ((3, 3, 512, 512), None, None)
  """
  if not _KERNEL_SHAPE.fullmatch(name):
    return None
  return tuple(int(n) for n in name.split("x"))


def build(
  name: str,
  *,
  scale: float = 1.0,
  resnet_blocks: tuple[int, ...] = (3, 4, 6, 3),
  layers: int = 12,
  dtype: Any = jnp.float32,
) -> tuple[dict, tuple]:
  """The pytree ``name`` (``resnet50``, ``transformer`` or a kernel shape) and its GC rules.

  A kernel shape such as ``2304x256`` gives as many kernels of that shape as
  make up the ResNet-50 pytree's parameter count at the same ``scale`` and
  ``resnet_blocks``. Every leaf gets ``dtype``.

  Example:
    >>> shapes, rules = build("transformer", scale=0.01, layers=2, dtype="bfloat16")
    >>> count(shapes)[0], jax.tree.leaves(shapes)[0].dtype, rules == TRANSFORMER_RULES
    (19, dtype(bfloat16), True)
  """
  if name == "resnet50":
    shapes, rules = resnet50_shapes(scale, resnet_blocks), ()
  elif name == "transformer":
    shapes, rules = transformer_shapes(scale, layers), TRANSFORMER_RULES
  elif (shape := kernel_shape(name)) is not None:
    shapes, rules = uniform_shapes(shape, count(resnet50_shapes(scale, resnet_blocks))[1]), ()
  else:
    raise ValueError(
      f"Unknown pytree {name!r}: give one of {', '.join(NAMED)} or a kernel shape such as 2304x256."
    )
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: sds(*x.shape, dtype=dtype), shapes), rules


def count(tree: Any) -> tuple[int, int]:
  """The number of leaves of ``tree`` and of the elements in them.

  Works on arrays and on shapes alike; the report gives both for every pytree.
  """
  leaves = jax.tree.leaves(tree)
  return len(leaves), sum(math.prod(x.shape) for x in leaves)


def nbytes(tree: Any) -> int:
  """The bytes the leaves of ``tree`` (arrays or shapes) take.

  Example:
    >>> nbytes({"a": sds(4, 3), "b": sds(3, dtype="bfloat16")})
    54
  """
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def materialize(shapes: Any, seed: int, std: float) -> Any:
  """Normal arrays of the given shapes and dtypes, times ``std``.

  The values are drawn by NumPy: drawing them with jax would compile one
  program per shape, which at tiny sizes takes longer than the benchmark.
  """
  rng = np.random.default_rng(seed)

  def draw(x):
    return jnp.asarray(std * rng.standard_normal(x.shape, np.float32), x.dtype)

  return jax.tree.map(draw, shapes)
