"""A zoo of small models shaped like real ones, each with its fan-in table written by hand.

Every table entry comes from the model code below and the layer's own
definition in Flax or Equinox (cited where the layout is not the plain
``(in, out)``), never from optax_gc. ``expected`` maps each leaf's path, as
``helpers.flat`` spells it relative to the params tree, to the axes of that
leaf's fan-in (the kernel axes contracted with the layer's input for one output
unit), or None where Gradient Centralization must leave the leaf alone.

Nothing here imports optax_gc except :func:`summary`; ``python tests/zoo.py``
prints how the presets and ``rules_for`` do on the zoo.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import flat

KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One model of the zoo.

  ``build`` returns ``(model, args, kwargs)``: what ``rules_for`` is given after
  the model (linen: example inputs and init kwargs; nnx, Equinox: nothing).
  ``rngs`` builds linen's init rngs where a plain params key is not enough.
  """

  name: str
  framework: str  # "linen" | "nnx" | "equinox" | "haiku"
  build: Callable[[], tuple[Any, tuple, dict]]
  expected: dict[str, tuple[int, ...] | None]
  preset: str = "flax"
  rngs: Callable[[], Any] | None = None
  numeric: bool = False  # also checked by applying centralize to random gradients

  @functools.cached_property
  def built(self):
    return self.build()

  @property
  def model(self):
    return self.built[0]

  @property
  def args(self):
    return self.built[1]

  @property
  def kwargs(self):
    return self.built[2]

  def init_rngs(self):
    return self.rngs() if self.rngs is not None else KEY

  @functools.cached_property
  def variables(self):
    """linen: every collection, as ShapeDtypeStructs; Haiku: the params."""
    model, args, kwargs = self.built
    if self.framework == "linen":
      return jax.eval_shape(lambda r: model.init(r, *args, **kwargs), self.init_rngs())
    if self.framework == "haiku":
      return jax.eval_shape(model.init, KEY, *args)
    raise ValueError(f"{self.name}: only linen and Haiku have a variables dict")

  def params(self):
    """The tree the optimizer sees, whose ``flat`` paths are the keys of ``expected``."""
    if self.framework == "linen":
      return self.variables["params"]
    if self.framework == "haiku":
      return self.variables
    if self.framework == "nnx":
      return nnx.state(self.model, nnx.Param)
    return eqx.filter(self.model, eqx.is_inexact_array)

  def expected_variables(self):
    """linen: the table for the whole variables dict; other collections stay unchanged."""
    others = {p: None for p in flat(self.variables) if not p.startswith("params/")}
    return {f"params/{p}": axes for p, axes in self.expected.items()} | others


def normalise(axes, shape):
  """A fan-in of one element becomes None: GC would zero the gradient, so it is skipped."""
  if axes is None or math.prod(shape[a] for a in axes) == 1:
    return None
  return tuple(axes)


# ------------------------------------------------------------------ linen ---
# linen.Dense kernel (in, out) and linen.Conv kernel (*k, in // groups, out):
# flax/linen/linear.py, Dense.__call__ "(jnp.shape(inputs)[-1], self.features)"
# and _Conv.__call__ "kernel_size + (in_features // self.feature_group_count,
# self.features)". DenseGeneral: "batch_shape + kernel_shape" with kernel_shape
# "tuple(inputs.shape[ax] for ax in axis) + features". Attention q/k/v are
# DenseGeneral(features=(num_heads, head_dim), axis=-1), out is
# DenseGeneral(features, axis=(-2, -1)) (flax/linen/attention.py).


class ResBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="proj")(x)
      x = norm(name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (7, 7), 2, use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = ResBlock(6, name="block_0")(x, train)
    x = ResBlock(10, 2, name="block_1")(x, train)
    return nn.Dense(5, name="head")(x.mean((1, 2)))


def _bn(prefix):
  return {f"{prefix}/scale": None, f"{prefix}/bias": None}


RESNET_BN = {
  "stem/kernel": (0, 1, 2),  # (7, 7, 3, 6)
  **_bn("stem_bn"),
  "block_0/Conv_0/kernel": (0, 1, 2),  # (3, 3, 6, 6)
  **_bn("block_0/BatchNorm_0"),
  "block_0/Conv_1/kernel": (0, 1, 2),  # (3, 3, 6, 6)
  **_bn("block_0/BatchNorm_1"),
  "block_1/Conv_0/kernel": (0, 1, 2),  # (3, 3, 6, 10)
  **_bn("block_1/BatchNorm_0"),
  "block_1/Conv_1/kernel": (0, 1, 2),  # (3, 3, 10, 10)
  **_bn("block_1/BatchNorm_1"),
  "block_1/proj/kernel": (0, 1, 2),  # (1, 1, 6, 10): the 1x1 shortcut still has 6 inputs
  **_bn("block_1/proj_bn"),
  "head/kernel": (0,),  # (10, 5)
  "head/bias": None,
}


class LocalBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = nn.relu(nn.ConvLocal(c, (3, 3))(x))
    return nn.relu(x + nn.ConvLocal(c, (2, 2))(y))


class LocalResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.ConvLocal(3, (3, 3), padding="VALID", name="stem")(x))
    x = LocalBlock()(x)
    return nn.Dense(6)(x.mean((1, 2)))


# ConvLocal: one unshared kernel per output pixel, "conv_output_shape[1:-1] +
# (np.prod(kernel_size) * in_features, self.features)", and a bias per output
# entry, "conv_output_shape[1:]" (flax/linen/linear.py, _Conv.__call__): each
# neuron is (pixel, feature) and its fan-in is axis -2 alone.
CONV_LOCAL = {
  "stem/kernel": (2,),  # (5, 5, 3*3*2, 3)
  "stem/bias": None,  # (5, 5, 3)
  "LocalBlock_0/ConvLocal_0/kernel": (2,),  # (5, 5, 3*3*3, 3)
  "LocalBlock_0/ConvLocal_0/bias": None,
  "LocalBlock_0/ConvLocal_1/kernel": (2,),  # (5, 5, 2*2*3, 3)
  "LocalBlock_0/ConvLocal_1/bias": None,
  "Dense_0/kernel": (0,),  # (3, 6)
  "Dense_0/bias": None,
}


class VitBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(y)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(nn.LayerNorm(name="ln_2")(x)))
    return x + nn.Dense(x.shape[-1], name="fc2")(y)


class ViT(nn.Module):
  """Patches, a mask token, a cls token, register tokens and a learned position table."""

  mask_kind: int = 0

  @nn.compact
  def __call__(self, img, mask):
    d, init = 12, nn.initializers.normal(0.02)
    x = nn.Conv(d, (4, 3), (4, 3), padding="VALID", name="embedding")(img)
    # One learned token per masking scheme, broadcast over (h, w) of the patch grid.
    mask_token = self.param("mask_token", init, (2, 1, 1, d))
    x = jnp.where(mask[..., None], mask_token[self.mask_kind], x)
    x = x.reshape(x.shape[0], -1, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    registers = self.param("registers", init, (1, 2, d))
    b = x.shape[0]
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), jnp.tile(registers, (b, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", init, (1, x.shape[1], d))
    for i in range(2):
      x = VitBlock(20, 3, name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(9, name="head")(x[:, 0])


def _vit_block(p):
  return {
    f"{p}/ln_1/scale": None,
    f"{p}/ln_1/bias": None,
    f"{p}/attn/query/kernel": (0,),  # (12, 3, 4): (embed, heads, head_dim)
    f"{p}/attn/query/bias": None,  # (3, 4)
    f"{p}/attn/key/kernel": (0,),
    f"{p}/attn/key/bias": None,
    f"{p}/attn/value/kernel": (0,),
    f"{p}/attn/value/bias": None,
    f"{p}/attn/out/kernel": (0, 1),  # (3, 4, 12): (heads, head_dim, embed)
    f"{p}/attn/out/bias": None,
    f"{p}/ln_2/scale": None,
    f"{p}/ln_2/bias": None,
    f"{p}/fc1/kernel": (0,),  # (12, 20)
    f"{p}/fc1/bias": None,
    f"{p}/fc2/kernel": (0,),  # (20, 12)
    f"{p}/fc2/bias": None,
  }


VIT = {
  "embedding/kernel": (0, 1, 2),  # (4, 3, 5, 12): patch conv
  "embedding/bias": None,
  "mask_token": None,  # (2, 1, 1, 12): a token table, not a conv kernel
  "cls": None,  # (1, 1, 12)
  "registers": None,  # (1, 2, 12)
  "pos_embedding": None,  # (1, 7, 12)
  **_vit_block("encoderblock_0"),
  **_vit_block("encoderblock_1"),
  "encoder_norm/scale": None,
  "encoder_norm/bias": None,
  "head/kernel": (0,),  # (12, 9)
  "head/bias": None,
}


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(x)))


class MixerBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
    x = x + jnp.swapaxes(MlpBlock(14, name="token_mixing")(y), 1, 2)
    return x + MlpBlock(16, name="channel_mixing")(nn.LayerNorm()(x))


class Mixer(nn.Module):
  @nn.compact
  def __call__(self, img):
    x = nn.Conv(10, (4, 4), 4, name="stem")(img)
    x = x.reshape(x.shape[0], -1, 10)
    for i in range(2):
      x = MixerBlock(name=f"MixerBlock_{i}")(x)
    x = nn.LayerNorm(name="pre_head_layer_norm")(x)
    return nn.Dense(5, name="head")(x.mean(1))


def _mixer_block(p):
  return {
    f"{p}/LayerNorm_0/scale": None,
    f"{p}/LayerNorm_0/bias": None,
    f"{p}/token_mixing/Dense_0/kernel": (0,),  # (6, 14): the 6 tokens are the input
    f"{p}/token_mixing/Dense_0/bias": None,
    f"{p}/token_mixing/Dense_1/kernel": (0,),  # (14, 6)
    f"{p}/token_mixing/Dense_1/bias": None,
    f"{p}/LayerNorm_1/scale": None,
    f"{p}/LayerNorm_1/bias": None,
    f"{p}/channel_mixing/Dense_0/kernel": (0,),  # (10, 16)
    f"{p}/channel_mixing/Dense_0/bias": None,
    f"{p}/channel_mixing/Dense_1/kernel": (0,),  # (16, 10)
    f"{p}/channel_mixing/Dense_1/bias": None,
  }


MIXER = {
  "stem/kernel": (0, 1, 2),  # (4, 4, 3, 10)
  "stem/bias": None,
  **_mixer_block("MixerBlock_0"),
  **_mixer_block("MixerBlock_1"),
  "pre_head_layer_norm/scale": None,
  "pre_head_layer_norm/bias": None,
  "head/kernel": (0,),
  "head/bias": None,
}


class ConvNeXtBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = nn.Conv(c, (7, 7), padding=3, feature_group_count=c, name="dwconv")(x)
    y = nn.Dense(4 * c, name="pwconv1")(nn.LayerNorm(epsilon=1e-6, name="norm")(y))
    y = nn.Dense(c, name="pwconv2")(nn.gelu(y))
    gamma = self.param("gamma", nn.initializers.constant(1e-6), (c,))
    return x + gamma * y


class ConvNeXt(nn.Module):
  @nn.compact
  def __call__(self, img):
    x = nn.LayerNorm(name="stem_norm")(nn.Conv(8, (2, 2), 2, name="stem")(img))
    for i in range(2):
      x = ConvNeXtBlock(name=f"block_{i}")(x)
    return nn.Dense(5, name="head")(nn.LayerNorm(name="head_norm")(x.mean((1, 2))))


def _convnext_block(p):
  return {
    f"{p}/dwconv/kernel": (0, 1, 2),  # (7, 7, 1, 8): depthwise, 49 inputs per channel
    f"{p}/dwconv/bias": None,
    f"{p}/norm/scale": None,
    f"{p}/norm/bias": None,
    f"{p}/pwconv1/kernel": (0,),  # (8, 32)
    f"{p}/pwconv1/bias": None,
    f"{p}/pwconv2/kernel": (0,),  # (32, 8)
    f"{p}/pwconv2/bias": None,
    f"{p}/gamma": None,  # layer scale
  }


CONVNEXT = {
  "stem/kernel": (0, 1, 2),  # (2, 2, 3, 8)
  "stem/bias": None,
  "stem_norm/scale": None,
  "stem_norm/bias": None,
  **_convnext_block("block_0"),
  **_convnext_block("block_1"),
  "head_norm/scale": None,
  "head_norm/bias": None,
  "head/kernel": (0,),
  "head/bias": None,
}


class RelativePositionBiases(nn.Module):
  num_buckets: int
  num_heads: int

  @nn.compact
  def __call__(self, q_len, k_len):
    table = self.param(
      "rel_embedding", nn.initializers.normal(0.1), (self.num_heads, self.num_buckets)
    )
    rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
    half = self.num_buckets // 2
    return table[:, jnp.clip(rel, -half, half - 1) + half][None]  # (1, heads, q, k)


class T5Attention(nn.Module):
  num_heads: int = 2
  head_dim: int = 5

  @nn.compact
  def __call__(self, x_q, x_kv, bias):
    proj = functools.partial(
      nn.DenseGeneral, features=(self.num_heads, self.head_dim), axis=-1, use_bias=False
    )
    q, k, v = proj(name="q")(x_q), proj(name="k")(x_kv), proj(name="v")(x_kv)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(x_q.shape[-1], axis=(-2, -1), use_bias=False, name="o")(out)


class T5Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(14, use_bias=False, name="wi")(x))
    return nn.Dense(x.shape[-1], use_bias=False, name="wo")(h)


class T5EncoderLayer(nn.Module):
  @nn.compact
  def __call__(self, x, bias):
    h = nn.RMSNorm(name="pre_attention_layer_norm")(x)
    x = x + T5Attention(name="attention")(h, h, bias)
    return x + T5Mlp(name="mlp")(nn.RMSNorm(name="pre_mlp_layer_norm")(x))


class T5DecoderLayer(nn.Module):
  @nn.compact
  def __call__(self, y, enc, bias):
    h = nn.RMSNorm(name="pre_self_attention_layer_norm")(y)
    y = y + T5Attention(name="self_attention")(h, h, bias)
    h = nn.RMSNorm(name="pre_cross_attention_layer_norm")(y)
    y = y + T5Attention(name="encoder_decoder_attention")(h, enc, 0.0)
    return y + T5Mlp(name="mlp")(nn.RMSNorm(name="pre_mlp_layer_norm")(y))


class T5Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    t = x.shape[1]
    bias = RelativePositionBiases(6, 2, name="relpos_bias")(t, t)
    for i in range(2):
      x = T5EncoderLayer(name=f"layers_{i}")(x, bias)
    return nn.RMSNorm(name="encoder_norm")(x)


class T5Decoder(nn.Module):
  @nn.compact
  def __call__(self, y, enc):
    s = y.shape[1]
    causal = jnp.where(jnp.tril(jnp.ones((s, s), bool)), 0.0, -1e9)
    bias = RelativePositionBiases(6, 2, name="relpos_bias")(s, s) + causal
    y = T5DecoderLayer(name="layers_0")(y, enc, bias)
    return nn.RMSNorm(name="decoder_norm")(y)


class T5(nn.Module):
  """Encoder-decoder: shared token table, relative position biases, cross-attention."""

  @nn.compact
  def __call__(self, enc_tokens, dec_tokens):
    embed = nn.Embed(11, 12, name="token_embedder")
    enc = T5Encoder(name="encoder")(embed(enc_tokens))
    return embed.attend(T5Decoder(name="decoder")(embed(dec_tokens), enc))


def _t5_attention(p):
  return {
    f"{p}/q/kernel": (0,),  # DenseGeneral (12, 2, 5): (embed, heads, head_dim)
    f"{p}/k/kernel": (0,),
    f"{p}/v/kernel": (0,),
    f"{p}/o/kernel": (0, 1),  # DenseGeneral axis=(-2, -1): (2, 5, 12)
  }


def _t5_mlp(p):
  return {f"{p}/wi/kernel": (0,), f"{p}/wo/kernel": (0,)}  # (12, 14), (14, 12)


def _t5():
  table = {
    "token_embedder/embedding": None,  # (11, 12), shared with the output
    "encoder/relpos_bias/rel_embedding": None,  # (heads 2, buckets 6): a lookup table
    "encoder/encoder_norm/scale": None,
    "decoder/relpos_bias/rel_embedding": None,
    "decoder/decoder_norm/scale": None,
  }
  for i in range(2):
    p = f"encoder/layers_{i}"
    table |= {f"{p}/pre_attention_layer_norm/scale": None, f"{p}/pre_mlp_layer_norm/scale": None}
    table |= _t5_attention(f"{p}/attention") | _t5_mlp(f"{p}/mlp")
  p = "decoder/layers_0"
  for norm in ("pre_self_attention", "pre_cross_attention", "pre_mlp"):
    table[f"{p}/{norm}_layer_norm/scale"] = None
  table |= _t5_attention(f"{p}/self_attention")
  table |= _t5_attention(f"{p}/encoder_decoder_attention")
  return table | _t5_mlp(f"{p}/mlp")


class GPTBlock(nn.Module):
  use_bias: bool

  @nn.compact
  def __call__(self, x, _):
    b = self.use_bias
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm(use_bias=b, name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, use_bias=b, name="attn")(h, mask=mask)
    h = nn.gelu(nn.Dense(16, use_bias=b, name="c_fc")(nn.LayerNorm(use_bias=b, name="ln_2")(x)))
    return x + nn.Dense(x.shape[-1], use_bias=b, name="c_proj")(h), None


class GPT(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(13, 10, name="wte")(tokens)
    x = x + nn.Embed(8, 10, name="wpe")(jnp.arange(tokens.shape[1]))
    stack = nn.scan(GPTBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = stack(self.use_bias, name="h")(x, None)
    x = nn.LayerNorm(use_bias=self.use_bias, name="ln_f")(x)
    return nn.Dense(13, use_bias=False, name="lm_head")(x)


def _gpt(use_bias):
  # nn.scan with variable_axes={"params": 0} puts the 3 layers first on every
  # leaf of "h": the per-layer fan-in moves one axis right.
  table = {
    "wte/embedding": None,
    "wpe/embedding": None,
    "h/ln_1/scale": None,  # (3, 10)
    "h/attn/query/kernel": (1,),  # (3, 10, 2, 5)
    "h/attn/key/kernel": (1,),
    "h/attn/value/kernel": (1,),
    "h/attn/out/kernel": (1, 2),  # (3, 2, 5, 10)
    "h/ln_2/scale": None,
    "h/c_fc/kernel": (1,),  # (3, 10, 16)
    "h/c_proj/kernel": (1,),  # (3, 16, 10)
    "ln_f/scale": None,
    "lm_head/kernel": (0,),  # (10, 13)
  }
  if use_bias:
    for p in ("ln_1", "attn/query", "attn/key", "attn/value", "attn/out", "ln_2"):
      table[f"h/{p}/bias"] = None  # (3, 10) or, for q/k/v, (3, 2, 5)
    table |= {"h/c_fc/bias": None, "h/c_proj/bias": None, "ln_f/bias": None}
  return table


class Wav2Vec(nn.Module):
  """wav2vec 2.0's front end: strided 1-D convs, GroupNorm, projection, grouped pos conv."""

  @nn.compact
  def __call__(self, wav):
    x = nn.Conv(6, (5,), 3, padding="VALID", use_bias=False, name="conv_0")(wav)
    x = nn.gelu(nn.GroupNorm(num_groups=6, name="norm_0")(x))
    x = nn.gelu(nn.Conv(8, (3,), 2, padding="VALID", use_bias=False, name="conv_1")(x))
    x = nn.gelu(nn.Conv(9, (2,), 2, padding="VALID", use_bias=False, name="conv_2")(x))
    x = nn.Dense(10, name="projection")(nn.LayerNorm(name="projection_norm")(x))
    return x + nn.gelu(nn.Conv(10, (4,), feature_group_count=2, name="pos_conv")(x))


WAV2VEC = {
  "conv_0/kernel": (0, 1),  # (5, 1, 6): mono input, 5 taps
  "norm_0/scale": None,
  "norm_0/bias": None,
  "conv_1/kernel": (0, 1),  # (3, 6, 8)
  "conv_2/kernel": (0, 1),  # (2, 8, 9)
  "projection_norm/scale": None,
  "projection_norm/bias": None,
  "projection/kernel": (0,),  # (9, 10)
  "projection/bias": None,
  "pos_conv/kernel": (0, 1),  # (4, 10 / 2 groups, 10)
  "pos_conv/bias": None,
}


class MambaMixer(nn.Module):
  d_inner: int = 12
  d_state: int = 4
  d_conv: int = 3
  dt_rank: int = 2

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    di, ds = self.d_inner, self.d_state
    x, z = jnp.split(nn.Dense(2 * di, use_bias=False, name="in_proj")(x), 2, axis=-1)
    x = nn.Conv(
      di, (self.d_conv,), padding=((self.d_conv - 1, 0),), feature_group_count=di, name="conv1d"
    )(x)
    x = nn.silu(x)
    dbc = nn.Dense(self.dt_rank + 2 * ds, use_bias=False, name="x_proj")(x)
    dt, bmat, cmat = jnp.split(dbc, [self.dt_rank, self.dt_rank + ds], axis=-1)
    dt = nn.softplus(nn.Dense(di, name="dt_proj")(dt))
    a_log = self.param(
      "A_log",
      lambda _, shape: jnp.log(jnp.broadcast_to(jnp.arange(1.0, shape[1] + 1), shape)),
      (di, ds),
    )
    d_skip = self.param("D", nn.initializers.ones, (di,))
    decay = jnp.exp(dt[..., None] * -jnp.exp(a_log))  # (B, T, d_inner, d_state)
    drive = dt[..., None] * bmat[:, :, None, :] * x[..., None]

    def step(h, inputs):
      decay_t, drive_t, c_t = inputs
      h = decay_t * h + drive_t
      return h, jnp.einsum("bis,bs->bi", h, c_t)

    seq = (decay.swapaxes(0, 1), drive.swapaxes(0, 1), cmat.swapaxes(0, 1))
    _, y = jax.lax.scan(step, jnp.zeros((b, di, ds)), seq)
    y = y.swapaxes(0, 1) + x * d_skip
    return nn.Dense(d, use_bias=False, name="out_proj")(y * nn.silu(z))


class MambaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + MambaMixer(name="mixer")(nn.RMSNorm(name="norm")(x))


MAMBA = {
  "norm/scale": None,
  "mixer/in_proj/kernel": (0,),  # (6, 24)
  "mixer/conv1d/kernel": (0, 1),  # (3, 1, 12): depthwise, groups = 12 channels
  "mixer/conv1d/bias": None,
  "mixer/x_proj/kernel": (0,),  # (12, 10)
  "mixer/dt_proj/kernel": (0,),  # (2, 12)
  "mixer/dt_proj/bias": None,
  "mixer/A_log": None,  # (12, 4): the SSM's state matrix, no layer contracts it
  "mixer/D": None,
  "mixer/out_proj/kernel": (0,),  # (12, 6)
}


class ChannelsFirstPos(nn.Module):
  """Ported from PyTorch: inputs and the position table are (N, C, H, W)."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, *x.shape[1:]))
    x = jnp.transpose(x + pos, (0, 2, 3, 1))
    x = nn.relu(nn.Conv(5, (3, 3), name="conv")(x))
    return nn.Dense(7, name="head")(x.mean((1, 2)))


CHANNELS_FIRST_POS = {
  "pos_embed": None,  # (1, 4, 8, 6): a table added to the input, not a kernel
  "conv/kernel": (0, 1, 2),  # (3, 3, 4, 5)
  "conv/bias": None,
  "head/kernel": (0,),
  "head/bias": None,
}


class LinenMisc(nn.Module):
  @nn.compact
  def __call__(self, img, seq, members, vol, t):
    up = nn.ConvTranspose(6, (3, 3), strides=(2, 2), name="up")(img)
    up_t = nn.ConvTranspose(7, (2, 2), strides=(2, 2), transpose_kernel=True, name="up_t")(up)
    grouped = nn.Conv(10, (3, 3), feature_group_count=2, name="grouped")(img)
    heads = nn.DenseGeneral(7, axis=(-2, -1), name="heads")(seq)
    per_member = nn.DenseGeneral(6, batch_dims=(0,), name="per_member")(members)
    vol = nn.Conv(9, (2, 3, 4), name="conv3d")(vol)
    t = nn.Dense(4, name="from_scalar")(t)
    return up_t.mean() + grouped.mean() + heads.mean() + per_member.mean() + vol.mean() + t.mean()


LINEN_MISC = {
  # ConvTranspose: "kernel_size + (in_features, self.features)" by default.
  "up/kernel": (0, 1, 2),  # (3, 3, 4, 6)
  "up/bias": None,
  # transpose_kernel=True: "kernel_size + (self.features, in_features)", the
  # kernel of the forward conv this op transposes; output units run along
  # axis -2, so the fan-in is the spatial axes and the last.
  "up_t/kernel": (0, 1, 3),  # (2, 2, 7, 6)
  "up_t/bias": None,
  "grouped/kernel": (0, 1, 2),  # (3, 3, 4 / 2 groups, 10)
  "grouped/bias": None,
  "heads/kernel": (0, 1),  # (4, 5, 7): axis=(-2, -1) of a (2, 3, 4, 5) input
  "heads/bias": None,
  "per_member/kernel": (1,),  # (3, 5, 6): batch_dims=(0,) keeps one kernel per member
  "per_member/bias": None,  # (3, 6)
  "conv3d/kernel": (0, 1, 2, 3),  # (2, 3, 4, 5, 9)
  "conv3d/bias": None,
  "from_scalar/kernel": (0,),  # (1, 4): a fan-in of one, which GC skips
  "from_scalar/bias": None,
}


class EqualBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.LayerNorm()(nn.relu(nn.Dense(8)(x))), None


class EqualStack(nn.Module):
  """8 layers of 8 features: the stack axis has the size of every other axis."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(EqualBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=8)
    x, _ = stack(name="stack")(x, None)
    return nn.Dense(3, name="readout")(x)


STACK_EQUAL_LINEN = {
  "stack/Dense_0/kernel": (1,),  # (8 layers, 8 in, 8 out)
  "stack/Dense_0/bias": None,
  "stack/LayerNorm_0/scale": None,
  "stack/LayerNorm_0/bias": None,
  "readout/kernel": (0,),
  "readout/bias": None,
}


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(6, name="fc1")(x))
    h = h + nn.MultiHeadDotProductAttention(
      num_heads=2, dropout_rate=0.1, deterministic=not train, name="attn"
    )(h)
    h = nn.Dropout(0.3, deterministic=not train)(h)
    return nn.Dense(7, name="fc2")(h)


DROPOUT = {
  "fc1/kernel": (0,),  # (5, 6)
  "fc1/bias": None,
  "attn/query/kernel": (0,),  # (6, 2, 3)
  "attn/query/bias": None,
  "attn/key/kernel": (0,),
  "attn/key/bias": None,
  "attn/value/kernel": (0,),
  "attn/value/bias": None,
  "attn/out/kernel": (0, 1),  # (2, 3, 6)
  "attn/out/bias": None,
  "fc2/kernel": (0,),  # (6, 7)
  "fc2/bias": None,
}


class Projection(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("W", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return x @ w + self.param("b", nn.initializers.zeros, (self.features,))


class BareParamNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(nn.relu(Projection(7, name="proj")(x)))


BARE_PARAM = {
  "proj/W": None,  # (5, 7): no known layer defines it, so it is left alone
  "proj/b": None,
  "head/kernel": (0,),
  "head/bias": None,
}


# ------------------------------------------------------ linen, Gemma style ---
# The einsum string is given at call time, so only the trace knows it.


class LinenEinsum(nn.Module):
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(0.1), self.shape))


class LinenRMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + scale)


def _gqa(q, k, v):
  """(B, T, N, H) queries over (B, T, K, H) keys and values, N a multiple of K."""
  b, t, n, h = q.shape
  q = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k)
  out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(logits), v)
  return out.reshape(b, t, n, h)


class LinenGemmaAttention(nn.Module):
  num_heads: int
  num_kv_heads: int
  embed_dim: int = 12
  head_dim: int = 5

  def setup(self):
    n, k, d, h = self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim
    if n == k:
      self.qkv_einsum = LinenEinsum((3, n, d, h))
    else:
      self.q_einsum = LinenEinsum((n, d, h))
      self.kv_einsum = LinenEinsum((2, k, d, h))
    self.attn_vec_einsum = LinenEinsum((n, h, d))

  def __call__(self, x):
    if self.num_heads == self.num_kv_heads:
      q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
    else:
      q = self.q_einsum("BTD,NDH->BTNH", x)
      k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    return self.attn_vec_einsum("BTNH,NHD->BTD", _gqa(q, k, v))


class LinenGemmaMlp(nn.Module):
  def setup(self):
    self.gating_einsum = LinenEinsum((2, 14, 12))
    self.linear = LinenEinsum((14, 12))

  def __call__(self, x):
    gate, up = self.gating_einsum("BTD,CFD->CBTF", x)
    return self.linear("BTF,FD->BTD", nn.gelu(gate) * up)


class LinenGemmaBlock(nn.Module):
  num_heads: int
  num_kv_heads: int

  def setup(self):
    self.pre_attention_norm = LinenRMSNorm()
    self.attn = LinenGemmaAttention(self.num_heads, self.num_kv_heads)
    self.pre_ffw_norm = LinenRMSNorm()
    self.mlp = LinenGemmaMlp()

  def __call__(self, x):
    x = x + self.attn(self.pre_attention_norm(x))
    return x + self.mlp(self.pre_ffw_norm(x))


class LinenEmbedder(nn.Module):
  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(1.0), (11, 12))

  def encode(self, tokens):
    return self.input_embedding[tokens]

  def decode(self, x):
    return x @ self.input_embedding.T


class LinenGemma(nn.Module):
  num_heads: int
  num_kv_heads: int

  def setup(self):
    self.embedder = LinenEmbedder()
    self.layers = [
      LinenGemmaBlock(self.num_heads, self.num_kv_heads, name=f"layer_{i}") for i in range(2)
    ]
    self.final_norm = LinenRMSNorm()

  def __call__(self, tokens):
    x = self.embedder.encode(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.embedder.decode(self.final_norm(x))


def _gemma_block(p, num_heads, num_kv_heads):
  if num_heads == num_kv_heads:
    attn = {f"{p}/attn/qkv_einsum/w": (2,)}  # 'BTD,SNDH->SBTNH' (3, N, 12, 5): D is axis 2
  else:
    attn = {
      f"{p}/attn/q_einsum/w": (1,),  # 'BTD,NDH->BTNH' (N, 12, 5)
      f"{p}/attn/kv_einsum/w": (2,),  # 'BSD,CKDH->CBSKH' (2, K, 12, 5)
    }
  return {
    f"{p}/pre_attention_norm/scale": None,
    **attn,
    f"{p}/attn/attn_vec_einsum/w": (0, 1),  # 'BTNH,NHD->BTD' (N, 5, 12)
    f"{p}/pre_ffw_norm/scale": None,
    f"{p}/mlp/gating_einsum/w": (2,),  # 'BTD,CFD->CBTF' (2, 14, 12): D is last
    f"{p}/mlp/linear/w": (0,),  # 'BTF,FD->BTD' (14, 12)
  }


def _gemma(prefix, num_heads, num_kv_heads, embedding):
  table = {embedding: None}  # (11, 12)
  for i in range(2):
    table |= _gemma_block(prefix.format(i), num_heads, num_kv_heads)
  return table | {"final_norm/scale": None}


# -------------------------------------------------------------------- nnx ---
# nnx.Linear kernel (in, out); nnx.LinearGeneral "(*batch_shape, *in_features,
# *out_features)"; nnx.Conv "kernel_size + (in_features // feature_group_count,
# out_features)"; nnx.ConvTranspose "kernel_size + (in_features, out_features)",
# or "(out_features, in_features)" with transpose_kernel (flax/nnx/nn/linear.py).


def _canon(x):
  return tuple(x) if isinstance(x, tuple | list) else (x,)


class MaxTextDenseGeneral(nnx.Module):
  """MaxText's linears.DenseGeneral: kernel ``in_features_shape + out_features_shape``."""

  def __init__(self, in_features_shape, out_features_shape, axis=-1, kernel_axes=(), *, rngs):
    self.in_features_shape = _canon(in_features_shape)
    self.out_features_shape = _canon(out_features_shape)
    self.axis = _canon(axis)
    shape = self.in_features_shape + self.out_features_shape
    value = nnx.initializers.normal(0.1)(rngs.params(), shape)
    # Logical axis names as MaxText gives them; eager sharding off: no mesh here.
    self.kernel = nnx.Param(value, out_sharding=kernel_axes, eager_sharding=False)

  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    contract = tuple(range(len(axis)))
    return jax.lax.dot_general(x, self.kernel[...], ((axis, contract), ((), ())))


class MaxTextRMSNorm(nnx.Module):
  def __init__(self, dim):
    self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=("norm",), eager_sharding=False)

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * self.scale[...]


class MaxTextEmbed(nnx.Module):
  def __init__(self, vocab, dim, *, rngs):
    value = nnx.initializers.normal(1.0)(rngs.params(), (vocab, dim))
    self.embedding = nnx.Param(value, out_sharding=("vocab", "embed"), eager_sharding=False)

  def __call__(self, tokens):
    return self.embedding[...][tokens]


MT = {"vocab": 11, "embed": 12, "heads": 2, "head_dim": 5, "mlp": 14, "layers": 4}


class MaxTextAttention(nnx.Module):
  def __init__(self, fused, *, rngs):
    d, n, h = MT["embed"], MT["heads"], MT["head_dim"]
    self.fused = fused
    if fused:
      self.qkv_proj = MaxTextDenseGeneral(
        d, (3, n, h), -1, ("embed", "qkv", "heads", "kv"), rngs=rngs
      )
    else:
      self.query = MaxTextDenseGeneral(d, (n, h), -1, ("embed", "q_heads", "kv"), rngs=rngs)
      self.key = MaxTextDenseGeneral(d, (n, h), -1, ("embed", "kv_heads", "kv"), rngs=rngs)
      self.value = MaxTextDenseGeneral(d, (n, h), -1, ("embed", "kv_heads", "kv"), rngs=rngs)
    self.out = MaxTextDenseGeneral((n, h), d, (-2, -1), ("heads", "kv", "embed"), rngs=rngs)

  def __call__(self, x):
    if self.fused:
      qkv = self.qkv_proj(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = self.query(x), self.key(x), self.value(x)
    return self.out(_gqa(q, k, v))


class MaxTextMlp(nnx.Module):
  def __init__(self, fused, *, rngs):
    d, m = MT["embed"], MT["mlp"]
    self.fused = fused
    if fused:
      self.wi = MaxTextDenseGeneral(d, (2, m), -1, ("embed", "num_activations", "mlp"), rngs=rngs)
    else:
      self.wi_0 = MaxTextDenseGeneral(d, m, -1, ("embed", "mlp"), rngs=rngs)
      self.wi_1 = MaxTextDenseGeneral(d, m, -1, ("embed", "mlp"), rngs=rngs)
    self.wo = MaxTextDenseGeneral(m, d, -1, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    if self.fused:
      h = self.wi(x)
      gate, up = h[:, :, 0], h[:, :, 1]
    else:
      gate, up = self.wi_0(x), self.wi_1(x)
    return self.wo(nnx.silu(gate) * up)


class MaxTextLayer(nnx.Module):
  def __init__(self, fused, *, rngs):
    self.pre_self_attention_layer_norm = MaxTextRMSNorm(MT["embed"])
    self.self_attention = MaxTextAttention(fused, rngs=rngs)
    self.post_self_attention_layer_norm = MaxTextRMSNorm(MT["embed"])
    self.mlp = MaxTextMlp(fused, rngs=rngs)

  def __call__(self, x):
    x = x + self.self_attention(self.pre_self_attention_layer_norm(x))
    return x + self.mlp(self.post_self_attention_layer_norm(x))


class MaxTextDecoder(nnx.Module):
  def __init__(self, fused, param_axis, *, rngs):
    self.param_axis = param_axis
    axes = nnx.StateAxes({nnx.Param: param_axis, ...: 0})

    @nnx.vmap(in_axes=0, out_axes=axes, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key):
      return MaxTextLayer(fused, rngs=nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), MT["layers"]))
    self.decoder_norm = MaxTextRMSNorm(MT["embed"])
    self.logits_dense = MaxTextDenseGeneral(
      MT["embed"], MT["vocab"], -1, ("embed", "vocab"), rngs=rngs
    )

  def __call__(self, x):
    axes = nnx.StateAxes({nnx.Param: self.param_axis, ...: 0})

    @nnx.scan(
      in_axes=(axes, nnx.Carry),
      out_axes=nnx.Carry,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(layer, h):
      return layer(h)

    return self.logits_dense(self.decoder_norm(run(self.layers, x)))


class MaxTextTransformer(nnx.Module):
  def __init__(self, fused=False, param_axis=1, *, rngs):
    self.token_embedder = MaxTextEmbed(MT["vocab"], MT["embed"], rngs=rngs)
    self.decoder = MaxTextDecoder(fused, param_axis, rngs=rngs)

  def __call__(self, tokens):
    return self.decoder(self.token_embedder(tokens))


def _maxtext(fused, axis):
  """Each kernel's fan-in with the layer axis at ``axis`` (0 or 1): {axis: fan-in}."""
  # vmap with StateAxes({nnx.Param: axis}) inserts the layer axis at ``axis`` of
  # every Param of a layer, so the per-layer fan-in moves right past it.
  p = "decoder/layers"
  table = {
    "token_embedder/embedding": None,  # (11, 12)
    f"{p}/pre_self_attention_layer_norm/scale": None,  # (12,) with the layer axis
    f"{p}/post_self_attention_layer_norm/scale": None,
    # out: in_features_shape (heads 2, head_dim 5), out 12, axis=(-2, -1);
    # stacked at 1 it is (2, L, 5, 12): the two fan-in axes are apart.
    f"{p}/self_attention/out/kernel": {0: (1, 2), 1: (0, 2)}[axis],
    f"{p}/mlp/wo/kernel": {0: (1,), 1: (0,)}[axis],  # (14, 12)
    "decoder/decoder_norm/scale": None,
    "decoder/logits_dense/kernel": (0,),  # (12, 11), not stacked
  }
  if fused:
    # (12, 3, 2, 5): (embed, qkv, heads, head_dim)
    table[f"{p}/self_attention/qkv_proj/kernel"] = {0: (1,), 1: (0,)}[axis]
    # (12, 2, 14): (embed, num_activations, mlp)
    table[f"{p}/mlp/wi/kernel"] = {0: (1,), 1: (0,)}[axis]
  else:
    for name in ("query", "key", "value"):
      table[f"{p}/self_attention/{name}/kernel"] = {0: (1,), 1: (0,)}[axis]  # (12, 2, 5)
    table[f"{p}/mlp/wi_0/kernel"] = {0: (1,), 1: (0,)}[axis]  # (12, 14)
    table[f"{p}/mlp/wi_1/kernel"] = {0: (1,), 1: (0,)}[axis]
  return table


class NnxEinsum(nnx.Module):
  """Gemma's nnx Einsum: it keeps its equation and shape, and calls its param ``w``."""

  def __init__(self, einsum_str, shape, *, rngs):
    self.einsum_str = einsum_str
    self.shape = tuple(shape)
    self.w = nnx.Param(nnx.initializers.normal(0.1)(rngs.params(), self.shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class NnxRMSNorm(nnx.Module):
  def __init__(self, dim):
    self.scale = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + self.scale[...])


class NnxGemmaAttention(nnx.Module):
  def __init__(self, num_heads, num_kv_heads, *, rngs):
    n, k, d, h = num_heads, num_kv_heads, 12, 5
    self.fused = n == k
    if self.fused:
      self.qkv_einsum = NnxEinsum("BTD,SNDH->SBTNH", (3, n, d, h), rngs=rngs)
    else:
      self.q_einsum = NnxEinsum("BTD,NDH->BTNH", (n, d, h), rngs=rngs)
      self.kv_einsum = NnxEinsum("BSD,CKDH->CBSKH", (2, k, d, h), rngs=rngs)
    self.attn_vec_einsum = NnxEinsum("BTNH,NHD->BTD", (n, h, d), rngs=rngs)

  def __call__(self, x):
    if self.fused:
      q, k, v = self.qkv_einsum(x)
    else:
      q = self.q_einsum(x)
      k, v = self.kv_einsum(x)
    return self.attn_vec_einsum(_gqa(q, k, v))


class NnxGemmaMlp(nnx.Module):
  def __init__(self, *, rngs):
    self.gating_einsum = NnxEinsum("BTD,CFD->CBTF", (2, 14, 12), rngs=rngs)
    self.linear = NnxEinsum("BTF,FD->BTD", (14, 12), rngs=rngs)

  def __call__(self, x):
    gate, up = self.gating_einsum(x)
    return self.linear(nnx.gelu(gate) * up)


class NnxGemmaBlock(nnx.Module):
  def __init__(self, num_heads, num_kv_heads, *, rngs):
    self.pre_attention_norm = NnxRMSNorm(12)
    self.attn = NnxGemmaAttention(num_heads, num_kv_heads, rngs=rngs)
    self.pre_ffw_norm = NnxRMSNorm(12)
    self.mlp = NnxGemmaMlp(rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.pre_attention_norm(x))
    return x + self.mlp(self.pre_ffw_norm(x))


class NnxEmbedder(nnx.Module):
  def __init__(self, *, rngs):
    self.input_embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (11, 12)))

  def encode(self, tokens):
    return self.input_embedding[...][tokens]

  def decode(self, x):
    return x @ self.input_embedding[...].T


class NnxGemma(nnx.Module):
  def __init__(self, num_heads, num_kv_heads, *, rngs):
    self.embedder = NnxEmbedder(rngs=rngs)
    self.layers = nnx.List([NnxGemmaBlock(num_heads, num_kv_heads, rngs=rngs) for _ in range(2)])
    self.final_norm = NnxRMSNorm(12)

  def __call__(self, tokens):
    x = self.embedder.encode(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.embedder.decode(self.final_norm(x))


class EinsumProjAttention(nnx.Module):
  """q/k/v as nnx.Einsum laid out (embed, heads, head_dim), with biases."""

  def __init__(self, rngs):
    d, n, h = 12, 3, 4
    for name in ("q_proj", "k_proj", "v_proj"):
      setattr(self, name, nnx.Einsum("BTD,DNH->BTNH", (d, n, h), (n, h), rngs=rngs))
    self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), (d,), rngs=rngs)
    self.norm = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 20, rngs=rngs)
    self.down = nnx.Linear(20, d, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    x = x + self.o_proj(_gqa(self.q_proj(h), self.k_proj(h), self.v_proj(h)))
    return x + self.down(nnx.gelu(self.up(x)))


EINSUM_PROJ = {
  "q_proj/kernel": (0,),  # (12, 3, 4)
  "q_proj/bias": None,  # (3, 4)
  "k_proj/kernel": (0,),
  "k_proj/bias": None,
  "v_proj/kernel": (0,),
  "v_proj/bias": None,
  "o_proj/kernel": (0, 1),  # (3, 4, 12)
  "o_proj/bias": None,
  "norm/scale": None,
  "up/kernel": (0,),
  "up/bias": None,
  "down/kernel": (0,),
  "down/bias": None,
}


class NnxMisc(nnx.Module):
  def __init__(self, rngs):
    self.per_member = nnx.LinearGeneral(5, 6, batch_axis={0: 3}, rngs=rngs)
    self.heads = nnx.LinearGeneral((4, 5), 7, axis=(-2, -1), rngs=rngs)
    self.up = nnx.ConvTranspose(4, 6, (3, 3), strides=2, rngs=rngs)
    self.up_t = nnx.ConvTranspose(6, 7, (2, 2), strides=2, transpose_kernel=True, rngs=rngs)
    self.grouped = nnx.Conv(4, 10, (3, 3), feature_group_count=2, rngs=rngs)
    self.from_scalar = nnx.Linear(1, 4, rngs=rngs)

  def __call__(self, img, seq, members, t):
    up_t = self.up_t(self.up(img)).mean() + self.grouped(img).mean()
    return self.per_member(members).mean() + self.heads(seq).mean() + up_t + self.from_scalar(t)


NNX_MISC = {
  "per_member/kernel": (1,),  # (3, 5, 6): batch_axis {0: 3}
  "per_member/bias": None,  # (3, 6)
  "heads/kernel": (0, 1),  # (4, 5, 7)
  "heads/bias": None,
  "up/kernel": (0, 1, 2),  # (3, 3, 4, 6)
  "up/bias": None,
  "up_t/kernel": (0, 1, 3),  # (2, 2, 7 out, 6 in)
  "up_t/bias": None,
  "grouped/kernel": (0, 1, 2),  # (3, 3, 2, 10)
  "grouped/bias": None,
  "from_scalar/kernel": (0,),  # (1, 4): a fan-in of one, which GC skips
  "from_scalar/bias": None,
}


class NnxEqualBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(8, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)

  def __call__(self, x):
    return x + self.norm(nnx.relu(self.linear(x)))


class NnxEqualStack(nnx.Module):
  def __init__(self, rngs):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return NnxEqualBlock(nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), 8))
    self.readout = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, h):
      return layer(h)

    return self.readout(run(self.layers, x))


STACK_EQUAL_NNX = {
  "layers/linear/kernel": (1,),  # (8 layers, 8 in, 8 out)
  "layers/linear/bias": None,
  "layers/norm/scale": None,
  "layers/norm/bias": None,
  "readout/kernel": (0,),
  "readout/bias": None,
}


# --------------------------------------------------------------- Equinox ---
# PyTorch layout: Linear "wshape = (out_features_, in_features_)"; Conv
# "wshape = (out_channels, grouped_in_channels) + kernel_size" with bias
# "(out_channels,) + (1,) * num_spatial_dims" (equinox/nn/_linear.py, _conv.py).


class EqxCNN(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(2, 6, 3, key=k1)
    self.conv2 = eqx.nn.Conv2d(6, 8, 2, groups=2, key=k2)
    self.norm = eqx.nn.LayerNorm(8)
    self.head = eqx.nn.Linear(8, 4, key=k3)

  def __call__(self, x):
    x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
    return self.head(self.norm(x.mean((1, 2))))


EQX_CNN = {
  "conv1/weight": (1, 2, 3),  # (6, 2, 3, 3)
  "conv1/bias": None,  # (6, 1, 1)
  "conv2/weight": (1, 2, 3),  # (8, 6 / 2 groups, 2, 2)
  "conv2/bias": None,
  "norm/weight": None,
  "norm/bias": None,
  "head/weight": (1,),  # (4, 8)
  "head/bias": None,
}

EQX_MLP = {
  "layers/0/weight": (1,),  # (7, 5)
  "layers/0/bias": None,
  "layers/1/weight": (1,),  # (7, 7)
  "layers/1/bias": None,
  "layers/2/weight": (1,),  # (3, 7)
  "layers/2/bias": None,
}


class EqxAttention(eqx.Module):
  embed: eqx.nn.Embedding
  attn: eqx.nn.MultiheadAttention
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(11, 6, key=k1)
    self.attn = eqx.nn.MultiheadAttention(
      2, 6, qk_size=4, vo_size=5, use_query_bias=True, use_output_bias=True, key=k2
    )
    self.norm = eqx.nn.LayerNorm(6)
    self.head = eqx.nn.Linear(6, 11, key=k3)

  def __call__(self, tokens):
    x = jax.vmap(self.embed)(tokens)
    x = x + self.attn(x, x, x)
    return jax.vmap(self.head)(jax.vmap(self.norm)(x))


# MultiheadAttention's projections are eqx.nn.Linear (equinox/nn/_attention.py):
# query_proj Linear(query_size, num_heads * qk_size), output_proj
# Linear(num_heads * vo_size, output_size).
EQX_ATTENTION = {
  "embed/weight": None,  # (11, 6)
  "attn/query_proj/weight": (1,),  # (2*4, 6)
  "attn/query_proj/bias": None,
  "attn/key_proj/weight": (1,),  # (8, 6)
  "attn/value_proj/weight": (1,),  # (2*5, 6)
  "attn/output_proj/weight": (1,),  # (6, 10)
  "attn/output_proj/bias": None,
  "norm/weight": None,
  "norm/bias": None,
  "head/weight": (1,),  # (11, 6)
  "head/bias": None,
}


class EqxEnsemble(eqx.Module):
  members: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, key, use_bias=True):
    k1, k2 = jax.random.split(key)
    self.members = eqx.filter_vmap(lambda k: eqx.nn.Linear(6, 9, use_bias=use_bias, key=k))(
      jax.random.split(k1, 4)
    )
    self.head = eqx.nn.Linear(9, 3, use_bias=use_bias, key=k2)

  def __call__(self, x):
    h = eqx.filter_vmap(lambda member: member(x))(self.members)  # (4, 9)
    return self.head(jax.nn.relu(h).mean(0))


EQX_ENSEMBLE = {
  "members/weight": (2,),  # (4 members, 9 out, 6 in): the member axis is not a fan-in
  "members/bias": None,  # (4, 9)
  "head/weight": (1,),
  "head/bias": None,
}
# Without biases no sibling shows which leading axis of (4, 9, 6) is the stack.
EQX_ENSEMBLE_NO_BIAS = {"members/weight": (2,), "head/weight": (1,)}


# ----------------------------------------------------------------- Haiku ---


def _haiku_mlp():
  return hk.transform(lambda x: hk.nets.MLP([7, 5])(x))


HAIKU_MLP = {
  "mlp/~/linear_0/w": (0,),  # hk.Linear w is (in, out): (3, 7)
  "mlp/~/linear_0/b": None,
  "mlp/~/linear_1/w": (0,),  # (7, 5)
  "mlp/~/linear_1/b": None,
}


# ------------------------------------------------------------------ cases ---


def _ones(*shape):
  return jnp.ones(shape, jnp.float32)


def _tokens(*shape):
  return jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape) % 11


def _linen(model, *args, **kwargs):
  return lambda: (model, args, kwargs)


def _nnx(make):
  # Abstract: only shapes matter, and a real init compiles one kernel per shape.
  return lambda: (nnx.eval_shape(lambda: make(nnx.Rngs(0))), (), {})


def _eqx(make):
  def build():
    # Zeros, not the random init (one compiled kernel per shape), but real
    # arrays: eqx.is_inexact_array, which users filter with, drops ShapeDtypeStructs.
    model = jax.tree.map(
      lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)) if _is_abstract(x) else x,
      eqx.filter_eval_shape(make),
      is_leaf=_is_abstract,
    )
    return model, (), {}

  return build


def _is_abstract(x):
  return isinstance(x, jax.ShapeDtypeStruct)


def _dropout_rngs():
  return {"params": jax.random.key(0), "dropout": jax.random.key(1)}


CASES = [
  Case(
    "resnet_bn",
    "linen",
    _linen(ResNet(), _ones(2, 8, 8, 3), train=True),
    RESNET_BN,
    numeric=True,
  ),
  Case(
    "conv_local_resnet", "linen", _linen(LocalResNet(), _ones(2, 7, 7, 2)), CONV_LOCAL, numeric=True
  ),
  Case("vit", "linen", _linen(ViT(), _ones(2, 8, 6, 5), jnp.zeros((2, 2, 2), bool)), VIT),
  Case("mlp_mixer", "linen", _linen(Mixer(), _ones(2, 12, 8, 3)), MIXER),
  Case("convnext", "linen", _linen(ConvNeXt(), _ones(2, 8, 8, 3)), CONVNEXT),
  Case("t5", "linen", _linen(T5(), _tokens(2, 7), _tokens(2, 4)), _t5()),
  Case("gpt_scan_bias", "linen", _linen(GPT(True), _tokens(2, 6)), _gpt(True), numeric=True),
  Case("gpt_scan_no_bias", "linen", _linen(GPT(False), _tokens(2, 6)), _gpt(False)),
  Case(
    "maxtext_unfused_axis1",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(False, 1, rngs=r)),
    _maxtext(False, 1),
  ),
  Case(
    "maxtext_fused_axis1",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(True, 1, rngs=r)),
    _maxtext(True, 1),
    numeric=True,
  ),
  Case(
    "maxtext_unfused_axis0",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(False, 0, rngs=r)),
    _maxtext(False, 0),
  ),
  Case(
    "maxtext_fused_axis0",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(True, 0, rngs=r)),
    _maxtext(True, 0),
  ),
  Case(
    "gemma_nnx_gqa",
    "nnx",
    _nnx(lambda r: NnxGemma(6, 3, rngs=r)),
    _gemma("layers/{}", 6, 3, "embedder/input_embedding"),
    numeric=True,
  ),
  Case(
    "gemma_nnx_fused_qkv",
    "nnx",
    _nnx(lambda r: NnxGemma(2, 2, rngs=r)),
    _gemma("layers/{}", 2, 2, "embedder/input_embedding"),
  ),
  Case(
    "gemma_linen_gqa",
    "linen",
    _linen(LinenGemma(6, 3), _tokens(2, 6)),
    _gemma("layer_{}", 6, 3, "embedder/input_embedding"),
  ),
  Case(
    "gemma_linen_fused_qkv",
    "linen",
    _linen(LinenGemma(2, 2), _tokens(2, 6)),
    _gemma("layer_{}", 2, 2, "embedder/input_embedding"),
  ),
  Case("nnx_einsum_proj", "nnx", _nnx(EinsumProjAttention), EINSUM_PROJ),
  Case("wav2vec_frontend", "linen", _linen(Wav2Vec(), _ones(2, 64, 1)), WAV2VEC),
  Case("mamba", "linen", _linen(MambaBlock(), _ones(2, 5, 6)), MAMBA),
  Case(
    "channels_first_pos_embed",
    "linen",
    _linen(ChannelsFirstPos(), _ones(2, 4, 8, 6)),
    CHANNELS_FIRST_POS,
  ),
  Case("eqx_mlp", "equinox", _eqx(lambda: eqx.nn.MLP(5, 3, 7, 2, key=KEY)), EQX_MLP, "torch"),
  Case("eqx_cnn", "equinox", _eqx(lambda: EqxCNN(KEY)), EQX_CNN, "torch", numeric=True),
  Case("eqx_attention", "equinox", _eqx(lambda: EqxAttention(KEY)), EQX_ATTENTION, "torch"),
  Case(
    "eqx_vmap_linear",
    "equinox",
    _eqx(lambda: EqxEnsemble(KEY)),
    EQX_ENSEMBLE,
    "torch",
    numeric=True,
  ),
  Case(
    "eqx_vmap_linear_no_bias",
    "equinox",
    _eqx(lambda: EqxEnsemble(KEY, use_bias=False)),
    EQX_ENSEMBLE_NO_BIAS,
    "torch",
  ),
  Case("haiku_mlp", "haiku", lambda: (_haiku_mlp(), (_ones(2, 3),), {}), HAIKU_MLP),
  Case(
    "linen_misc",
    "linen",
    _linen(
      LinenMisc(),
      _ones(2, 5, 5, 4),
      _ones(2, 3, 4, 5),
      _ones(3, 2, 5),
      _ones(2, 6, 7, 8, 5),
      _ones(2, 1),
    ),
    LINEN_MISC,
    numeric=True,
  ),
  Case("nnx_misc", "nnx", _nnx(NnxMisc), NNX_MISC, numeric=True),
  Case("stack_equal_linen", "linen", _linen(EqualStack(), _ones(2, 8)), STACK_EQUAL_LINEN),
  Case("stack_equal_nnx", "nnx", _nnx(NnxEqualStack), STACK_EQUAL_NNX, numeric=True),
  Case(
    "dropout_train",
    "linen",
    _linen(DropoutNet(), _ones(2, 4, 5), train=True),
    DROPOUT,
    rngs=_dropout_rngs,
  ),
  Case("bare_param", "linen", _linen(BareParamNet(), _ones(2, 5)), BARE_PARAM),
]

CASES_BY_NAME = {case.name: case for case in CASES}


# --------------------------------------------------------------- summary ---


def rules_for_case(optax_gc, case):
  model, args, kwargs = case.built
  if case.framework == "linen":
    extra = {"rngs": case.rngs()} if case.rngs is not None else {}
    return optax_gc.rules_for(model, *args, **extra, **kwargs)
  return optax_gc.rules_for(model)


def summary(optax_gc):
  """Markdown table: per model, what the preset gets wrong (and how much of it silently),
  what it marks as guesses, and what rules_for gets wrong."""
  lines = [
    "| model | leaves | preset wrong | of which unmarked | preset guesses | rules_for wrong |",
    "|---|---|---|---|---|---|",
  ]
  for case in CASES:
    tree = case.params()
    shapes = {p: np.shape(leaf) for p, leaf in flat(tree).items()}
    want = {p: normalise(case.expected[p], shapes[p]) for p in shapes}
    plan = optax_gc.explain(tree, preset=case.preset)
    wrong = [p for p in want if plan[p].axes != want[p]]
    silent = sum(not plan[p].guess for p in wrong)
    guessed = sum(plan[p].guess for p in want)
    if case.framework == "haiku":
      derived = "n/a"
    else:
      plan = optax_gc.explain(tree, rules_for_case(optax_gc, case), preset=case.preset)
      derived = str(sum(plan[p].axes != want[p] for p in want))
    lines.append(f"| {case.name} | {len(want)} | {len(wrong)} | {silent} | {guessed} | {derived} |")
  return "\n".join(lines)


if __name__ == "__main__":
  import optax_gc

  print(summary(optax_gc))
