"""Adder attention: l1-distance attention scores and the attention built on them.

The multiplication-free attention of Shu et al. ("Adder Attention for Vision
Transformer", NeurIPS 2021) replaces the query-key product with the negative
l1 distance, ``s_ij = -sum_d |q_id - k_jd|``. There is no public code; the
choices below are ours, each documented where it is made, and
``experiments/results/vit`` measures the alternatives.

* :func:`l1_scores` is the reduction of :func:`adderjax.adder_dense` with one
  "kernel" (the keys) per batch element and head: all of them run as ONE
  grouped adder convolution (``feature_group_count = batch x heads``, the
  queries as the convolution's batch), so every backend of
  :mod:`adderjax.ops` (the patch-free XLA kernels, the Pallas kernels on GPU
  and TPU) computes it and no ``[B, H, Lq, Lk, D]`` tensor is built.
* Gradients: queries and keys are both activations, so both get the paper's
  activation gradient (eq. 6-7 for ``grad='full_precision'``):
  ``dq_i = sum_j g_ij HardTanh(k_j - q_i)`` and
  ``dk_j = sum_i g_ij HardTanh(q_i - k_j)``; ``'sign'`` gives the exact
  subgradient and ``'unclipped'`` drops the HardTanh. (The paper's
  unclipped ``X - F`` filter gradient is meant for weights trained with the
  adaptive learning rate; keys are not weights.)
* Scale: the l1 score of two independent standard normal vectors of size
  ``D`` has standard deviation ``sqrt(2 (1 - 2/pi) D)`` (``|N(0, 2)|`` has
  variance ``2 (1 - 2/pi)``), where their dot product has ``sqrt(D)``.
  :func:`default_scale` is the inverse of that spread, so the logits have unit
  variance over random query-key pairs, as ``dot_product_attention``'s
  ``q.k / sqrt(D)`` do. (Over the keys of one fixed query the l1 spread is a
  little smaller, ``sqrt(0.564 D)``: part of the variance is the query's own
  offset, which the softmax removes.)
* Identity (the rank fix): an attention map built from distances is close to
  low rank (neighbouring queries see almost the same distances to every
  key). ``identity='output'`` mixes the identity into the normalised map,
  ``A' = (A + lambda I) / (1 + lambda)`` (rows still sum to 1, eigenvalues
  moved away from 0), computed as ``(A v + lambda v) / (1 + lambda)``
  without forming ``I``; ``identity='logits'`` adds ``lambda`` to the
  diagonal logits before the softmax; ``None`` leaves the map alone. Both
  need self-attention (as many queries as keys).
* Attention times values stays a (multiplying) weighted average: the weights
  are a softmax, which multiplies and exponentiates anyway.

Examples:
  >>> import jax.numpy as jnp
  >>> from adderjax import attention
  >>> q = jnp.array([[[[0., 1.]]], [[[2., 2.]]]])   # [B=2, L=1, H=1, D=2]
  >>> k = jnp.array([[[[1., 1.]], [[0., 0.]]]] * 2)  # [B=2, L=2, H=1, D=2]
  >>> attention.l1_scores(q, k).tolist()            # -(|q - k|_1)
  [[[[-1.0, -1.0]]], [[[-2.0, -4.0]]]]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from adderjax import _checks
from adderjax.ops import adder as adder_ops
from adderjax.ops import backends
from adderjax.ops import geometry
from adderjax.ops import platform_dispatch

#: Values of ``identity`` (the rank fix), ``None`` for none.
IDENTITY_MODES = ('output', 'logits')

#: Score functions of :class:`adderjax.linen.AdderMultiHeadAttention`.
SCORES = ('l1', 'dot')

#: Standard deviation of ``|a - b|`` for independent standard normals ``a, b``.
_ABS_DIFF_STD = math.sqrt(2.0 * (1.0 - 2.0 / math.pi))


def default_scale(head_dim: int) -> float:
  """The logit scale of l1 scores: ``1 / sqrt(2 (1 - 2/pi) head_dim)``.

  With queries and keys of i.i.d. standard normal entries, the scaled scores
  have unit variance over random query-key pairs, as ``q.k / sqrt(head_dim)``
  has in dot-product attention.

  Examples:
    >>> round(default_scale(64), 4)
    0.1466
  """
  head_dim = _checks.positive_int('head_dim', head_dim)
  return 1.0 / (_ABS_DIFF_STD * math.sqrt(head_dim))


@dataclasses.dataclass(frozen=True)
class _ScoreConfig:
  geo_q: geometry.ConvGeometry   # queries as the batch, keys as kernels
  geo_k: geometry.ConvGeometry   # keys as the batch, queries as kernels
  groups: int
  grad: str
  backend: str | None
  precision: Any


def _as_kernel(x: jax.Array, groups: int) -> jax.Array:
  """``(L, 1, G*D)`` vectors as the grouped dense kernel ``(1, D, G*L)``."""
  length = x.shape[0]
  d = x.shape[-1] // groups
  return x.reshape(length, groups, d).transpose(2, 1, 0).reshape(
      1, d, groups * length)


def _transpose_scores(y: jax.Array, groups: int) -> jax.Array:
  """``(Lq, 1, G*Lk)`` scores as ``(Lk, 1, G*Lq)`` (the keys' view)."""
  lq = y.shape[0]
  lk = y.shape[-1] // groups
  return y.reshape(lq, groups, lk).transpose(2, 1, 0).reshape(
      lk, 1, groups * lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scores(q: jax.Array, k: jax.Array, cfg: _ScoreConfig) -> jax.Array:
  return _scores_fwd(q, k, cfg)[0]


def _scores_fwd(q, k, cfg: _ScoreConfig):
  backend = backends.get(cfg.backend)
  y = backend.forward(q, _as_kernel(k, cfg.groups), cfg.geo_q,
                      precision=cfg.precision)
  return y.astype(q.dtype), (q, k)


def _scores_bwd(cfg: _ScoreConfig, res, g):
  q, k = res
  backend = backends.get(cfg.backend)
  dq = backend.input_grad(q, _as_kernel(k, cfg.groups), g, cfg.geo_q,
                          cfg.grad, precision=cfg.precision)
  dk = backend.input_grad(k, _as_kernel(q, cfg.groups),
                          _transpose_scores(g, cfg.groups), cfg.geo_k,
                          cfg.grad, precision=cfg.precision)
  return dq.astype(q.dtype), dk.astype(k.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


def _check_qk(query, key) -> tuple[jax.Array, jax.Array]:
  adder_ops._check_dtype('query', query)  # pylint: disable=protected-access
  adder_ops._check_dtype('key', key)  # pylint: disable=protected-access
  query, key = jnp.asarray(query), jnp.asarray(key)
  if query.ndim < 3 or key.ndim != query.ndim:
    raise ValueError(
        f'query and key must be [batch..., length, heads, head_dim] with the '
        f'same rank (at least 3), got query shape {query.shape} and key shape '
        f'{key.shape}.')
  if query.shape[:-3] != key.shape[:-3]:
    raise ValueError(f'query and key batch dims differ: query shape '
                     f'{query.shape}, key shape {key.shape}.')
  if query.shape[-2:] != key.shape[-2:]:
    raise ValueError(f'query and key must have the same heads and head_dim '
                     f'(the last two axes), got query shape {query.shape} '
                     f'and key shape {key.shape}.')
  if query.shape[-1] == 0:
    raise ValueError(f'head_dim is 0 (query shape {query.shape}): an l1 '
                     'distance needs at least one feature.')
  return query, key


def l1_scores(query: jax.Array, key: jax.Array, *,
              grad: str = 'full_precision',
              implementation: str | None = None,
              precision: Any = None) -> jax.Array:
  """Negative l1 distances between queries and keys, per head.

  ``s[..., h, i, j] = -sum_d |query[..., i, h, d] - key[..., j, h, d]|``, in
  the layout of ``flax.linen.dot_product_attention_weights``' logits.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``, floating.
    key: ``[batch..., kv_length, heads, head_dim]``, same batch dims, heads
      and head_dim.
    grad: backward pass for both operands (``'full_precision'``: the paper's
      HardTanh gradient of activations, eq. 6-7; ``'sign'``: exact
      subgradient; ``'unclipped'``: ``k - q`` and ``q - k``).
    implementation: adder backend (``None``: by platform, as
      :func:`adderjax.adder_conv`).
    precision: matmul precision of the backward pass where it uses one.

  Returns:
    ``[batch..., heads, q_length, kv_length]`` scores (``<= 0``) in the
    promoted dtype, accumulated in float32.

  Raises:
    TypeError: non-floating inputs.
    ValueError: mismatched shapes, an unknown ``grad`` or ``implementation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> q = jnp.ones((2, 5, 4, 8))
    >>> k = jnp.zeros((2, 7, 4, 8))
    >>> s = l1_scores(q, k)
    >>> s.shape, float(s[0, 0, 0, 0])
    ((2, 4, 5, 7), -8.0)
  """
  query, key = _check_qk(query, key)
  adder_ops.check_grad(grad)
  adder_ops.check_precision(precision)
  implementation = backends.resolve(implementation)
  precision = adder_ops._hashable_precision(precision)  # pylint: disable=protected-access
  local = functools.partial(_local_scores, grad=grad,
                            implementation=implementation,
                            precision=precision)
  # Under a mesh context (jax.set_mesh, the experiments' runners) the
  # example batch is split with shard_map, so that each device computes its
  # own examples' scores (the grouped convolution folds the batch into its
  # groups, which XLA's partitioner would otherwise gather, and a Pallas
  # call cannot be partitioned at all).
  if query.ndim <= 3:  # no batch axis to split
    return local(query, key)
  return platform_dispatch.per_batch_shard(local, 2)(query, key)


def _local_scores(query, key, *, grad, implementation, precision):
  """:func:`l1_scores` of checked arguments, on the local batch."""
  dtype = jnp.result_type(query.dtype, key.dtype)
  *batch, lq, heads, d = query.shape
  lk = key.shape[-3]
  nb = math.prod(batch)
  groups = nb * heads
  out_shape = (*batch, heads, lq, lk)
  if groups == 0 or lq == 0 or lk == 0:
    return jnp.zeros(out_shape, dtype)
  # Each (batch, head) pair is one group of a grouped dense adder layer:
  # the queries are the layer's batch, the keys its output features.
  q = query.astype(dtype).reshape(nb, lq, heads, d).transpose(1, 0, 2, 3)
  q = q.reshape(lq, 1, groups * d)
  k = key.astype(dtype).reshape(nb, lk, heads, d).transpose(1, 0, 2, 3)
  k = k.reshape(lk, 1, groups * d)
  geo_q = geometry.make_geometry(q.shape, (1, d, groups * lk), 1, 'VALID', 1,
                                 groups)
  geo_k = geometry.make_geometry(k.shape, (1, d, groups * lq), 1, 'VALID', 1,
                                 groups)
  cfg = _ScoreConfig(geo_q, geo_k, groups, grad, implementation, precision)
  y = _scores(q, k, cfg)                                 # (Lq, 1, G*Lk)
  y = y.reshape(lq, nb, heads, lk).transpose(1, 2, 0, 3)
  return checkpoint_name(y.reshape(out_shape), adder_ops.ADDER_OUTPUT)


def _check_identity(identity, identity_weight, lq: int, lk: int) -> float:
  if identity is not None and identity not in IDENTITY_MODES:
    raise ValueError(f'identity must be None or one of {IDENTITY_MODES}, got '
                     f'{identity!r}.')
  weight = _checks.finite_number('identity_weight', identity_weight, low=0)
  if identity is not None and lq != lk:
    raise ValueError(
        f'identity={identity!r} adds the identity to the attention map, '
        f'which needs self-attention (as many queries as keys); got '
        f'{lq} queries and {lk} keys. Use identity=None for cross-attention.')
  return weight


def _masked_softmax(logits, bias, mask, dtype):
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def attention_weights(query: jax.Array, key: jax.Array, *,
                      score: str = 'l1',
                      bias: jax.Array | None = None,
                      mask: jax.Array | None = None,
                      scale: float | None = None,
                      identity: str | None = 'output',
                      identity_weight: float = 1.0,
                      grad: str = 'full_precision',
                      implementation: str | None = None,
                      precision: Any = None,
                      dtype: Any = None) -> jax.Array:
  """The attention map ``softmax(scale * scores + bias)``, masked.

  With ``identity='output'`` the map returned is ``(A + lambda I) / (1 +
  lambda)``; with ``'logits'`` the diagonal logits get ``+ lambda`` before
  the softmax (module docstring). :func:`attention` applies the ``'output'``
  identity without forming ``I``; use this function to look at the map
  (e.g. :func:`effective_rank`).

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, heads, head_dim]``.
    score: ``'l1'`` (:func:`l1_scores`) or ``'dot'`` (``q . k``).
    bias: added to the scaled logits, broadcastable to
      ``[batch..., heads, q_length, kv_length]``.
    mask: boolean, same broadcasting; ``False`` entries get no weight.
    scale: logit scale (``None``: :func:`default_scale` for ``'l1'``,
      ``1 / sqrt(head_dim)`` for ``'dot'``).
    identity: ``None``, ``'output'`` or ``'logits'`` (the rank fix).
    identity_weight: ``lambda >= 0``.
    grad, implementation, precision: of :func:`l1_scores`.
    dtype: of the result (``None``: the promoted input dtype).

  Returns:
    ``[batch..., heads, q_length, kv_length]`` rows summing to one.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (1, 3, 1, 4))
    >>> w = attention_weights(q, q, identity='output', identity_weight=1.0)
    >>> w.shape, bool(jnp.allclose(w.sum(-1), 1.0))
    ((1, 1, 3, 3), True)
    >>> bool((jnp.diagonal(w[0, 0]) >= 0.5).all())  # (A + I) / 2
    True
  """
  query, key = _check_qk(query, key)
  _checks.choice('score', score, SCORES)
  lq, lk, d = query.shape[-3], key.shape[-3], query.shape[-1]
  weight = _check_identity(identity, identity_weight, lq, lk)
  dtype = dtype or jnp.result_type(query.dtype, key.dtype)
  if scale is None:
    scale = default_scale(d) if score == 'l1' else 1.0 / math.sqrt(d)
  else:
    scale = _checks.finite_number('scale', scale, low=0, low_open=True)
  if score == 'l1':
    s = l1_scores(query, key, grad=grad, implementation=implementation,
                  precision=precision)
  else:
    s = jnp.einsum('...qhd,...khd->...hqk', query, key, precision=precision)
  logits = s.astype(jnp.float32) * scale
  if identity == 'logits':
    logits = logits + weight * jnp.eye(lq, dtype=jnp.float32)
  w = _masked_softmax(logits, bias, mask, jnp.float32)
  if identity == 'output':
    w = (w + weight * jnp.eye(lq, dtype=jnp.float32)) / (1.0 + weight)
  return w.astype(dtype)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              score: str = 'l1',
              bias: jax.Array | None = None,
              mask: jax.Array | None = None,
              scale: float | None = None,
              identity: str | None = 'output',
              identity_weight: float = 1.0,
              dropout_rng: jax.Array | None = None,
              dropout_rate: float = 0.0,
              broadcast_dropout: bool = True,
              deterministic: bool = True,
              grad: str = 'full_precision',
              implementation: str | None = None,
              precision: Any = None,
              dtype: Any = None) -> jax.Array:
  """Adder attention, a drop-in for ``flax.linen.dot_product_attention``.

  ``out = A v`` with ``A`` of :func:`attention_weights`; with
  ``identity='output'``, ``out = (A v + lambda v) / (1 + lambda)`` (the
  identity is not formed). Dropout (when ``deterministic`` is False) drops
  entries of ``A``, as flax does, before the identity is mixed in.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, heads, head_dim]``.
    value: ``[batch..., kv_length, heads, v_dim]``.
    score, bias, mask, scale, identity, identity_weight: of
      :func:`attention_weights`.
    dropout_rng: key for attention dropout (needed when dropping).
    dropout_rate: probability of dropping an attention weight.
    broadcast_dropout: one dropout mask for all batch dims and heads.
    deterministic: no dropout.
    grad, implementation, precision: of :func:`l1_scores`.
    dtype: of the result (``None``: promoted).

  Returns:
    ``[batch..., q_length, heads, v_dim]``.

  Raises:
    ValueError: mismatched shapes, an unknown ``score`` / ``identity``, an
      identity with cross-attention, ``dropout_rate`` outside [0, 1), or
      dropout without ``dropout_rng``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 6, 3, 8))
    >>> attention(x, x, x).shape
    (2, 6, 3, 8)
  """
  out, _ = attend(
      query, key, value, score=score, bias=bias, mask=mask, scale=scale,
      identity=identity, identity_weight=identity_weight,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout, deterministic=deterministic,
      grad=grad, implementation=implementation, precision=precision,
      dtype=dtype, return_weights=False)
  return out


def attend(query, key, value, *, score, bias, mask, scale, identity,
           identity_weight, dropout_rng, dropout_rate, broadcast_dropout,
           deterministic, grad, implementation, precision, dtype,
           return_weights: bool):
  """:func:`attention` and (with ``return_weights``) its map, for modules.

  The map returned is the one applied to ``value``: dropout and the
  ``'output'`` identity included (``None`` without ``return_weights``).
  """
  query, key = _check_qk(query, key)
  adder_ops._check_array('value', value)  # pylint: disable=protected-access
  value = jnp.asarray(value)
  if value.shape[:-1] != key.shape[:-1]:
    raise ValueError(f'value must be [batch..., kv_length, heads, v_dim] '
                     f'matching key shape {key.shape} but for the last axis, '
                     f'got value shape {value.shape}.')
  rate = _checks.finite_number('dropout_rate', dropout_rate, low=0, high=1,
                               high_open=True)
  weight = _check_identity(identity, identity_weight, query.shape[-3],
                           key.shape[-3])
  dtype = dtype or jnp.result_type(query.dtype, key.dtype, value.dtype)
  output_identity = identity == 'output'
  w = attention_weights(
      query, key, score=score, bias=bias, mask=mask, scale=scale,
      identity=None if output_identity else identity,
      identity_weight=identity_weight, grad=grad,
      implementation=implementation, precision=precision, dtype=jnp.float32)
  if not deterministic and rate > 0:
    if dropout_rng is None:
      raise ValueError(f'dropout_rate={rate} with deterministic=False needs a '
                       'dropout_rng.')
    keep = 1.0 - rate
    shape = list(w.shape)
    if broadcast_dropout:  # one mask for every batch dim and head (flax)
      shape[:-2] = [1] * (len(shape) - 2)
    kept = jax.random.bernoulli(dropout_rng, keep, tuple(shape))
    w = jnp.where(kept, w / keep, 0.0)
  out = jnp.einsum('...hqk,...khd->...qhd', w.astype(dtype),
                   value.astype(dtype), precision=precision)
  if output_identity:
    out = (out + weight * value.astype(dtype)) / (1.0 + weight)
  if not return_weights:
    return out.astype(dtype), None
  if output_identity:
    w = (w + weight * jnp.eye(w.shape[-1], dtype=w.dtype)) / (1.0 + weight)
  return out.astype(dtype), w


def effective_rank(weights: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Entropy effective rank of attention maps (Roy and Vetterli, 2007).

  ``exp(-sum_i p_i log p_i)`` with ``p = sigma / sum(sigma)`` over the
  singular values ``sigma`` of each ``[q_length, kv_length]`` map: ``L`` for
  an orthogonal map, 1 for a rank-one one (e.g. every query attending
  alike).

  Args:
    weights: ``[..., q_length, kv_length]``.
    eps: floor of ``p`` inside the logarithm.

  Returns:
    ``[...]`` effective ranks (float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> float(effective_rank(jnp.eye(4)))
    4.0
    >>> round(float(effective_rank(jnp.full((4, 4), 0.25))), 3)
    1.0
  """
  adder_ops._check_array('weights', weights)  # pylint: disable=protected-access
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim < 2:
    raise ValueError(f'weights must have at least 2 axes [..., q_length, '
                     f'kv_length], got shape {weights.shape}.')
  sigma = jnp.linalg.svd(weights, compute_uv=False)
  p = sigma / jnp.maximum(sigma.sum(-1, keepdims=True), eps)
  return jnp.exp(-jnp.sum(jnp.where(p > eps, p * jnp.log(p), 0.0), -1))
