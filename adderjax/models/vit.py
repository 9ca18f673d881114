"""A small Vision Transformer with adder attention (Shu et al., NeurIPS 2021).

Topology (pre-LayerNorm encoder, mean-pooled tokens):

==============  ======================================  ================
layer           shape (28x28x1 input, patch 7)          kind
==============  ======================================  ================
patch_embed     7x7 stride 7 conv: 4x4 = 16 tokens      full precision
pos_embed       learned, added                          --
block_i.attn    :class:`AdderMultiHeadAttention`        model kind
block_i.mlp     hidden -> mlp_dim -> hidden, GELU       model kind
final_ln, mean  LayerNorm, mean over tokens             --
fc              hidden -> num_classes (with bias)       full precision
==============  ======================================  ================

As everywhere in the zoo the stem and classifier stay full precision and
BatchNorm follows every body layer: the four projections of each attention
(over the features of all tokens, ``projection_norm``) and both MLP layers.
An adder layer's outputs ``-sum|x - w|`` carry a per-feature offset that
grows with the kernel norm; the normalisation removes it, as in the adder
CNNs. The CNN kind has the same BatchNorms, so the kinds differ only in
their layers.

The attention of each kind (``attention='auto'``): ``'l1'`` (negative l1
distance scores, :func:`adderjax.attention.l1_scores`) for the adder kind,
``'dot'`` for the CNN kind; ``attention='dot'`` with ``kind='adder'`` is the
"adder-linear" ViT (adder projections, dot-product scores). ``identity`` is
the rank fix of :mod:`adderjax.attention` (used with l1 scores only;
``'none'`` turns it off).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adderjax import _checks
from adderjax import attention as attention_ops
from adderjax import linen as adder_linen
from adderjax.models.common import _layer_name  # pylint: disable=protected-access
from adderjax.models.common import ZooModel

POOLS = ('mean', 'cls')
ATTENTIONS = ('l1', 'dot')
#: Values of ``ViT.identity``.
IDENTITIES = attention_ops.IDENTITY_MODES + ('none',)


def _is_subclass(layer, cls) -> bool:
  while isinstance(layer, functools.partial):
    layer = layer.func
  return isinstance(layer, type) and issubclass(layer, cls)


class ViT(ZooModel):
  """A Vision Transformer in the zoo's kinds (``cnn`` and ``adder``).

  Attributes:
    patch_size: square patch side (divides the image's height and width).
    hidden: token width.
    depth: number of encoder blocks.
    num_heads: attention heads (divides ``hidden``).
    mlp_dim: hidden width of each MLP.
    attention: ``'l1'``, ``'dot'`` or ``'auto'`` (``'l1'`` with adder
      projections, ``'dot'`` with multiplying ones).
    identity: the rank fix of l1 attention, ``'output'``, ``'logits'`` or
      ``'none'`` (ignored for dot-product attention).
    identity_weight: its ``lambda``.
    pool: ``'mean'`` over the tokens or a learned ``'cls'`` token.
    (others): see :class:`adderjax.models.common.ZooModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import create_model
    >>> model = create_model('vit_tiny', kind='adder', num_classes=10,
    ...                      depth=2, hidden=32)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> v = jax.eval_shape(
    ...     lambda x: model.init(jax.random.key(0), x, train=False), x)
    >>> v['params']['block0']['attn']['query']['kernel'].shape
    (32, 4, 8)
    >>> jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape
    (2, 10)
  """
  patch_size: int = 7
  hidden: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  attention: str = 'auto'
  identity: str = 'output'
  identity_weight: float = 1.0
  pool: str = 'mean'

  def check_fields(self) -> None:
    super().check_fields()
    for name in ('patch_size', 'hidden', 'depth', 'num_heads', 'mlp_dim'):
      _checks.positive_int(name, getattr(self, name))
    if self.hidden % self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} does not divide '
                       f'hidden={self.hidden}.')
    _checks.choice('attention', self.attention, ATTENTIONS + ('auto',))
    _checks.choice('identity', self.identity, IDENTITIES)
    _checks.finite_number('identity_weight', self.identity_weight, low=0)
    _checks.choice('pool', self.pool, POOLS)
    self.projection()

  def projection(self) -> str:
    """``'adder'`` or ``'dense'``: the attention projections of the kind."""
    if _is_subclass(self.dense, adder_linen.AdderDense):
      return 'adder'
    if _is_subclass(self.dense, nn.Dense):
      return 'dense'
    raise ValueError(
        'the ViT builds its attention from adder or multiplying projections '
        "(kind 'adder' or 'cnn'); the body dense layer "
        f'{_layer_name(self.dense)} is neither (the '
        "'bnn' kind has no binary attention).")

  def scores(self) -> str:
    """The attention scores: ``attention``, or the kind's default."""
    if self.attention != 'auto':
      return self.attention
    return 'l1' if self.projection() == 'adder' else 'dot'

  def attention_layer(self, train: bool):
    """The attention class of the blocks (call with ``name=``)."""
    scores = self.scores()
    kwargs = self._layer_kwargs(self.dense)
    return functools.partial(
        adder_linen.AdderMultiHeadAttention,
        num_heads=self.num_heads, dtype=self.dtype, use_bias=False,
        projection=self.projection(), score=scores,
        identity=(self.identity if scores == 'l1' and self.identity != 'none'
                  else None),
        identity_weight=self.identity_weight,
        projection_norm=self.norm(train), **kwargs)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x)
    self.check_input(x, 'ViT')
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'patch_size={p} does not divide the image size '
                       f'{x.shape[1]}x{x.shape[2]} (input shape {x.shape}).')
    norm = self.norm(train)
    dense = self.body_dense()
    x = self.first_conv(self.hidden, (p, p), strides=(p, p), padding='VALID',
                        dtype=self.dtype, name='patch_embed')(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros_init(), (1, 1, c))
      x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)).astype(x.dtype),
                           x], axis=1)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (1, x.shape[1], c))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(
          attention=self.attention_layer(train), dense=dense,
          norm=norm, mlp_dim=self.mlp_dim, dtype=self.dtype,
          name=f'block{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype, name='final_ln')(x)
    x = x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
    if self.head == 'slac':
      x = self.slac_head()(name='fc')(x)
    else:
      x = self.classifier(self.num_classes, dtype=self.dtype, name='fc')(x)
    return jnp.asarray(x, jnp.float32)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

  The MLP is ``dense -> norm -> GELU -> dense -> norm``.

  Attributes:
    attention: ``attention(name=...)`` builds the attention module.
    dense: the body dense layer (``nn.Dense`` signature).
    norm: the normalisation after each MLP layer (``name=`` call).
    mlp_dim: the MLP's hidden width.
    dtype: computation dtype.
  """
  attention: Any
  dense: Any
  norm: Any
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    x = x + self.attention(name='attn')(y)
    y = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    y = self.dense(self.mlp_dim, name='mlp1')(y)
    y = nn.gelu(self.norm(name='mlp1_bn')(y))
    y = self.dense(x.shape[-1], name='mlp2')(y)
    return x + self.norm(name='mlp2_bn')(y)
