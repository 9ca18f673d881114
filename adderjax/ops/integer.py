"""The integer adder op: int8 operands, an exact int32 accumulator.

The integer twin of :mod:`adderjax.ops.adder`. An adder layer computes
``-sum |x - w|``; a difference stays a difference of integers when ``x`` and
``w`` share **one** scale (``|s xq - s wq| = s |xq - wq|``), so a quantized
adder layer reads ``xq`` and ``wq`` quantized on the same symmetric scale
(:func:`quantize`) and computes ``acc = -sum |xq - wq|`` in int32 exactly
(no rounding anywhere: the tests compare it with a numpy int32 loop). Zero
padding pads with the integer 0, the quantized 0.0 of a symmetric scheme, so
the integer op is the float op on the dequantized operands:
``s * acc == adder_conv(s xq, s wq)``.

:func:`~adderjax.quant.adder_conv_int` shares the float op's geometry
handling: the one :class:`~adderjax.ops.geometry.ConvGeometry` (built by
:func:`~adderjax.ops.geometry.make_geometry`, with its errors) and the flat
shifted-phase layout derived from it, and every padding form of the adder
layers, the input paddings ``'CIRCULAR'``, ``'REFLECT'`` and ``'CAUSAL'``
included (:func:`adderjax.ops.padding.pad_input`: quantization is
element-wise, so padding the quantized input is quantizing the padded one).

Choosing the scales (calibration) and running a model on this op are
:mod:`adderjax.quant`'s.

Examples:
  >>> import jax.numpy as jnp
  >>> xq = jnp.array([[3, -2]], jnp.int8)
  >>> wq = jnp.array([[1, 0], [-2, 5]], jnp.int8)
  >>> adder_dense_int(xq, wq).tolist()  # -(|3-1| + |-2+2|), ...
  [[-2, -10]]

References:
  Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
  Learning?", CVPR 2020. https://arxiv.org/abs/1912.13200
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adderjax import _checks
from adderjax.ops import geometry
from adderjax.ops import padding as padding_lib
from adderjax.ops.geometry import PaddingLike

__all__ = ['BITS', 'INT_FORWARD_TERMS', 'METHODS', 'PARTIAL_DTYPES',
           'adder_conv_int', 'adder_dense_int', 'qmax_of', 'quantize']

#: Bit widths accepted for the adder layers.
BITS = (4, 5, 6, 7, 8)
#: Calibration methods of :class:`QuantConfig`.
CALIBRATIONS = ('max', 'percentile')
#: Precision of the stem and the classifier (full-precision layers).
FIRST_LAST = ('float', 'int8')
#: Partial-sum dtypes of the integer adder kernel.
PARTIAL_DTYPES = ('int16', 'int32')
#: Hot-loop forms of the integer adder kernel.
METHODS = ('max', 'abs')

#: (tap, feature) terms per fused chunk of the integer forward loop.
INT_FORWARD_TERMS = 18
_INT16_MAX = 32767


def qmax_of(bits: int) -> int:
  """Largest level of a symmetric signed ``bits``-bit code: ``2**(b-1) - 1``.

  Args:
    bits: 4..8 (a Python or NumPy / JAX integer).

  Raises:
    ValueError: ``bits`` not an int in 4..8 (an ``ArgumentTypeError``, also
      a ``TypeError``, when not an int at all).

  Examples:
    >>> qmax_of(8), qmax_of(4)
    (127, 7)
  """
  allowed = f'an int in {BITS[0]}..{BITS[-1]}'
  b = _checks.integer('bits', bits, allowed=allowed)
  if b not in BITS:
    raise ValueError(f'`bits` must be {allowed}, got {_checks.describe(bits)}.')
  return 2**(b - 1) - 1


def _check_scale(scale) -> None:
  """``scale`` finite and > 0: a number, or every entry of a concrete array."""
  if isinstance(scale, jax.core.Tracer):
    return  # traced (under jit): cannot be read; documented in quantize
  if not isinstance(scale, (np.ndarray, jax.Array)) or np.ndim(scale) == 0:
    _checks.finite_number('scale', scale, low=0, low_open=True)
    return
  dtype = scale.dtype
  if dtype == np.bool_ or not (jnp.issubdtype(dtype, jnp.integer) or
                               jnp.issubdtype(dtype, jnp.floating)):
    raise _checks.ArgumentTypeError(
        f'`scale` must be finite numbers > 0, got '
        f'{_checks.describe(scale)}.')
  a = np.asarray(scale)
  bad = ~(np.isfinite(a) & (a > 0))
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f'`scale` must be finite and > 0 everywhere, got '
        f'{_checks.describe(scale)} with {a[where].item()!r} at index '
        f'{where}.')


def quantize(x: jax.Array, scale, bits: int = 8) -> jax.Array:
  """Symmetric quantization: ``clip(round(x / scale), -qmax, qmax)`` as int8.

  Rounds half to even (``jnp.round``); ``-qmax`` is the lowest level (the
  code is symmetric, ``-128`` is never produced at 8 bits). A NaN becomes 0.

  Args:
    x: float array.
    scale: finite scale ``> 0``: a number (Python, NumPy or JAX scalar) or an
      array broadcastable to ``x``, every entry checked when it is concrete;
      a traced ``scale`` (an argument of a jitted function) cannot be read
      and is not checked: a zero there saturates and an ``inf`` gives 0.
    bits: 4..8.

  Returns:
    int8 array of the shape of ``x``.

  Raises:
    ValueError: bad ``bits``, or a concrete ``scale`` (number or array) with
      an entry that is not finite and ``> 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> quantize(jnp.array([0.26, -1.0, 5.0]), 0.5, bits=4).tolist()
    [1, -2, 7]
  """
  qmax = qmax_of(bits)
  _check_scale(scale)
  x = jnp.asarray(x, jnp.float32)
  q = jnp.clip(jnp.round(x / scale), -qmax, qmax)
  q = jnp.where(jnp.isnan(q), 0.0, q)
  return q.astype(jnp.int8)


def _check_int8(name: str, a) -> None:
  dtype = jnp.result_type(a)
  if dtype != jnp.int8:
    raise TypeError(f'{name} must be int8 (quantized values), got {dtype}; '
                    'see adderjax.ops.integer.quantize.')


def _tree_sum(parts: list[jax.Array]) -> jax.Array:
  while len(parts) > 1:
    nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if len(parts) % 2:
      nxt.append(parts[-1])
    parts = nxt
  return parts[0]


def _int_forward(xq: jax.Array, wq: jax.Array, geo: geometry.ConvGeometry,
                 terms: int, partial_dtype: str, method: str) -> jax.Array:
  """``-sum |xq - wq|`` on the flat shifted-phase layout, int32 result.

  Each (tap, input feature) term reads one contiguous slice of the flat
  input (see :func:`adderjax.ops.geometry.to_flat`); the output features
  are the vector axis. ``method='abs'`` adds ``|xq - wq|`` (three vector
  operations per term: subtract, absolute value, add); ``'max'`` adds
  ``max(xq, wq)`` (two: max, add) and uses ``-|a - b| = a + b - 2 max(a,
  b)``, exact in integers (in floating point it cancels, which is why the
  float kernels do not use it for large inputs), with the window sums of
  ``xq`` (a box filter) and the kernel sums computed once. Terms are formed
  in ``partial_dtype`` (int16: twice the SIMD lanes of int32) and summed
  there in groups of at most 128 (``|term| <= 255``: no int16 overflow),
  then widened to the int32 accumulator.
  """
  g = geo.groups
  cg, tg = geo.in_features // g, geo.out_features // g
  n, length = geo.batch, geo.flat_length_out
  nph, ntaps = len(geo.phases), len(geo.tap_offsets)
  pdt = jnp.dtype(partial_dtype)
  group = _INT16_MAX // 255 if pdt == jnp.int16 else 2**31 // 255
  xf = geometry.to_flat(xq, geo).reshape(nph, n, geo.flat_length_in, g, cg)
  w = wq.reshape(ntaps, cg, g, tg)
  cu = max(1, min(cg, terms // ntaps))
  cpad = -(-cg // cu) * cu
  if cpad != cg:  # zero features add |0 - 0| = 0 (and max(0, 0) = 0)
    xf = jnp.pad(xf, [(0, 0)] * 4 + [(0, cpad - cg)])
    w = jnp.pad(w, [(0, 0), (0, cpad - cg), (0, 0), (0, 0)])
  term = ((lambda a, b: jnp.abs(a - b)) if method == 'abs' else jnp.maximum)

  def chunk(i, acc):
    xc = lax.dynamic_slice_in_dim(xf, i * cu, cu, axis=4).astype(pdt)
    wc = lax.dynamic_slice_in_dim(w, i * cu, cu, axis=1).astype(pdt)
    parts = [term(xc[ph, :, off:off + length, :, j, None], wc[ti, j])
             for ti, (ph, off) in enumerate(geo.tap_offsets)
             for j in range(cu)]
    for start in range(0, len(parts), group):
      acc = acc + _tree_sum(parts[start:start + group]).astype(jnp.int32)
    return acc

  acc = jnp.zeros((n, length, g, tg), jnp.int32)
  n_chunks = cpad // cu
  if n_chunks == 1:
    acc = chunk(0, acc)
  else:
    acc = lax.fori_loop(0, n_chunks, chunk, acc)
  if method == 'abs':
    y = -acc
  else:  # sum x + sum w - 2 sum max(x, w)
    xs = jnp.sum(xf, axis=4, dtype=jnp.int32)  # [PH, N, Lin, G]
    box = _tree_sum([xs[ph, :, off:off + length]
                     for ph, off in geo.tap_offsets])
    wsum = jnp.sum(w, axis=(0, 1), dtype=jnp.int32)  # [G, T]
    y = box[..., None] + wsum - 2 * acc
  return geometry.out_from_flat(y.reshape(n, length, g * tg), geo)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _adder_conv_int(xq, wq, geo, terms, partial_dtype, method):
  if not geo.batch:
    return jnp.zeros(geo.out_shape, jnp.int32)
  return _int_forward(xq, wq, geo, terms, partial_dtype, method)


def adder_conv_int(xq: jax.Array,
                   wq: jax.Array,
                   strides: int | tuple[int, ...] = 1,
                   padding: PaddingLike = 'SAME',
                   kernel_dilation: int | tuple[int, ...] = 1,
                   feature_group_count: int = 1,
                   *,
                   partial_dtype: str = 'int16',
                   method: str = 'max') -> jax.Array:
  """Integer adder convolution: ``-sum |xq - wq|`` with int32 accumulation.

  The integer twin of :func:`adderjax.adder_conv` with the same arguments
  and geometry (1-3 spatial dims, strides, dilation, groups) and every
  padding form of the adder layers; it is exact: no rounding, every entry
  is the integer sum.

  Args:
    xq: int8 feature-last input ``(N, *spatial, C_in)``.
    wq: int8 kernel ``(*kernel_size, C_in // groups, C_out)``.
    strides: an int or one int per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, an int, one int per spatial dim, or
      ``(lo, hi)`` pairs (these pad with the integer 0); ``'CIRCULAR'``,
      ``'REFLECT'`` or ``'CAUSAL'`` (1-D) pad the input as the layers do
      (:func:`adderjax.ops.padding.pad_input`).
    kernel_dilation: an int or one int per spatial dim.
    feature_group_count: number of groups.
    partial_dtype: ``'int16'`` (default: differences and partial sums of up
      to 128 terms in int16, twice the vector lanes) or ``'int32'``; both are
      exact.
    method: ``'max'`` (default: ``sum x + sum w - 2 sum max(x, w)``, two
      vector operations per term) or ``'abs'`` (``sum |x - w|``, three);
      both are exact.

  Returns:
    int32 ``(N, *out_spatial, C_out)``, every entry ``<= 0``.

  Raises:
    TypeError: ``xq`` or ``wq`` not int8.
    ValueError: mismatched shapes, bad padding, strides, dilation, groups or
      ``partial_dtype``.

  Examples:
    >>> import jax.numpy as jnp
    >>> xq = jnp.ones((1, 4, 4, 2), jnp.int8)
    >>> wq = jnp.full((3, 3, 2, 1), -1, jnp.int8)
    >>> adder_conv_int(xq, wq, padding='VALID')[0, :, :, 0].tolist()
    [[-36, -36], [-36, -36]]
    >>> x1 = jnp.array([[[1], [2], [3]]], jnp.int8)
    >>> adder_conv_int(x1, jnp.zeros((2, 1, 1), jnp.int8),
    ...                padding='CIRCULAR')[0, :, 0].tolist()  # [1,2,3,1]
    [-3, -5, -4]
  """
  _check_int8('xq', xq)
  _check_int8('wq', wq)
  if partial_dtype not in PARTIAL_DTYPES:
    raise ValueError(f'partial_dtype must be one of {PARTIAL_DTYPES}, got '
                     f'{partial_dtype!r}.')
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  xq = jnp.asarray(xq)
  wq = jnp.asarray(wq)
  nsp = wq.ndim - 2
  if nsp >= 1 and xq.ndim == nsp + 2:  # else make_geometry says what is wrong
    xq, padding = padding_lib.pad_input(xq, wq.shape[:nsp], padding,
                                        kernel_dilation)
  geo = geometry.make_geometry(xq.shape, wq.shape, strides, padding,
                               kernel_dilation, feature_group_count)
  return _adder_conv_int(xq, wq, geo, INT_FORWARD_TERMS, partial_dtype,
                         method)


def adder_dense_int(xq: jax.Array, wq: jax.Array, *,
                    partial_dtype: str = 'int16',
                    method: str = 'max') -> jax.Array:
  """Integer fully connected adder layer: ``-sum_k |xq[..., k] - wq[k, t]|``.

  Args:
    xq: int8 ``(..., K)``.
    wq: int8 ``(K, T)``.
    partial_dtype: see :func:`adder_conv_int`.
    method: see :func:`adder_conv_int`.

  Returns:
    int32 ``(..., T)``.

  Raises:
    TypeError: non-int8 operands.
    ValueError: ``wq`` not 2-D, ``xq`` a scalar, or mismatched features.

  Examples:
    >>> import jax.numpy as jnp
    >>> adder_dense_int(jnp.array([[127, -127]], jnp.int8),
    ...                 jnp.array([[-127], [127]], jnp.int8)).tolist()
    [[-508]]
  """
  _check_int8('xq', xq)
  _check_int8('wq', wq)
  xq = jnp.asarray(xq)
  wq = jnp.asarray(wq)
  if wq.ndim != 2:
    raise ValueError(f'wq must have shape (in_features, out_features), got '
                     f'shape {wq.shape}.')
  if xq.ndim < 1:
    raise ValueError(f'xq must have at least one axis, got shape {xq.shape}.')
  if xq.shape[-1] != wq.shape[0]:
    raise ValueError(f'xq has {xq.shape[-1]} features (shape {xq.shape}) but '
                     f'wq expects {wq.shape[0]} (shape {wq.shape}).')
  batch_shape = xq.shape[:-1]
  y = adder_conv_int(xq.reshape(-1, 1, xq.shape[-1]), wq[None], 1, 'VALID',
                     partial_dtype=partial_dtype, method=method)
  return y.reshape(*batch_shape, wq.shape[1])


