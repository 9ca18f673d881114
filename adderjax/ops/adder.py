"""Public adder ops: :func:`.adder_conv` and :func:`.adder_dense`.

The public functions validate their arguments (raising errors that name the
bad value) and call one private ``jax.custom_vjp`` whose backward pass is the
paper's (Chen et al., 2020, section 3.2), selectable by ``grad``:

* ``'full_precision'`` (default): ``dY/dF = X - F`` (eq. 5) and
  ``dY/dX = HardTanh(F - X)`` (eq. 6-7).
* ``'sign'``: the exact subgradients ``sgn(X - F)`` and ``sgn(F - X)`` (eq. 3).
* ``'unclipped'``: ``X - F`` and ``F - X`` without HardTanh (ablation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from adderjax.ops import backends
from adderjax.ops import geometry
from adderjax.ops import platform_dispatch
from adderjax.ops.geometry import GRAD_MODES, PaddingLike

_F32 = jnp.float32

#: ``checkpoint_name`` of every output of :func:`~adderjax.adder_conv` and
#: :func:`~adderjax.adder_dense` (what :mod:`adderjax.remat`'s policy keeps).
ADDER_OUTPUT = 'adderjax_adder_output'


@dataclasses.dataclass(frozen=True)
class _Config:
  geo: geometry.ConvGeometry
  grad: str
  backend: str | None  # None: chosen at lowering (backends.AUTO)
  precision: Any


def _check_array(name: str, a) -> None:
  """An op input must be an array (a Python list or None is refused)."""
  if a is None or isinstance(a, (list, tuple, str, dict)):
    raise TypeError(f'{name} must be an array (jax.Array or numpy.ndarray), '
                    + ('got None.' if a is None else
                       f'got {type(a).__name__}; wrap it in jnp.asarray(...).'))


def _check_reduction(kernel_shape: tuple[int, ...]) -> None:
  """The l1 reduction (kernel taps x input features) must not be empty."""
  if any(d == 0 for d in kernel_shape[:-1]):
    raise ValueError(
        f'kernel has shape {kernel_shape}: an empty reduction (a zero kernel '
        'size or zero input features per group); an adder layer needs at '
        'least one input feature and one tap.')


def _check_dtype(name: str, a) -> None:
  _check_array(name, a)
  dtype = jnp.result_type(a)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} must have a floating dtype (float32, bfloat16, '
                    f'float16), got {dtype}.')


def check_grad(grad: str) -> None:
  """Raises ``ValueError`` for an unknown gradient mode."""
  if not isinstance(grad, str) or grad not in GRAD_MODES:
    raise ValueError(f'grad must be one of {GRAD_MODES}, got {grad!r}.')


def _hashable_precision(precision):
  if isinstance(precision, list):
    return tuple(precision)
  return precision


@functools.lru_cache(maxsize=64)
def _check_precision_cached(precision) -> None:
  a = jax.ShapeDtypeStruct((1, 1), _F32)
  try:
    jax.eval_shape(lambda u, v: jax.lax.dot(u, v, precision=precision), a, a)
  except (ValueError, TypeError) as e:
    raise ValueError(f'precision must be None, a lax.Precision, its name '
                     f"('default', 'high', 'highest'), a pair of these or a "
                     f'dot algorithm preset, got {precision!r}.') from e


def check_precision(precision) -> None:
  """Raises ``ValueError`` now for a precision the backward pass would reject."""
  precision = _hashable_precision(precision)
  try:
    hash(precision)
  except TypeError:
    raise ValueError(f'precision must be None, a lax.Precision, its name or '
                     f'a pair of these, got {precision!r}.') from None
  _check_precision_cached(precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _adder(x: jax.Array, kernel: jax.Array, cfg: _Config) -> jax.Array:
  return _adder_fwd(x, kernel, cfg)[0]


def _adder_fwd(x, kernel, cfg: _Config):
  geo = cfg.geo
  if not geo.batch:  # Empty batch: an empty output, as lax.conv gives.
    return jnp.zeros(geo.out_shape, x.dtype), (x, kernel)
  backend = backends.get(cfg.backend)
  y = backend.forward(x, kernel, geo, precision=cfg.precision)
  return y.astype(x.dtype), (x, kernel)


def _adder_bwd(cfg: _Config, res, g):
  x, kernel = res
  geo = cfg.geo
  if not geo.batch:
    return jnp.zeros_like(x), jnp.zeros_like(kernel)
  backend = backends.get(cfg.backend)
  dx = backend.input_grad(x, kernel, g, geo, cfg.grad, precision=cfg.precision)
  dk = backend.weight_grad(x, kernel, g, geo, cfg.grad,
                           precision=cfg.precision)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_adder.defvjp(_adder_fwd, _adder_bwd)


def adder_conv(x: jax.Array,
               kernel: jax.Array,
               strides: int | tuple[int, ...] = 1,
               padding: PaddingLike = 'SAME',
               kernel_dilation: int | tuple[int, ...] = 1,
               feature_group_count: int = 1,
               *,
               grad: str = 'full_precision',
               implementation: str | None = None,
               precision: Any = None) -> jax.Array:
  """Adder convolution: the negative l1 distance between patches and filters.

  ``y[n, o, t] = -sum_{i, c} |x_pad[n, o * s + i * d, c] - kernel[i, c, t]|``,
  the cross-correlation of ``lax.conv_general_dilated`` with the product
  replaced by ``-|a - b|`` (paper eq. 2). Zero padding pads ``x`` with zeros,
  and those zeros enter the distance, as in the paper's code.

  Args:
    x: feature-last input ``(N, *spatial, C_in)`` with 1, 2 or 3 spatial dims
      (NWC, NHWC, NDHWC).
    kernel: ``(*kernel_size, C_in // feature_group_count, C_out)``, the layout
      of ``flax.linen.Conv``'s kernel.
    strides: an int or one int per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, an int, one int per spatial dim, or one
      ``(lo, hi)`` pair per spatial dim.
    kernel_dilation: an int or one int per spatial dim.
    feature_group_count: number of groups; ``C_in`` gives a depthwise layer.
    grad: backward pass, ``'full_precision'`` (paper), ``'sign'`` (exact
      subgradient) or ``'unclipped'`` (full precision without HardTanh).
    implementation: ``None`` (chosen by the platform the computation is
      lowered for: XLA on CPU, the Pallas kernels on GPU and TPU, AOT
      compiles included; see :mod:`adderjax.ops.backends`), ``'xla'`` or a
      registered backend such as ``'pallas'``.
    precision: matmul precision of the weight gradient (``lax.Precision``).

  Returns:
    ``(N, *out_spatial, C_out)`` in the promoted dtype of ``x`` and ``kernel``
    (accumulated in float32). Every entry is ``<= 0``. A NaN or infinite
    input makes exactly the outputs whose windows read it NaN or ``-inf``,
    as float32 arithmetic on ``-sum |x - w|`` does; a sum beyond the float32
    range is ``-inf``, never NaN.

  Raises:
    TypeError: non-floating ``x`` or ``kernel``, or padding of a wrong type.
    ValueError: mismatched ranks or channels, groups that do not divide the
      features, bad padding, non-positive strides or dilations, an unknown
      ``grad`` or ``implementation``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax import adder_conv
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> w = jnp.zeros((3, 3, 3, 4))
    >>> adder_conv(x, w, padding='VALID').shape
    (2, 6, 6, 4)
    >>> float(adder_conv(x, w, padding='VALID')[0, 0, 0, 0])  # -sum |1 - 0|
    -27.0

  References:
    Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
    Learning?", CVPR 2020. https://arxiv.org/abs/1912.13200
  """
  _check_dtype('x', x)
  _check_dtype('kernel', kernel)
  check_grad(grad)
  check_precision(precision)
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  _check_reduction(kernel.shape)
  geo = geometry.make_geometry(x.shape, kernel.shape, strides, padding,
                               kernel_dilation, feature_group_count)
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  cfg = _Config(geo, grad, backends.resolve(implementation),
                _hashable_precision(precision))
  backends.check_symbolic(cfg.backend, geo)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if _explicit_batch_spec(x, 'adder_conv') is None:
    y = _adder(x, kernel, cfg)
  else:
    y = platform_dispatch.per_batch_shard(
        functools.partial(_local_adder, cfg=cfg), 1)(x, kernel)
  return checkpoint_name(y, ADDER_OUTPUT)


def _local_adder(x, kernel, cfg: _Config) -> jax.Array:
  """The layer on one shard of an explicitly sharded batch.

  Under Explicit mesh axes every op needs a sharding rule, and the layer's
  weight gradient contracts the batch, which jax will not partition without
  being told how; so ``adder_conv`` runs the layer per shard (the kernel's
  gradient summed over the shards), here with the shard's geometry.
  """
  geo = dataclasses.replace(cfg.geo, in_shape=tuple(x.shape))
  return _adder(x, kernel, dataclasses.replace(cfg, geo=geo))


def adder_dense(x: jax.Array,
                kernel: jax.Array,
                *,
                grad: str = 'full_precision',
                implementation: str | None = None,
                precision: Any = None) -> jax.Array:
  """Fully connected adder layer: ``y[..., t] = -sum_k |x[..., k] - W[k, t]|``.

  Args:
    x: ``(..., K)`` with any number of leading batch dims (at least one axis).
    kernel: ``(K, T)``, the layout of ``flax.linen.Dense``'s kernel.
    grad: ``'full_precision'``, ``'sign'`` or ``'unclipped'`` (see
      :func:`adder_conv`).
    implementation: ``None``, ``'xla'`` or a registered accelerator backend.
    precision: matmul precision of the weight gradient.

  Returns:
    ``(..., T)`` in the promoted dtype of ``x`` and ``kernel``.

  Raises:
    TypeError: non-floating inputs.
    ValueError: ``kernel`` not 2-D, ``x`` a scalar, or mismatched features.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adderjax import adder_dense
    >>> x = jnp.array([[1., 2.]])
    >>> w = jnp.array([[0., 1.], [2., 2.]])
    >>> adder_dense(x, w).tolist()  # [-(|1-0| + |2-2|), -(|1-1| + |2-2|)]
    [[-1.0, 0.0]]
  """
  _check_dtype('x', x)
  _check_dtype('kernel', kernel)
  check_grad(grad)
  check_precision(precision)
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f'kernel must have shape (in_features, out_features), '
                     f'got shape {kernel.shape}.')
  if x.ndim < 1:
    raise ValueError(f'x must have at least one axis, got shape {x.shape}.')
  if x.shape[-1] != kernel.shape[0]:
    raise ValueError(f'x has {x.shape[-1]} features (shape {x.shape}) but the '
                     f'kernel expects {kernel.shape[0]} (shape {kernel.shape}).')
  _check_reduction(kernel.shape)
  batch_shape = x.shape[:-1]
  batch_spec = _explicit_batch_spec(x, 'adder_dense')
  x2 = _reshape(x, (-1, 1, x.shape[-1]), batch_spec and (
      batch_spec[0], None, None))
  y = adder_conv(x2, kernel[None], 1, 'VALID', grad=grad,
                 implementation=implementation, precision=precision)
  return _reshape(y, (*batch_shape, kernel.shape[1]), batch_spec and (
      *batch_spec[:-1], None))


def _explicit_batch_spec(x: jax.Array, op: str) -> tuple | None:
  """``x``'s PartitionSpec entries under Explicit mesh axes, else None.

  Under Explicit axes the layers run per shard of the first (batch) axis,
  the only one they split: an ``x`` sharded along any other axis (or a 1-D
  ``x``, whose only axis is its features) is refused. ``adder_dense`` merges
  its batch axes, a reshape whose output sharding is spelt out from this.
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if spec is None or all(s is None for s in spec):
    return None
  spec = tuple(spec) + (None,) * (x.ndim - len(spec))
  if x.ndim < 2 or any(s is not None for s in spec[1:]):
    raise ValueError(
        f'{op}: x of shape {x.shape} is sharded as '
        f'{jax.sharding.PartitionSpec(*spec)} over Explicit mesh axes; the '
        f'adder layers split the first (batch) axis of a batched x only: '
        f'reshard x to PartitionSpec({spec[0]!r}).')
  return spec


def _reshape(x: jax.Array, shape, spec) -> jax.Array:
  if spec is None:
    return x.reshape(shape)
  return jnp.reshape(x, shape,
                     out_sharding=jax.sharding.PartitionSpec(*spec))
