"""A zoo of small models shaped like real ones, each with its fan-in table written by hand.

Every table entry comes from the model code below and the layer's own
definition in Flax or Equinox (cited where the layout is not the plain
``(in, out)``), never from optax_gc. ``expected`` maps each leaf's path, as
``helpers.flat`` spells it relative to the params tree, to the axes of that
leaf's fan-in (the kernel axes contracted with the layer's input for one output
unit), or None where Gradient Centralization must leave the leaf alone, or
UNDECIDED where it must leave it alone AND say that the computation does not
decide it (``centralize(strict=True)`` lists those leaves).

The truth is what the forward pass computes: every weight a neuron uses reaches
it through a contraction with that neuron's input, and the contracted axes are
the fan-in, whatever the layer's class, the leaf's name or its stored layout.

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

  ``build`` returns ``(model, args, kwargs)``: the forward pass's inputs, which
  ``rules_for`` is given after the model (linen: the inputs of init and apply;
  nnx: of the module's call; Equinox: of ``model(*args)``; Haiku: ``model`` is
  the transformed pair and ``args`` the inputs of ``apply`` after params and rng).
  ``rngs`` builds linen's rngs where a plain params key is not enough.
  """

  name: str
  framework: str  # "linen" | "nnx" | "equinox" | "haiku"
  build: Callable[[], tuple[Any, tuple, dict]]
  expected: dict[str, Any]  # path -> fan-in axes, None or UNDECIDED
  preset: str = "flax"
  rngs: Callable[[], Any] | None = None
  numeric: bool = False  # also checked by applying centralize to random gradients
  # Leaves whose layout the params tree cannot show (a square kernel stored the
  # other way round, with a bias as long as either axis): no preset can see them.
  preset_blind: frozenset[str] = frozenset()

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

  def undecided(self):
    """The paths the table marks UNDECIDED."""
    return {path for path, axes in self.expected.items() if axes is UNDECIDED}

  def forward(self):
    """The output's shapes: the model runs on ``args`` (nothing is computed)."""
    model, args, kwargs = self.built
    if self.framework == "linen":
      rngs = self.rngs() if self.rngs is not None else None

      def apply(variables):
        return model.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)[0]

      return jax.eval_shape(apply, self.variables)
    if self.framework == "haiku":
      return jax.eval_shape(lambda p: model.apply(p, None, *args, **kwargs), self.variables)
    if self.framework == "nnx":
      graphdef, state = nnx.split(model)
      return jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args, **kwargs), state)
    return eqx.filter_eval_shape(lambda m: m(*args, **kwargs), model)


class _Undecided:
  """The table's mark for a leaf that the computation does not decide."""

  def __repr__(self):
    return "UNDECIDED"


# Left unchanged AND reported: its contractions disagree, it is reached only
# through an opaque op, the forward never reads it, or it is contracted only
# against constants or other parameters. None is a decision (a bias, a table);
# UNDECIDED says there is none to make.
UNDECIDED = _Undecided()


def normalise(axes, shape):
  """The axes GC uses: None for None and UNDECIDED, and for a fan-in of one element
  (GC would zero the gradient, so it is skipped)."""
  if axes is None or axes is UNDECIDED or math.prod(shape[a] for a in axes) == 1:
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
  "proj/W": (0,),  # (5, 7): no library layer, but x @ W contracts the input with axis 0
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


def _haiku_mlp(x):
  return hk.nets.MLP([7, 5])(x)


HAIKU_MLP = {
  "mlp/~/linear_0/w": (0,),  # hk.Linear w is (in, out): (3, 7)
  "mlp/~/linear_0/b": None,
  "mlp/~/linear_1/w": (0,),  # (7, 5)
  "mlp/~/linear_1/b": None,
}


# ------------------------------------------- failure classes: custom layers ---
# Models of our own with the structure of real third-party ones. Each table
# entry names the contraction that defines it; none comes from a layer class.


class TorchLinear(nn.Module):
  """A layer ported from PyTorch: it holds ``features`` but stores its kernel (out, in)."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return x @ kernel.T + bias


class MuDense(nn.Dense):
  """muP's readout: a subclass of nn.Dense whose output is scaled by a fixed multiplier."""

  multiplier: float = 0.5

  def __call__(self, x):
    return super().__call__(x) * self.multiplier


class TorchPortMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(TorchLinear(6, name="fc1")(x))
    h = nn.gelu(TorchLinear(6, name="fc2")(h))
    return MuDense(4, name="readout")(h)


TORCH_PORT = {
  "fc1/kernel": (1,),  # (6 out, 5 in): x @ kernel.T contracts x with axis 1
  "fc1/bias": None,
  "fc2/kernel": (1,),  # (6, 6): square, only the call's transpose tells
  "fc2/bias": None,
  "readout/kernel": (0,),  # (6, 4): nn.Dense's x @ kernel, then a scale
  "readout/bias": None,
}


class JitMlp(nn.Module):
  """The whole forward pass is an nn.jit: the jaxpr holds it as one sub-program."""

  @nn.jit
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6, name="fc")(x))
    h = nn.DenseGeneral((2, 3), name="split")(h)
    return nn.DenseGeneral(4, axis=(-2, -1), name="merge")(nn.relu(h))


JIT_MLP = {
  "fc/kernel": (0,),  # (5, 6): x @ kernel
  "fc/bias": None,
  "split/kernel": (0,),  # (6, 2, 3): contracts the 6 inputs, (2, 3) are outputs
  "split/bias": None,  # (2, 3)
  "merge/kernel": (0, 1),  # (2, 3, 4): axis=(-2, -1) contracts both
  "merge/bias": None,
}


class RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(8, name="up")(nn.LayerNorm(name="norm")(x)))
    return x + nn.Dense(x.shape[-1], name="down")(h)


class RematNet(nn.Module):
  """Blocks wrapped in nn.remat, as memory-bound training code does."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.remat(RematBlock)(name=f"block_{i}")(x)
    return nn.Dense(3, name="head")(x)


def _remat_block(p):
  return {
    f"{p}/norm/scale": None,
    f"{p}/norm/bias": None,
    f"{p}/up/kernel": (0,),  # (5, 8), inside the remat sub-program
    f"{p}/up/bias": None,
    f"{p}/down/kernel": (0,),  # (8, 5)
    f"{p}/down/bias": None,
  }


REMAT = {
  **_remat_block("block_0"),
  **_remat_block("block_1"),
  "head/kernel": (0,),  # (5, 3)
  "head/bias": None,
}


def _letters(eqn):
  """The equation with each digit spelled as a capital letter it does not use.

  Gemma-style code writes a fixed-size axis as a digit ("BSD,2KDH->2BSKH");
  jnp.einsum takes letters only, so a layer that keeps such an equation must
  substitute before calling it.
  """
  free = iter(c for c in "ZYXWVUQPO" if c not in eqn)
  for digit in sorted({c for c in eqn if c.isdigit()}):
    eqn = eqn.replace(digit, next(free))
  return eqn


class EqnEinsum(nn.Module):
  """An einsum layer that holds its equation under ``eqn`` and may name its param."""

  eqn: str
  shape: tuple[int, ...]
  param_name: str = "w"

  @nn.compact
  def __call__(self, x):
    w = self.param(self.param_name, nn.initializers.normal(0.1), self.shape)
    return jnp.einsum(_letters(self.eqn), x, w)


class SharedScopeFfw(nn.Module):
  """Gate and up einsums whose params live in this module's scope (nn.share_scope)."""

  dim: int
  hidden: int

  def setup(self):
    d, f = self.dim, self.hidden
    self.gate_proj = EqnEinsum("BTD,DF->BTF", (d, f), "gate")
    self.up_proj = EqnEinsum("BTD,DF->BTF", (d, f), "up")
    nn.share_scope(self, self.gate_proj)
    nn.share_scope(self, self.up_proj)
    self.down = EqnEinsum("BTF,FD->BTD", (f, d))

  def __call__(self, x):
    return self.down(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


class EinsumVariants(nn.Module):
  def setup(self):
    d, n, k, h = 6, 4, 2, 3
    self.q = EqnEinsum("BTD,NDH->BTNH", (n, d, h))
    self.kv = EqnEinsum("BSD,2KDH->2BSKH", (2, k, d, h))
    self.out = EqnEinsum("BTNH,NHD->BTD", (n, h, d))
    self.ffw = SharedScopeFfw(d, 8)
    # Called with the equation: once on (B, T, D), once on a time-major (S, B, D).
    self.proj = LinenEinsum((d, 5))

  def __call__(self, x, memory):
    k, v = self.kv(x)
    x = x + self.out(_gqa(self.q(x), k, v))
    x = x + self.ffw(x)
    ctx = self.proj("BTD,DF->BTF", x)
    mem = self.proj("SBD,DF->BSF", memory)
    return jnp.einsum("btf,bsf->bts", ctx, mem)


EINSUM_VARIANTS = {
  "q/w": (1,),  # "BTD,NDH->BTNH" (4, 6, 3): D is axis 1
  "kv/w": (2,),  # "BSD,2KDH->2BSKH" (2, 2, 6, 3): D is axis 2; "2" and K are outputs
  "out/w": (0, 1),  # "BTNH,NHD->BTD" (4, 3, 6): N and H contracted
  "ffw/gate": (0,),  # "BTD,DF->BTF" (6, 8), shared scope
  "ffw/up": (0,),  # (6, 8), shared scope
  "ffw/down/w": (0,),  # "BTF,FD->BTD" (8, 6)
  "proj/w": (0,),  # (6, 5): "BTD,DF" and "SBD,DF" both contract D
}


class NnxRaggedMoe(nnx.Module):
  """Top-k routed experts applied with jax.lax.ragged_dot on tokens sorted by expert."""

  def __init__(self, dim, hidden, experts, top_k, *, rngs):
    init = nnx.initializers.normal(0.1)
    self.top_k = top_k
    self.norm = NnxRMSNorm(dim)
    self.router = nnx.Param(init(rngs.params(), (dim, experts)))
    self.wi_gate = nnx.Param(init(rngs.params(), (experts, dim, hidden)))
    self.wi_up = nnx.Param(init(rngs.params(), (experts, dim, hidden)))
    self.wo = nnx.Param(init(rngs.params(), (experts, hidden, dim)))

  def __call__(self, x):
    b, t, d = x.shape
    tokens = self.norm(x).reshape(b * t, d)
    logits, chosen = jax.lax.top_k(tokens @ self.router[...], self.top_k)
    weights = jax.nn.softmax(logits)
    flat_chosen = chosen.reshape(-1)
    order = jnp.argsort(flat_chosen)
    sorted_tokens = jnp.repeat(tokens, self.top_k, axis=0)[order]
    sizes = jnp.bincount(flat_chosen, length=self.router.shape[1])
    gate = jax.lax.ragged_dot(sorted_tokens, self.wi_gate[...], sizes)
    up = jax.lax.ragged_dot(sorted_tokens, self.wi_up[...], sizes)
    out = jax.lax.ragged_dot(nnx.silu(gate) * up, self.wo[...], sizes)[jnp.argsort(order)]
    out = (out.reshape(b * t, self.top_k, d) * weights[..., None]).sum(1)
    return x + out.reshape(b, t, d)


MOE_RAGGED = {
  "norm/scale": None,
  "router": (0,),  # (6, 4): tokens @ router
  # ragged_dot(lhs (m, 6), rhs (experts, 6, f)): the group axis is kept, 6 contracted
  "wi_gate": (1,),  # (4, 6, 8)
  "wi_up": (1,),  # (4, 6, 8), the same ragged_dot
  "wo": (1,),  # (4, 8, 6)
}


class EinsumMoe(nn.Module):
  """Switch-style top-1 experts with capacity: dispatch, per-expert einsums, combine."""

  experts: int = 3
  capacity: int = 4
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    d, e, c = x.shape[-1], self.experts, self.capacity
    h = nn.LayerNorm(name="norm")(x)
    probs = jax.nn.softmax(nn.Dense(e, use_bias=False, name="router")(h))
    mask = jax.nn.one_hot(jnp.argmax(probs, -1), e)  # (G, S, E)
    slot = (jnp.cumsum(mask, axis=1) * mask - 1).astype(jnp.int32)  # -1: not routed here
    dispatch = mask[..., None] * jax.nn.one_hot(slot, c)  # (G, S, E, C)
    combine = dispatch * probs.max(-1)[..., None, None]
    init = nn.initializers.normal(0.1)
    wi = self.param("wi", init, (e, d, self.hidden))
    wo = self.param("wo", init, (e, self.hidden, d))
    expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, h)
    mid = nn.relu(jnp.einsum("egcd,edf->egcf", expert_in, wi))
    out = jnp.einsum("egcf,efd->egcd", mid, wo)
    return x + jnp.einsum("gsec,egcd->gsd", combine, out)


MOE_EINSUM = {
  "norm/scale": None,
  "norm/bias": None,
  "router/kernel": (0,),  # (6, 3)
  "wi": (1,),  # (3, 6, 8): "egcd,edf->egcf", e a batch axis, d contracted
  "wo": (1,),  # (3, 8, 6): "egcf,efd->egcd", f contracted
}


class FlatAttentionBlock(nn.Module):
  """Attention kernels stored flat, (d, heads*head_dim) and (heads*head_dim, d),
  reshaped to (d, heads, head_dim) / (heads, head_dim, d) when called."""

  heads: int = 2
  head_dim: int = 3

  @nn.compact
  def __call__(self, x, _):
    d, n, h = x.shape[-1], self.heads, self.head_dim
    init = nn.initializers.normal(0.1)
    wq, wk, wv = (self.param(name, init, (d, n * h)).reshape(d, n, h) for name in "qkv")
    wo = self.param("out", init, (n * h, d)).reshape(n, h, d)
    y = nn.LayerNorm(name="norm")(x)
    q, k, v = (jnp.einsum("btd,dnh->btnh", y, w) for w in (wq, wk, wv))
    x = x + jnp.einsum("btnh,nhd->btd", _gqa(q, k, v), wo)
    return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(8, name="fc1")(x))), None


class FlatAttentionStack(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 6, name="embed")(tokens)
    stack = nn.scan(
      FlatAttentionBlock, variable_axes={"params": 1}, split_rngs={"params": True}, length=3
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(11, name="head")(x)


FLAT_ATTENTION = {
  "embed/embedding": None,  # (11, 6): rows looked up by token
  # nn.scan at axis 1 puts the 3 layers second on every leaf of "layers".
  "layers/q": (0,),  # (6, 3 layers, 6): d contracted, heads*head_dim split into outputs
  "layers/k": (0,),  # as q
  "layers/v": (0,),
  "layers/out": (0,),  # (6, 3, 6): heads*head_dim, both contracted after the reshape
  "layers/norm/scale": None,  # (6, 3)
  "layers/norm/bias": None,
  "layers/fc1/kernel": (0,),  # (6, 3, 8)
  "layers/fc1/bias": None,  # (8, 3)
  "layers/fc2/kernel": (0,),  # (8, 3, 6)
  "layers/fc2/bias": None,
  "head/kernel": (0,),  # (6, 11)
  "head/bias": None,
}


class PackedLstmCell(nn.Module):
  """An LSTM cell with the four gates packed along the output axis, (in, 4h) and (h, 4h)."""

  hidden: int

  @nn.compact
  def __call__(self, carry, x):
    c, h = carry
    init = nn.initializers.lecun_normal()
    w_x = self.param("w_x", init, (x.shape[-1], 4 * self.hidden))
    w_h = self.param("w_h", init, (self.hidden, 4 * self.hidden))
    b = self.param("b", nn.initializers.zeros, (4 * self.hidden,))
    i, f, g, o = jnp.split(x @ w_x + h @ w_h + b, 4, axis=-1)
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


class PackedLstm(nn.Module):
  @nn.compact
  def __call__(self, x):
    cell = nn.scan(
      PackedLstmCell,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )
    zeros = jnp.zeros((x.shape[0], 2))
    _, hs = cell(2, name="cell")((zeros, zeros), x)
    return nn.Dense(3, name="head")(hs[:, -1])


LSTM = {
  "cell/w_x": (0,),  # (3, 8): x @ w_x, over time inside the scan (params broadcast)
  "cell/w_h": (0,),  # (2, 8): h @ w_h
  "cell/b": None,
  "head/kernel": (0,),
  "head/bias": None,
}


class BlockDiagonalLinear(nn.Module):
  """One (block, block) matrix per head: "...hi,hij->...hj"."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    block = self.width // self.heads
    w = self.param("w", nn.initializers.normal(0.1), (self.heads, block, block))
    b = self.param("b", nn.initializers.zeros, (self.heads, block))
    x = x.reshape(*x.shape[:-1], self.heads, block)
    y = jnp.einsum("...hi,hij->...hj", x, w) + b
    return y.reshape(*y.shape[:-2], self.width)


class TemporalConv(nn.Module):
  """A causal depthwise conv over time written as a sum of shifted inputs times w[shift]."""

  width: int
  taps: int

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.1), (self.taps, self.width))
    b = self.param("b", nn.initializers.zeros, (self.width,))
    t = x.shape[1]
    out = b
    for shift in range(self.taps):
      shifted = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :t]
      out = out + shifted * w[self.taps - shift - 1]
    return out


class RgLru(nn.Module):
  """Real-gated linear recurrence: block-diagonal gates, a per-channel decay."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    gate_x = nn.sigmoid(BlockDiagonalLinear(self.width, self.heads, name="input_gate")(x))
    gate_a = nn.sigmoid(BlockDiagonalLinear(self.width, self.heads, name="a_gate")(x))
    a_param = self.param("a_param", nn.initializers.ones, (self.width,))
    log_a = -8.0 * gate_a * nn.softplus(a_param)
    drive = gate_x * x * jnp.sqrt(1 - jnp.exp(2 * log_a))

    def step(h, inputs):
      decay, u = inputs
      h = decay * h + u
      return h, h

    seq = (jnp.exp(log_a).swapaxes(0, 1), drive.swapaxes(0, 1))
    _, y = jax.lax.scan(step, jnp.zeros((x.shape[0], self.width)), seq)
    return y.swapaxes(0, 1)


class GriffinBlock(nn.Module):
  width: int = 6
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    h = LinenRMSNorm(name="temporal_pre_norm")(x)
    y = nn.gelu(nn.Dense(self.width, name="linear_y")(h))
    u = nn.Dense(self.width, name="linear_x")(h)
    u = TemporalConv(self.width, 3, name="conv_1d")(u)
    u = RgLru(self.width, self.heads, name="rg_lru")(u)
    return x + nn.Dense(x.shape[-1], name="linear_out")(u * y)


GRIFFIN = {
  "temporal_pre_norm/scale": None,
  "linear_y/kernel": (0,),  # (4, 6)
  "linear_y/bias": None,
  "linear_x/kernel": (0,),
  "linear_x/bias": None,
  # out[t, c] = sum_s x[t - s, c] * w[taps - 1 - s, c]: a contraction over the
  # taps written by hand; channel c is kept (depthwise).
  "conv_1d/w": (0,),  # (3 taps, 6)
  "conv_1d/b": None,
  "rg_lru/input_gate/w": (1,),  # (2 heads, 3, 3): "...hi,hij->...hj", h kept, i contracted
  "rg_lru/input_gate/b": None,  # (2, 3)
  "rg_lru/a_gate/w": (1,),  # as input_gate
  "rg_lru/a_gate/b": None,
  "rg_lru/a_param": None,  # (6,): a decay, elementwise with the gate
  "linear_out/kernel": (0,),  # (6, 4)
  "linear_out/bias": None,
}


class StdConv(nn.Module):
  """Weight standardisation: the kernel is standardised over its fan-in before the conv."""

  features: int

  @nn.compact
  def __call__(self, x):
    shape = (3, 3, x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
    fan_in = (0, 1, 2)
    mean = kernel.mean(fan_in, keepdims=True)
    kernel = (kernel - mean) * jax.lax.rsqrt(kernel.var(fan_in, keepdims=True) + 1e-5)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)


_NHWC = ("NHWC", "HWIO", "NHWC")


class WeightNormConv(nn.Module):
  """Weight norm: kernel g * v / ||v||, the norm taken over each output unit's fan-in."""

  features: int

  @nn.compact
  def __call__(self, x):
    v = self.param("v", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    g = self.param("g", nn.initializers.ones, (self.features,))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    kernel = g * v * jax.lax.rsqrt(jnp.sum(v**2, axis=(0, 1, 2), keepdims=True))
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC) + b


class WeightNormDense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    v = self.param("v", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    g = self.param("g", nn.initializers.ones, (self.features,))
    return x @ (g * v / jnp.linalg.norm(v, axis=0, keepdims=True))


class WeightReparamNet(nn.Module):
  @nn.compact
  def __call__(self, img):
    x = nn.relu(nn.GroupNorm(num_groups=2, name="gn")(StdConv(4, name="std_conv")(img)))
    x = nn.relu(WeightNormConv(6, name="wn_conv")(x))
    return WeightNormDense(3, name="wn_head")(x.mean((1, 2)))


WEIGHT_REPARAM = {
  "std_conv/kernel": (0, 1, 2),  # (3, 3, 2, 4): standardised, then the HWIO conv
  "gn/scale": None,
  "gn/bias": None,
  "wn_conv/v": (0, 1, 2),  # (3, 3, 4, 6): g * v / ||v|| is the conv's kernel
  "wn_conv/g": None,  # (6,): one scale per output unit, on an axis no conv sums
  "wn_conv/bias": None,
  "wn_head/v": (0,),  # (6, 3): x @ (g * v / ||v||)
  "wn_head/g": None,
}


class SpectralDense(nn.Module):
  """Spectral normalisation: one power-iteration step on the stopped kernel, then
  x @ (kernel / sigma); the estimate u is state, not a parameter."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    u = self.variable(
      "spectral", "u", lambda: jax.random.normal(self.make_rng("params"), (1, self.features))
    )
    w = jax.lax.stop_gradient(kernel)
    v = _unit(u.value @ w.T)
    u_new = _unit(v @ w)
    sigma = (v @ w @ u_new.T)[0, 0]
    return x @ (kernel / sigma) + bias


def _unit(x):
  return x * jax.lax.rsqrt(jnp.sum(x**2) + 1e-12)


class SpectralNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return SpectralDense(3, name="out")(nn.relu(SpectralDense(6, name="hidden")(x)))


SPECTRAL = {
  "hidden/kernel": (0,),  # (5, 6): x @ (kernel / sigma); the power iteration is stopped
  "hidden/bias": None,
  "out/kernel": (0,),  # (6, 3)
  "out/bias": None,
}


class ConvVariants(nn.Module):
  @nn.compact
  def __call__(self, img, seq, views):
    up = nn.ConvTranspose(4, (3, 3), strides=(2, 2), name="up")(img)
    up_t = nn.ConvTranspose(4, (2, 2), strides=(2, 2), transpose_kernel=True, name="up_t")(up)
    grouped = nn.Conv(6, (3, 3), feature_group_count=2, name="grouped")(img)
    depthwise = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(img)
    conv1d = nn.Conv(5, (3,), name="conv1d")(seq)
    per_view = nn.vmap(
      nn.Conv,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=0,
      out_axes=0,
    )(4, (2, 2), name="per_view")(views)
    outs = (up_t, grouped, depthwise, conv1d, per_view)
    return sum(o.mean() for o in outs)


CONV_VARIANTS = {
  "up/kernel": (0, 1, 2),  # ConvTranspose (3, 3, 4 in, 4 out)
  "up/bias": None,
  # transpose_kernel=True: (2, 2, 4 features, 4 in), the kernel of the conv it
  # transposes; each output unit is an index of axis 2, fed by axes 0, 1, 3.
  "up_t/kernel": (0, 1, 3),
  "up_t/bias": None,
  "grouped/kernel": (0, 1, 2),  # (3, 3, 4 / 2 groups, 6)
  "grouped/bias": None,
  "depthwise/kernel": (0, 1, 2),  # (3, 3, 1, 4): 9 taps per channel
  "depthwise/bias": None,
  "conv1d/kernel": (0, 1),  # (3, 3, 5)
  "conv1d/bias": None,
  "per_view/kernel": (1, 2, 3),  # nn.vmap: (2 views, 2, 2, 3, 4), one conv per view
  "per_view/bias": None,  # (2, 4)
}


class Undecidable(nn.Module):
  """Parameters whose fan-in the forward pass does not decide, beside one it does."""

  @nn.compact
  def __call__(self, x):
    t, d = x.shape[1], x.shape[2]
    init = nn.initializers.normal(0.1)
    # A position table written in a fixed cosine basis: contracted with a constant only.
    basis = np.cos(np.pi * np.outer(np.arange(t) + 0.5, np.arange(4)) / t).astype(np.float32)
    x = x + jnp.asarray(basis) @ self.param("pos_coeffs", init, (4, d))
    # A low-rank weight W = A @ B: each factor is contracted with the other.
    a = self.param("lowrank_a", init, (d, 2))
    b = self.param("lowrank_b", init, (2, d))
    x = x + x @ (a @ b)
    # A tied autoencoder: encode with x @ W, decode with h @ W.T.
    w = self.param("tied", init, (d, 4))
    x = x + nn.relu(x @ w) @ w.T
    # A kernel that only a foreign (host) function reads.
    opaque = self.param("opaque", init, (d, d))
    x = jax.pure_callback(_np_matmul, jax.ShapeDtypeStruct(x.shape, x.dtype), x, opaque)
    self.param("unused", init, (d, 3))  # created, never read by the forward
    return nn.Dense(3, name="head")(x)


def _np_matmul(x, w):
  return np.asarray(x) @ np.asarray(w)


UNDECIDABLE = {
  "pos_coeffs": UNDECIDED,  # (4, 6): basis @ coeffs, a constant on the other side
  "lowrank_a": UNDECIDED,  # (6, 2): A @ B, then x @ (A @ B)
  "lowrank_b": UNDECIDED,  # (2, 6)
  "tied": UNDECIDED,  # (6, 4): x @ W contracts axis 0, h @ W.T axis 1
  "opaque": UNDECIDED,  # (6, 6): only jax.pure_callback reads it
  "unused": UNDECIDED,  # (6, 3)
  "head/kernel": (0,),  # (6, 3)
  "head/bias": None,
}


# nnx


class NnxPerceiver(nnx.Module):
  """A learned CLS token and position table joined to the inputs, and learned latents
  broadcast over the batch that cross-attend to them."""

  def __init__(self, rngs):
    d, n, h, init = 6, 2, 3, nnx.initializers.normal(0.02)
    self.embed = nnx.Linear(4, d, rngs=rngs)
    self.pos_embedding = nnx.Param(init(rngs.params(), (5, d)))
    self.cls = nnx.Param(jnp.zeros((1, d)))
    self.latents = nnx.Param(init(rngs.params(), (3, d)))
    self.latent_norm = nnx.LayerNorm(d, rngs=rngs)
    self.q = nnx.LinearGeneral(d, (n, h), rngs=rngs)
    self.kv = nnx.LinearGeneral(d, (2, n, h), rngs=rngs)
    self.out = nnx.LinearGeneral((n, h), d, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    b = x.shape[0]
    x = self.embed(x) + self.pos_embedding[...]
    cls = jnp.broadcast_to(self.cls[...], (b, *self.cls.shape))
    x = jnp.concatenate([cls, x], axis=1)
    latents = jnp.broadcast_to(self.latents[...], (b, *self.latents.shape))
    q = self.q(self.latent_norm(latents))
    k, v = jnp.moveaxis(self.kv(x), 2, 0)
    weights = jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k))
    latents = latents + self.out(jnp.einsum("bnqk,bknh->bqnh", weights, v))
    return self.head(latents.mean(1))


PERCEIVER = {
  "embed/kernel": (0,),  # (4, 6)
  "embed/bias": None,
  "pos_embedding": None,  # (5, 6): added to the activations
  "cls": None,  # (1, 6): broadcast over the batch and concatenated
  "latents": None,  # (3, 6): broadcast over the batch, the queries' input
  "latent_norm/scale": None,
  "latent_norm/bias": None,
  "q/kernel": (0,),  # (6, 2, 3): latents @ kernel
  "q/bias": None,  # (2, 3)
  "kv/kernel": (0,),  # (6, 2, 2, 3): x @ kernel, k and v split after
  "kv/bias": None,  # (2, 2, 3)
  "out/kernel": (0, 1),  # (2, 3, 6)
  "out/bias": None,
  "head/kernel": (0,),
  "head/bias": None,
}


class NnxOneHotLm(nnx.Module):
  """Tables looked up as one_hot(ids) @ table, the token table tied to the logits."""

  def __init__(self, rngs):
    init = nnx.initializers.normal(1.0)
    self.tokens = nnx.Param(init(rngs.params(), (11, 6)))
    self.segments = nnx.Param(init(rngs.params(), (2, 6)))
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.mlp_in = nnx.Linear(6, 8, rngs=rngs)
    self.mlp_out = nnx.Linear(8, 6, rngs=rngs)

  def __call__(self, ids, segment_ids):
    x = jax.nn.one_hot(ids, 11) @ self.tokens[...]
    x = x + jax.nn.one_hot(segment_ids, 2) @ self.segments[...]
    x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm(x))))
    return x @ self.tokens[...].T


ONE_HOT_LM = {
  "tokens": None,  # (11, 6): rows picked by a one-hot of ids; also the tied readout
  "segments": None,  # (2, 6): rows picked by a one-hot of segment ids
  "norm/scale": None,
  "norm/bias": None,
  "mlp_in/kernel": (0,),  # (6, 8)
  "mlp_in/bias": None,
  "mlp_out/kernel": (0,),  # (8, 6)
  "mlp_out/bias": None,
}


class NnxLowRank(nnx.Module):
  """A LoRA adapter, x @ A @ B (each factor meets the activations), beside a factorised
  weight, x @ (A @ B) (the factors meet each other first)."""

  def __init__(self, rngs):
    init = nnx.initializers.normal(0.1)
    self.adapted = nnx.LoRALinear(6, 6, lora_rank=2, rngs=rngs)
    self.factor_a = nnx.Param(init(rngs.params(), (6, 2)))
    self.factor_b = nnx.Param(init(rngs.params(), (2, 6)))
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.adapted(x))
    x = x + x @ (self.factor_a[...] @ self.factor_b[...])
    return self.head(x)


LOW_RANK = {
  "adapted/kernel": (0,),  # (6, 6)
  "adapted/bias": None,
  "adapted/lora/lora_a": (0,),  # (6, 2): (x @ A) @ B, A against x
  "adapted/lora/lora_b": (0,),  # (2, 6): B against x @ A
  "factor_a": UNDECIDED,  # (6, 2): A @ B, then x @ (A @ B)
  "factor_b": UNDECIDED,  # (2, 6)
  "head/kernel": (0,),
  "head/bias": None,
}


# Equinox


class InOutLinear(eqx.Module):
  """A Linear ported from Flax: weight stored (in, out), used as x @ W."""

  weight: jax.Array
  bias: jax.Array

  def __init__(self, n_in, n_out, key):
    self.weight = jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in)
    self.bias = jnp.zeros((n_out,))

  def __call__(self, x):
    return x @ self.weight + self.bias


class HwioConv(eqx.Module):
  """A 2-D conv ported from TensorFlow: weight (kh, kw, in, out), channels-last input."""

  weight: jax.Array
  bias: jax.Array

  def __init__(self, n_in, n_out, size, key):
    self.weight = jax.random.normal(key, (size, size, n_in, n_out)) / (size * math.sqrt(n_in))
    self.bias = jnp.zeros((n_out,))

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x[None], self.weight, (1, 1), "SAME", dimension_numbers=_NHWC)
    return y[0] + self.bias


class EqxCustomNet(eqx.Module):
  conv1: HwioConv
  conv2: HwioConv
  hidden: InOutLinear
  head: InOutLinear

  def __init__(self, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    self.conv1 = HwioConv(2, 4, 3, k1)
    self.conv2 = HwioConv(4, 4, 2, k2)
    self.hidden = InOutLinear(4, 4, k3)
    self.head = InOutLinear(4, 3, k4)

  def __call__(self, img):  # (H, W, C)
    x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(img))))
    return self.head(jax.nn.relu(self.hidden(x.mean((0, 1)))))


EQX_CUSTOM = {
  "conv1/weight": (0, 1, 2),  # (3, 3, 2, 4): HWIO conv
  "conv1/bias": None,
  "conv2/weight": (0, 1, 2),  # (2, 2, 4, 4)
  "conv2/bias": None,
  "hidden/weight": (0,),  # (4, 4): x @ W, not the (out, in) of eqx.nn.Linear
  "hidden/bias": None,
  "head/weight": (0,),  # (4, 3)
  "head/bias": None,
}


class EqxSummedSlices(eqx.Module):
  """Slices of one weight whose contractions are added into the same neurons, and stacks.

  A dense convolution written as a loop over taps, the same taps added to a
  scan's carry, a recurrent cell storing its input and recurrent weights
  stacked: the sliced axis is summed. A residual stack unrolled by a loop (each
  layer fed by the last) and experts weighted by a gate: the sliced axis is kept.
  """

  taps: jax.Array  # (3, 4, 5): y[t] = sum_k x[t + k] @ taps[k]
  scan_taps: jax.Array  # (3, 5, 6): the same, one tap per trip of a scan
  cell: jax.Array  # (2, 6, 6): h = tanh(x @ cell[0] + h @ cell[1])
  stack: jax.Array  # (3, 6, 6): x = x + tanh(x @ stack[i])
  experts: jax.Array  # (3, 6, 6): sum_e gate[e] * (x @ experts[e])

  def __init__(self, key):
    del key
    self.taps, self.scan_taps = jnp.zeros((3, 4, 5)), jnp.zeros((3, 5, 6))
    self.cell, self.stack, self.experts = (jnp.zeros((n, 6, 6)) for n in (2, 3, 3))

  def __call__(self, x):  # (T, 4)
    t = x.shape[0] - 2
    x = jax.nn.relu(sum(x[k : k + t] @ self.taps[k] for k in range(3)))  # (T - 2, 5)
    xs = jnp.stack([x[k : k + t - 2] for k in range(3)])
    x = jax.lax.scan(
      lambda a, xw: (a + xw[0] @ xw[1], None), jnp.zeros((t - 2, 6)), (xs, self.scan_taps)
    )[0]

    def step(h, x):
      h = jnp.tanh(x @ self.cell[0] + h @ self.cell[1])
      return h, h

    h, x = jax.lax.scan(step, jnp.zeros(6), x)
    for i in range(3):
      x = x + jnp.tanh(x @ self.stack[i])
    gate = jax.nn.softmax(x @ jnp.ones((6, 3)), axis=-1)
    return sum(gate[:, e : e + 1] * (x @ self.experts[e]) for e in range(3))


EQX_SUMMED_SLICES = {
  "taps": (0, 1),  # taps and input channels: every output sums both
  "scan_taps": (0, 1),
  "cell": (0, 1),  # [x, h] @ cell.reshape(12, 6)
  "stack": (1,),  # axis 0: layers, each fed by the one before
  "experts": (1,),  # axis 0: experts, their outputs weighted by data before the sum
}


class EqxGru(eqx.Module):
  cell: eqx.nn.GRUCell
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.cell = eqx.nn.GRUCell(3, 2, key=k1)
    self.head = eqx.nn.Linear(2, 4, key=k2)

  def __call__(self, xs):  # (T, 3)
    def step(h, x):
      h = self.cell(x, h)
      return h, None

    h, _ = jax.lax.scan(step, jnp.zeros((self.cell.hidden_size,)), xs)
    return self.head(h)


# GRUCell (equinox/nn/_rnn.py): weight_ih (3 * hidden, input), weight_hh
# (3 * hidden, hidden), the three gates packed on axis 0, used as W @ x.
EQX_GRU = {
  "cell/weight_ih": (1,),  # (6, 3): weight_ih @ x
  "cell/weight_hh": (1,),  # (6, 2): weight_hh @ h
  "cell/bias": None,  # (6,)
  "cell/bias_n": None,  # (2,)
  "head/weight": (1,),  # (4, 2)
  "head/bias": None,
}


class EqxFusedLm(eqx.Module):
  """Fused QKV (d, 3, heads, head_dim) and gate-and-up (2, d, f), one einsum each;
  the token table tied to the logits."""

  embed: eqx.nn.Embedding
  norm: eqx.nn.LayerNorm
  qkv: jax.Array
  out: jax.Array
  gating: jax.Array
  down: jax.Array

  def __init__(self, key):
    d, n, h, f = 6, 2, 3, 8
    keys = jax.random.split(key, 5)
    self.embed = eqx.nn.Embedding(11, d, key=keys[0])
    self.norm = eqx.nn.LayerNorm(d)
    self.qkv = 0.1 * jax.random.normal(keys[1], (d, 3, n, h))
    self.out = 0.1 * jax.random.normal(keys[2], (n, h, d))
    self.gating = 0.1 * jax.random.normal(keys[3], (2, d, f))
    self.down = 0.1 * jax.random.normal(keys[4], (f, d))

  def __call__(self, tokens):  # (T,)
    x = jax.vmap(self.embed)(tokens)
    q, k, v = jnp.einsum("td,dcnh->ctnh", jax.vmap(self.norm)(x), self.qkv)
    weights = jax.nn.softmax(jnp.einsum("tnh,snh->nts", q, k))
    x = x + jnp.einsum("tnh,nhd->td", jnp.einsum("nts,snh->tnh", weights, v), self.out)
    gate, up = jnp.einsum("td,cdf->ctf", jax.vmap(self.norm)(x), self.gating)
    x = x + (jax.nn.gelu(gate) * up) @ self.down
    return x @ self.embed.weight.T


EQX_FUSED = {
  "embed/weight": None,  # (11, 6): rows by token, and the tied x @ table.T
  "norm/weight": None,
  "norm/bias": None,
  "qkv": (0,),  # (6, 3, 2, 3): "td,dcnh->ctnh", then split on c
  "out": (0, 1),  # (2, 3, 6): n and h contracted with the attention output
  "gating": (1,),  # (2, 6, 8): "td,cdf->ctf", then split on c
  "down": (0,),  # (8, 6)
}


class EqxConvVariants(eqx.Module):
  up: eqx.nn.ConvTranspose2d
  depthwise: eqx.nn.Conv2d
  conv1d: eqx.nn.Conv1d

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.up = eqx.nn.ConvTranspose2d(3, 4, 3, stride=2, key=k1)
    self.depthwise = eqx.nn.Conv2d(4, 4, 3, groups=4, key=k2)
    self.conv1d = eqx.nn.Conv1d(3, 5, 3, key=k3)

  def __call__(self, img, seq):  # (3, H, W), (3, T)
    return self.depthwise(self.up(img)).mean() + self.conv1d(seq).mean()


EQX_CONV_VARIANTS = {
  "up/weight": (1, 2, 3),  # ConvTranspose (4 out, 3 in, 3, 3): a dilated conv, OIHW
  "up/bias": None,  # (4, 1, 1)
  "depthwise/weight": (1, 2, 3),  # (4, 1, 3, 3): 9 taps per channel
  "depthwise/bias": None,
  "conv1d/weight": (1, 2),  # (5, 3, 3)
  "conv1d/bias": None,
}


# Haiku


def _haiku_cnn(x):
  x = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(x))
  x = hk.LayerNorm(-1, create_scale=True, create_offset=True, name="norm")(x)
  return hk.Linear(3, name="head")(x.mean((1, 2)))


HAIKU_CNN = {
  "conv/w": (0, 1, 2),  # hk.Conv2D w is HWIO: (3, 3, 2, 4)
  "conv/b": None,
  "norm/scale": None,
  "norm/offset": None,
  "head/w": (0,),  # (4, 3)
  "head/b": None,
}


def _haiku_attention(tokens):
  x = hk.Embed(11, 6, name="embed")(tokens)
  attn = hk.MultiHeadAttention(2, 3, w_init=hk.initializers.VarianceScaling(), name="attn")
  x = x + attn(x, x, x)
  return hk.Linear(11, name="head")(hk.LayerNorm(-1, True, True, name="norm")(x))


# hk.MultiHeadAttention keeps its projections flat: query/key/value are
# hk.Linear(heads * key_size) and the output hk.Linear(model_size).
HAIKU_ATTENTION = {
  "embed/embeddings": None,  # (11, 6)
  "attn/query/w": (0,),  # (6, 2*3)
  "attn/query/b": None,
  "attn/key/w": (0,),
  "attn/key/b": None,
  "attn/value/w": (0,),
  "attn/value/b": None,
  "attn/linear/w": (0,),  # (2*3, 6)
  "attn/linear/b": None,
  "norm/scale": None,
  "norm/offset": None,
  "head/w": (0,),
  "head/b": None,
}


# ------------------------------------------------------------------ cases ---


# Inputs are NumPy arrays: each jnp op here would compile at import, for every case.


def _ones(*shape):
  return np.ones(shape, np.float32)


def _tokens(*shape):
  return np.arange(math.prod(shape), dtype=np.int32).reshape(shape) % 11


def _linen(model, *args, **kwargs):
  return lambda: (model, args, kwargs)


def _nnx(make, *args, **kwargs):
  # Abstract: only shapes matter, and a real init compiles one kernel per shape.
  return lambda: (nnx.eval_shape(lambda: make(nnx.Rngs(0))), args, kwargs)


def _eqx(make, *args, **kwargs):
  def build():
    # Zeros, not the random init (one compiled kernel per shape), but real
    # arrays: eqx.is_inexact_array, which users filter with, drops ShapeDtypeStructs.
    model = jax.tree.map(
      lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)) if _is_abstract(x) else x,
      eqx.filter_eval_shape(make),
      is_leaf=_is_abstract,
    )
    return model, args, kwargs

  return build


def _haiku(fn, *args):
  return lambda: (hk.transform(fn), args, {})


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
  Case("vit", "linen", _linen(ViT(), _ones(2, 8, 6, 5), np.zeros((2, 2, 2), bool)), VIT),
  Case("mlp_mixer", "linen", _linen(Mixer(), _ones(2, 12, 8, 3)), MIXER),
  Case("convnext", "linen", _linen(ConvNeXt(), _ones(2, 8, 8, 3)), CONVNEXT),
  Case("t5", "linen", _linen(T5(), _tokens(2, 7), _tokens(2, 4)), _t5()),
  Case("gpt_scan_bias", "linen", _linen(GPT(True), _tokens(2, 6)), _gpt(True), numeric=True),
  Case("gpt_scan_no_bias", "linen", _linen(GPT(False), _tokens(2, 6)), _gpt(False)),
  Case(
    "maxtext_unfused_axis1",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(False, 1, rngs=r), _tokens(2, 6)),
    _maxtext(False, 1),
  ),
  Case(
    "maxtext_fused_axis1",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(True, 1, rngs=r), _tokens(2, 6)),
    _maxtext(True, 1),
    numeric=True,
  ),
  Case(
    "maxtext_unfused_axis0",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(False, 0, rngs=r), _tokens(2, 6)),
    _maxtext(False, 0),
  ),
  Case(
    "maxtext_fused_axis0",
    "nnx",
    _nnx(lambda r: MaxTextTransformer(True, 0, rngs=r), _tokens(2, 6)),
    _maxtext(True, 0),
  ),
  Case(
    "gemma_nnx_gqa",
    "nnx",
    _nnx(lambda r: NnxGemma(6, 3, rngs=r), _tokens(2, 6)),
    _gemma("layers/{}", 6, 3, "embedder/input_embedding"),
    numeric=True,
  ),
  Case(
    "gemma_nnx_fused_qkv",
    "nnx",
    _nnx(lambda r: NnxGemma(2, 2, rngs=r), _tokens(2, 6)),
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
  Case("nnx_einsum_proj", "nnx", _nnx(EinsumProjAttention, _ones(2, 6, 12)), EINSUM_PROJ),
  Case("wav2vec_frontend", "linen", _linen(Wav2Vec(), _ones(2, 64, 1)), WAV2VEC),
  Case("mamba", "linen", _linen(MambaBlock(), _ones(2, 5, 6)), MAMBA),
  Case(
    "channels_first_pos_embed",
    "linen",
    _linen(ChannelsFirstPos(), _ones(2, 4, 8, 6)),
    CHANNELS_FIRST_POS,
  ),
  Case(
    "eqx_mlp",
    "equinox",
    _eqx(lambda: eqx.nn.MLP(5, 3, 7, 2, key=KEY), _ones(5)),
    EQX_MLP,
    "torch",
  ),
  Case(
    "eqx_cnn",
    "equinox",
    _eqx(lambda: EqxCNN(KEY), _ones(2, 8, 8)),
    EQX_CNN,
    "torch",
    numeric=True,
  ),
  Case(
    "eqx_attention",
    "equinox",
    _eqx(lambda: EqxAttention(KEY), _tokens(6)),
    EQX_ATTENTION,
    "torch",
  ),
  Case(
    "eqx_vmap_linear",
    "equinox",
    _eqx(lambda: EqxEnsemble(KEY), _ones(6)),
    EQX_ENSEMBLE,
    "torch",
    numeric=True,
  ),
  Case(
    "eqx_vmap_linear_no_bias",
    "equinox",
    _eqx(lambda: EqxEnsemble(KEY, use_bias=False), _ones(6)),
    EQX_ENSEMBLE_NO_BIAS,
    "torch",
  ),
  Case("haiku_mlp", "haiku", _haiku(_haiku_mlp, _ones(2, 3)), HAIKU_MLP),
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
  Case(
    "nnx_misc",
    "nnx",
    _nnx(NnxMisc, _ones(2, 5, 5, 4), _ones(2, 3, 4, 5), _ones(3, 2, 5), _ones(2, 1)),
    NNX_MISC,
    numeric=True,
  ),
  Case("stack_equal_linen", "linen", _linen(EqualStack(), _ones(2, 8)), STACK_EQUAL_LINEN),
  Case("stack_equal_nnx", "nnx", _nnx(NnxEqualStack, _ones(2, 8)), STACK_EQUAL_NNX, numeric=True),
  Case(
    "dropout_train",
    "linen",
    _linen(DropoutNet(), _ones(2, 4, 5), train=True),
    DROPOUT,
    rngs=_dropout_rngs,
  ),
  Case("bare_param", "linen", _linen(BareParamNet(), _ones(2, 5)), BARE_PARAM),
  # Failure classes: each reproduces a structure that real third-party models have.
  Case(
    "torch_port_linen",
    "linen",
    _linen(TorchPortMlp(), _ones(2, 5)),
    TORCH_PORT,
    preset_blind=frozenset({"fc2/kernel"}),
  ),
  Case("linen_jit_call", "linen", _linen(JitMlp(), _ones(2, 5)), JIT_MLP),
  Case("linen_remat_blocks", "linen", _linen(RematNet(), _ones(2, 3, 5)), REMAT),
  Case(
    "einsum_variants",
    "linen",
    _linen(EinsumVariants(), _ones(2, 4, 6), _ones(3, 2, 6)),
    EINSUM_VARIANTS,
  ),
  Case(
    "moe_ragged_dot",
    "nnx",
    _nnx(lambda r: NnxRaggedMoe(6, 8, 4, 2, rngs=r), _ones(2, 3, 6)),
    MOE_RAGGED,
    numeric=True,
  ),
  Case("moe_einsum", "linen", _linen(EinsumMoe(), _ones(2, 5, 6)), MOE_EINSUM),
  Case(
    "flat_attention_scan_axis1",
    "linen",
    _linen(FlatAttentionStack(), _tokens(2, 4)),
    FLAT_ATTENTION,
    numeric=True,
  ),
  Case("lstm_packed_scan", "linen", _linen(PackedLstm(), _ones(2, 4, 3)), LSTM),
  Case("eqx_gru", "equinox", _eqx(lambda: EqxGru(KEY), _ones(4, 3)), EQX_GRU, "torch"),
  Case("griffin_recurrent", "linen", _linen(GriffinBlock(), _ones(2, 5, 4)), GRIFFIN),
  Case(
    "eqx_fused_tied_lm", "equinox", _eqx(lambda: EqxFusedLm(KEY), _tokens(5)), EQX_FUSED, "torch"
  ),
  Case(
    "nnx_one_hot_tied",
    "nnx",
    _nnx(NnxOneHotLm, _tokens(2, 5), np.zeros((2, 5), np.int32)),
    ONE_HOT_LM,
  ),
  Case("weight_reparam", "linen", _linen(WeightReparamNet(), _ones(2, 5, 5, 2)), WEIGHT_REPARAM),
  Case("nnx_perceiver", "nnx", _nnx(NnxPerceiver, _ones(2, 5, 4)), PERCEIVER),
  Case("nnx_low_rank", "nnx", _nnx(NnxLowRank, _ones(2, 6)), LOW_RANK),
  Case("undecidable", "linen", _linen(Undecidable(), _ones(2, 5, 6)), UNDECIDABLE),
  Case("spectral_norm", "linen", _linen(SpectralNet(), _ones(2, 5)), SPECTRAL),
  Case(
    "conv_variants_linen",
    "linen",
    _linen(ConvVariants(), _ones(2, 4, 4, 4), _ones(2, 8, 3), _ones(2, 2, 4, 4, 3)),
    CONV_VARIANTS,
    numeric=True,
    preset_blind=frozenset({"up_t/kernel"}),
  ),
  Case(
    "eqx_custom_layers",
    "equinox",
    _eqx(lambda: EqxCustomNet(KEY), _ones(6, 6, 2)),
    EQX_CUSTOM,
    "torch",
    preset_blind=frozenset({"hidden/weight"}),
  ),
  Case(
    "eqx_summed_slices",
    "equinox",
    _eqx(lambda: EqxSummedSlices(KEY), _ones(9, 4)),
    EQX_SUMMED_SLICES,
    "torch",
  ),
  Case(
    "eqx_conv_variants",
    "equinox",
    _eqx(lambda: EqxConvVariants(KEY), _ones(3, 4, 4), _ones(3, 6)),
    EQX_CONV_VARIANTS,
    "torch",
  ),
  Case("haiku_cnn", "haiku", _haiku(_haiku_cnn, _ones(2, 6, 6, 2)), HAIKU_CNN),
  Case("haiku_attention", "haiku", _haiku(_haiku_attention, _tokens(2, 5)), HAIKU_ATTENTION),
]

CASES_BY_NAME = {case.name: case for case in CASES}


# --------------------------------------------------------------- summary ---


def rules_for_case(optax_gc, case):
  """``rules_for`` as a user calls it: the model and its forward inputs (Haiku: the
  function form, ``rules_for(apply, params, rng, *inputs)``)."""
  model, args, kwargs = case.built
  if case.framework == "haiku":
    return optax_gc.rules_for(model.apply, case.variables, None, *args, **kwargs)
  extra = {"rngs": case.rngs()} if case.rngs is not None else {}
  return optax_gc.rules_for(model, *args, **extra, **kwargs)


def summary(optax_gc):
  """Markdown table: per model, what rules_for gets wrong and leaves unchanged (and why), and
  what the preset alone gets wrong without saying so."""
  lines = [
    "| model | leaves | rules_for wrong | unchanged: table | untouched | undecided "
    "| preset wrong | of which unmarked |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for case in CASES:
    tree = case.params()
    shapes = {p: np.shape(leaf) for p, leaf in flat(tree).items()}
    want = {p: normalise(case.expected[p], shapes[p]) for p in shapes}
    rules = rules_for_case(optax_gc, case)
    plan = optax_gc.explain(tree, rules, preset=case.preset)
    wrong = sum(plan[p].axes != want[p] for p in want)
    kinds: dict[str, int] = {}
    for p in want:
      derived = plan[p].rule.table.get(p) if plan[p].rule and plan[p].rule.table else None
      if plan[p].axes is None and derived is not None:
        kind = "undecided" if derived.undecided else derived.kind
        kinds[kind] = kinds.get(kind, 0) + 1
    preset = optax_gc.explain(tree, preset=case.preset)
    missed = [p for p in want if preset[p].axes != want[p]]
    silent = sum(not (preset[p].guess or preset[p].undecided) for p in missed)
    counts = " | ".join(str(kinds.get(k, 0)) for k in ("table", "untouched", "undecided"))
    lines.append(f"| {case.name} | {len(want)} | {wrong} | {counts} | {len(missed)} | {silent} |")
  return "\n".join(lines)


if __name__ == "__main__":
  import optax_gc

  print(summary(optax_gc))
