"""Post-training integer quantization of AdderNets: calibration and the model.

This module chooses the scales (:class:`QuantConfig`, :func:`calibrate`) and
runs a model on integers (:class:`QuantizedModel`); the integer adder op it
runs every adder layer on is :mod:`adderjax.ops.integer`, beside the float
op (:func:`adder_conv_int`, :func:`adder_dense_int`, :func:`quantize` and
:func:`qmax_of` are re-exported here). Calibration stays in this module with
the model re-interpreter: both walk the model with the same
:mod:`adderjax.introspect` interceptor and share the per-layer plan.

An adder layer computes ``-sum |x - w|``. A convolution quantizes its two
operands on separate scales (``sx * sw * sum xq wq``: the scales multiply
out), but a difference only stays a difference of integers when ``x`` and
``w`` share **one** scale: ``|s xq - s wq| = s |xq - wq|``. So each adder
layer gets one symmetric scale ``s`` whose range ``qmax * s`` has to cover
the layer's input activations; the calibration picks it per layer from a few
training batches (:class:`QuantConfig`). The kernel need not fit in that
range: for an input inside ``[-R, R]`` and ``|w| > R``,
``|x - w| = |x - clip(w, -R, R)| + (|w| - R)``, so kernel entries beyond
the activations are clipped exactly, their excess moving into a
per-channel constant (``QuantConfig.clip_kernel``). Trained adder kernels
reach far beyond their inputs, and without this a scale covering the kernel
leaves the activations a handful of levels.

The integer layer (:func:`adder_conv_int`, :func:`adder_dense_int`) reads
int8 inputs and kernels and returns the int32 accumulator
``acc = -sum |xq - wq|`` exactly; it takes every padding form of the float
layer (``'CIRCULAR'``, ``'REFLECT'`` and ``'CAUSAL'`` included), so every
adder layer a model can hold runs on integers.

What is folded (and what cannot be):

* **BatchNorm after an adder layer** cannot be folded into the adder kernel,
  as it is for a convolution: BN multiplies the output by ``a_t = gamma_t /
  sqrt(var_t + eps)`` and ``a_t * |x - w|`` is not ``|x - w'|`` for any
  ``w'`` (a scale does not pass inside an l1 distance, and a negative
  ``gamma`` would flip the sign of a distance). It folds instead into a
  per-output-channel affine on the int32 accumulator, merged with the
  dequantization: ``BN(s * acc + b) = (a_t s) * acc + (beta_t + a_t
  (b_t - mean_t))``, with ``b`` the layer's bias minus the kernel clipping
  constant. One multiply and one add per output element, not per
  tap; the BatchNorm module itself is then skipped.
* **BatchNorm after a full-precision layer** (the stem convolution, the
  classifier of a ResNet) folds into that layer's kernel and bias as usual
  (``w' = a_t w``, ``b' = a_t (b - mean) + beta``) before it is quantized,
  when the stem and classifier run in int8 (``first_last='int8'``: per-tensor
  input scale, per-output-channel kernel scale, int32 accumulation of
  products) or stays a float layer with the folded kernel
  (``first_last='float'``, the paper's setting: they stay full precision).
* Not folded: a BatchNorm that does not read a layer's output directly (for
  instance after an addition), one with batch statistics (``train=True``) or
  not on the last axis. It runs in float32, as do ReLU, pooling and residual
  additions, on the dequantized accumulators. Every weighted layer reads
  integers: that is where the quantization error enters.

The model is run under the layer walker of :mod:`adderjax.introspect`
(:func:`flax.linen.intercept_methods`, as :func:`adderjax.count_ops` does),
so every Linen model built from :class:`adderjax.linen.AdderConv` /
``AdderDense``, ``nn.Conv``, ``nn.Dense`` and ``nn.BatchNorm`` works, the
model zoo included. Calibration data must be finite: a NaN or inf reaching
a layer's input is refused, naming the layer and the batch. The BatchNorm to fold is found by data flow during
calibration (a BatchNorm whose input *is* a layer's output array); the
folding assumes that output has no other reader, which holds for every zoo
model (each layer feeds only its BN).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from adderjax import quant
  >>> xq = jnp.array([[3, -2]], jnp.int8)
  >>> wq = jnp.array([[1, 0], [-2, 5]], jnp.int8)
  >>> quant.adder_dense_int(xq, wq).tolist()  # -(|3-1| + |-2+2|), ...
  [[-2, -10]]

References:
  Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
  Learning?", CVPR 2020. https://arxiv.org/abs/1912.13200
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adderjax import _checks
from adderjax import introspect
from adderjax import linen as adder_linen
from adderjax.ops import geometry
from adderjax.ops import padding as padding_lib
from adderjax.ops.integer import adder_conv_int
from adderjax.ops.integer import adder_dense_int
from adderjax.ops.integer import BITS
from adderjax.ops.integer import INT_FORWARD_TERMS
from adderjax.ops.integer import METHODS
from adderjax.ops.integer import PARTIAL_DTYPES
from adderjax.ops.integer import qmax_of
from adderjax.ops.integer import quantize

__all__ = [
    'BITS', 'CALIBRATIONS', 'FIRST_LAST', 'INT_FORWARD_TERMS', 'METHODS',
    'PARTIAL_DTYPES', 'LayerPlan', 'QuantConfig', 'QuantizedModel',
    'adder_conv_int', 'adder_dense_int', 'calibrate', 'qmax_of', 'quantize',
]

#: Calibration methods of :class:`QuantConfig`.
CALIBRATIONS = ('max', 'percentile')
#: Precision of the stem and the classifier (full-precision layers).
FIRST_LAST = ('float', 'int8')


# ----------------------------------------------------------------------------
# Calibration and the quantized model.


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a model is quantized.

  Attributes:
    bits: bit width of the adder layers' shared scale (4..8, symmetric).
    calibration: ``'max'``: the range covers the largest ``|x|`` seen in
      calibration and the largest ``|w|`` (nothing is clipped);
      ``'percentile'``: the activations' range is the ``percentile``-th
      percentile of ``|x|`` (outliers clipped), still at least ``max |w|``.
    percentile: see ``calibration``.
    first_last: ``'float'`` keeps the stem and the classifier (every
      ``nn.Conv`` / ``nn.Dense``) full precision, as the paper does;
      ``'int8'`` runs them in int8 (per-tensor input scale, per-channel
      kernel scale, int32 accumulation).
    fold_bn: fold BatchNorm (see the module docstring); ``False`` runs every
      BatchNorm in float on the dequantized output (same result up to float
      rounding: a check of the folding).
    partial_dtype: partial sums of the integer adder kernel (see
      :func:`adder_conv_int`).
    method: hot-loop form of the integer adder kernel (see
      :func:`adder_conv_int`).
    clip_kernel: ``True`` (default): the shared scale covers the
      activations' range ``R`` only, and kernel entries beyond ``+-R`` are
      clipped *exactly*: an input quantized into ``[-R, R]`` has
      ``|x - w| = |x - clip(w, -R, R)| + (|w| - R)`` for ``|w| > R``, so the
      per-output-channel constant ``sum (|w| - R)_+`` goes into the output
      affine and costs nothing per tap. Trained adder kernels reach far
      beyond the activations (``max |w|`` 40-50 against inputs below 7 in
      our MNIST LeNet-5-BN), and a scale covering them would leave the
      activations a handful of levels. ``False``: the range is
      ``max(R, max |w|)``, nothing clipped (the plain shared scale).

  Examples:
    >>> QuantConfig(bits=6).qmax
    31
  """
  bits: int = 8
  calibration: str = 'max'
  percentile: float = 99.99
  first_last: str = 'float'
  fold_bn: bool = True
  partial_dtype: str = 'int16'
  clip_kernel: bool = True
  method: str = 'max'

  def __post_init__(self):
    qmax_of(self.bits)
    _checks.choice('calibration', self.calibration, CALIBRATIONS)
    # A NumPy / JAX scalar is accepted and stored as a Python float.
    object.__setattr__(self, 'percentile', _checks.finite_number(
        'percentile', self.percentile, low=0, high=100, low_open=True))
    _checks.choice('first_last', self.first_last, FIRST_LAST)
    for name in ('fold_bn', 'clip_kernel'):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise _checks.ArgumentTypeError(
            f'`{name}` must be a bool, got {_checks.describe(value)}.')
      object.__setattr__(self, name, bool(value))
    _checks.choice('partial_dtype', self.partial_dtype, PARTIAL_DTYPES)
    _checks.choice('method', self.method, METHODS)

  @property
  def qmax(self) -> int:
    return qmax_of(self.bits)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """The quantization of one weighted layer (one row of the scale table).

  Attributes:
    path: module path, e.g. ``'layer1_0/conv1'``.
    kind: ``'adder'`` or ``'fp'`` (full-precision stem / classifier).
    op: ``'conv'`` or ``'dense'``.
    bits: bit width of this layer (``None``: left in float).
    scale: adder layers: the shared scale of input and kernel; fp layers
      in int8: the input scale (the kernel has per-channel scales).
    x_absmax: largest ``|x|`` over the calibration batches.
    x_range: activation range the scale was chosen for.
    w_absmax: largest ``|w|`` of the kernel.
    bound_by: ``'x'`` or ``'w'``: which range set an adder layer's scale.
    x_clipped: fraction of calibration inputs beyond ``qmax * scale``.
    w_clipped: fraction of an adder kernel's entries beyond ``qmax *
      scale``, clipped exactly (see :class:`QuantConfig` ``clip_kernel``).
    bn: path of the folded BatchNorm, or ``None``.
  """
  path: str
  kind: str
  op: str
  bits: int | None
  scale: float
  x_absmax: float
  x_range: float
  w_absmax: float
  bound_by: str
  x_clipped: float
  w_clipped: float
  bn: str | None


def _layer_kind(module) -> tuple[str, str] | None:
  if isinstance(module, adder_linen.AdderConv):
    return 'adder', 'conv'
  if isinstance(module, adder_linen.AdderDense):
    return 'adder', 'dense'
  if isinstance(module, nn.Conv):
    return 'fp', 'conv'
  if isinstance(module, nn.Dense):
    return 'fp', 'dense'
  return None


def _refuse_uncovered(module, path: str) -> None:
  """Refuses adder computations the integer path does not cover, rather
  than leaving them in float unannounced."""
  what = None
  if isinstance(module, adder_linen.AdderDenseGeneral):
    what = 'an AdderDenseGeneral layer'
  elif (isinstance(module, adder_linen.AdderMultiHeadAttention) and
        module.score == 'l1'):
    what = 'l1 attention scores'
  if what is not None:
    raise ValueError(
        f'{path or "the model"} has {what}; integer inference covers '
        'AdderConv and AdderDense layers (with their BatchNorm) only, so '
        'this model (e.g. an adder ViT) cannot be quantized.')


def _path(module) -> str:
  return '/'.join(module.path)


def _accepts_train(model) -> bool:
  try:
    return 'train' in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return False


def _conv_padding(module, x, kernel_shape) -> tuple:
  """A full-precision Conv's padding: ``(x padded, strides, pads, dilation)``.

  ``pads`` are explicit ``(lo, hi)`` pairs; the input paddings (CIRCULAR,
  REFLECT, CAUSAL) pad ``x`` as the layers do. (Adder convolutions take the
  module's arguments as they are: :func:`adder_conv_int` does the same.)
  """
  nsp = len(kernel_shape) - 2
  strides = geometry.as_int_tuple(module.strides, nsp, 'strides')
  dilation = geometry.as_int_tuple(module.kernel_dilation, nsp,
                                   'kernel_dilation')
  x, padding = padding_lib.pad_input(x, kernel_shape[:nsp], module.padding,
                                     dilation)
  return x, strides, geometry.canonicalize_padding(
      padding, kernel_shape[:nsp], strides, dilation,
      jnp.shape(x)[1:-1]), dilation


def _check_conv_input(module, x) -> None:
  nsp = len(module.get_variable('params', 'kernel').shape) - 2
  if jnp.ndim(x) != nsp + 2:
    raise NotImplementedError(
        f'layer {_path(module)!r}: the integer path takes inputs with one '
        f'batch dim (rank {nsp + 2}), got shape {jnp.shape(x)}.')
  if getattr(module, 'input_dilation', 1) not in (None, 1):
    if any(d != 1 for d in np.atleast_1d(module.input_dilation)):
      raise NotImplementedError(f'layer {_path(module)!r}: input_dilation '
                                'is not supported by the integer path.')


@dataclasses.dataclass
class _Record:
  kind: str
  op: str
  absmax: float = 0.0
  samples: list = dataclasses.field(default_factory=list)
  calls: int = 0
  bn: str | None = None
  bn_ok: bool = True


def _bn_foldable(module) -> bool:
  return (isinstance(module, nn.BatchNorm) and
          bool(module.use_running_average) and module.axis in (-1,) and
          module.axis_name is None)


def calibrate(model: nn.Module, variables: Any, batches: Iterable[jax.Array],
              config: QuantConfig = QuantConfig(),
              **call_kwargs) -> 'QuantizedModel':
  """Calibrates the scales of a trained model and returns it quantized.

  Runs the float model on ``batches`` (jitted, under
  :func:`flax.linen.intercept_methods`), records each weighted layer's
  largest input magnitude (and a sample of them for percentiles) and which
  BatchNorm reads each layer's output, then picks per layer:

  * adder layers: one scale ``s = x_range / qmax`` shared by the input and
    the kernel (``qmax = 2**(bits - 1) - 1``), kernel entries beyond the
    range clipped exactly (``max(x_range, max |w|) / qmax`` with
    ``clip_kernel=False``);
  * full-precision layers with ``first_last='int8'``: an input scale
    ``x_range / 127`` and a per-output-channel kernel scale (after the
    BatchNorm fold).

  Args:
    model: an unbound Linen model (e.g. :func:`adderjax.models.create_model`).
    variables: its trained variables (``params`` and ``batch_stats``).
    batches: a few preprocessed input batches (e.g. 4 training batches).
    config: :class:`QuantConfig`.
    **call_kwargs: extra call arguments; ``train=False`` is passed when the
      model takes ``train``.

  Returns:
    A :class:`QuantizedModel`.

  Raises:
    ValueError: no batches, a layer called more than once per forward pass,
      a model without adder layers, adder computations the integer path
      does not cover (``AdderDenseGeneral``, l1 attention: an adder ViT),
      a NaN or inf in a layer's input (the message names the layer and the
      batch index) or in a kernel.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from adderjax import linen, quant
    >>> model = nn.Sequential([linen.AdderDense(4, use_bias=False),
    ...                        nn.BatchNorm(use_running_average=True),
    ...                        nn.Dense(2)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 5))
    >>> variables = model.init(jax.random.key(1), x)
    >>> qm = quant.calibrate(model, variables, [x], quant.QuantConfig(bits=8))
    >>> [(p.path, p.kind, p.bits, p.bn) for p in qm.plan]
    [('layers_0', 'adder', 8, 'layers_1'), ('layers_2', 'fp', None, None)]
    >>> qm(x).shape
    (16, 2)
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f'config must be a QuantConfig, got {config!r}.')
  if not isinstance(model, nn.Module):
    raise _checks.ArgumentTypeError(
        '`model` must be an unbound flax.linen.Module, got '
        f'{_checks.describe(model)}.')
  if not (isinstance(variables, Mapping) and 'params' in variables):
    raise _checks.ArgumentTypeError(
        "`variables` must be the model's variables dict ({'params': ..., "
        "'batch_stats': ...}), got "
        + (f'a dict with keys {sorted(map(str, variables))}'
           if isinstance(variables, Mapping)
           else _checks.describe(variables)) + '.')
  if 'train' not in call_kwargs and _accepts_train(model):
    call_kwargs['train'] = False
  records: dict[str, _Record] = {}
  order: list[str] = []
  bn_modules: dict[str, Any] = {}
  max_samples = 1 << 18

  def collect(variables, batch):
    """Traced once per input shape: finds the layers and the BatchNorms
    that read their outputs, and returns each layer's input statistics."""
    outputs: dict[int, str] = {}
    alive: list = []  # keeps outputs alive so that their ids stay unique
    seen: set[str] = set()
    stats = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      path = _path(module)
      _refuse_uncovered(module, path)
      kinds = _layer_kind(module)
      if isinstance(module, nn.BatchNorm) and args:
        src = outputs.get(id(args[0]))
        if src is not None:
          rec = records[src]
          if rec.bn not in (None, path) or not _bn_foldable(module):
            rec.bn_ok = False
          rec.bn = path
          bn_modules[path] = module
      if kinds is None or not args:
        return next_fun(*args, **kwargs)
      if path in seen:
        raise ValueError(f'layer {path!r} is called more than once per '
                         'forward pass; shared layers are not supported.')
      seen.add(path)
      if path not in records:
        records[path] = _Record(*kinds)
        order.append(path)
      x = jnp.abs(jnp.asarray(args[0], jnp.float32)).ravel()
      step = max(1, -(-x.size // max_samples))  # fixed, evenly spaced
      stats[path] = (jnp.max(x, initial=0.0), x[::step],
                     jnp.all(jnp.isfinite(x)))
      out = next_fun(*args, **kwargs)
      outputs[id(out)] = path
      alive.append(out)
      return out

    # Every __call__ (the walker's default), observed with its real arrays.
    with introspect.intercept_layers(replace=interceptor):
      model.apply(variables, batch, **call_kwargs)
    return stats, _all_finite(batch)

  collect = jax.jit(collect)
  n_batches = 0
  for index, batch in enumerate(batches):
    n_batches += 1
    stats, batch_finite = jax.device_get(collect(variables,
                                                 jnp.asarray(batch)))
    if index == 0:  # the layers are known: their kernels must be finite
      _check_finite_kernels(variables, order)
    _check_finite_stats(stats, order, index, bool(batch_finite))
    for path, (absmax, sample, _) in stats.items():
      rec = records[path]
      rec.calls += 1
      rec.absmax = max(rec.absmax, float(absmax))
      rec.samples.append(np.asarray(sample))
  if not n_batches:
    raise ValueError('`batches` is empty: calibrate needs at least one '
                     'batch.')
  if not any(r.kind == 'adder' for r in records.values()):
    raise ValueError('the model has no AdderConv / AdderDense layer to '
                     'quantize.')
  for rec in records.values():
    if rec.calls != n_batches:  # a layer not called on every batch
      rec.bn_ok = False
  return _build(model, variables, config, records, order, bn_modules,
                call_kwargs)


def _all_finite(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(x))


def _check_finite_kernels(variables, order: list[str]) -> None:
  for path in order:
    kernel = _variables_at(variables['params'], path)['kernel']
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(kernel)))):
      raise ValueError(f'layer {path!r}: its kernel holds NaN or inf values; '
                       'only finite variables can be quantized.')


def _check_finite_stats(stats: dict, order: list[str], index: int,
                        batch_finite: bool) -> None:
  """Refuses a calibration batch that gives a layer a NaN or inf input.

  A NaN would be dropped by the running maximum (a range of 0) and an inf
  would make the scale inf (NaN everywhere): both silent, so refused.
  """
  for path in order:
    if path in stats and not bool(stats[path][2]):
      where = ('the batch itself holds NaN or inf values' if not batch_finite
               else 'the batch is finite: an earlier layer\'s output is '
               'not')
      raise ValueError(
          f'calibration batch {index} gives layer {path!r} a non-finite '
          f'input (NaN or inf; {where}); calibration data must be finite.')


def _variables_at(tree, path: str):
  node = tree
  for name in filter(None, path.split('/')):  # '' is the top module
    node = node[name]
  return node


def _bn_affine(module, variables, path: str):
  """``(a, c)`` with ``BN(y) = a * y + c`` for a BatchNorm in eval mode."""
  stats = _variables_at(variables['batch_stats'], path)
  mean = jnp.asarray(stats['mean'], jnp.float32)
  var = jnp.asarray(stats['var'], jnp.float32)
  try:
    params = _variables_at(variables['params'], path)
  except (KeyError, TypeError):
    params = {}
  gamma = jnp.asarray(params['scale'], jnp.float32) if module.use_scale else 1.0
  beta = jnp.asarray(params['bias'], jnp.float32) if module.use_bias else 0.0
  a = gamma * lax.rsqrt(var + module.epsilon)
  return a, beta - a * mean


def _build(model, variables, config, records, order, bn_modules,
           call_kwargs) -> 'QuantizedModel':
  plan = []
  qparams = {}
  for path in order:
    rec = records[path]
    p = _variables_at(variables['params'], path)
    kernel = jnp.asarray(p['kernel'], jnp.float32)
    bias = jnp.asarray(p['bias'], jnp.float32) if 'bias' in p else None
    w_absmax = float(jnp.max(jnp.abs(kernel))) if kernel.size else 0.0
    xs = np.concatenate(rec.samples) if rec.samples else np.zeros(1)
    if config.calibration == 'percentile':
      x_range = float(np.percentile(xs, config.percentile))
    else:
      x_range = rec.absmax
    bn = rec.bn if (config.fold_bn and rec.bn_ok) else None
    if bn is not None:
      a, c = _bn_affine(bn_modules[bn], variables, bn)
    else:
      a, c = None, None
    entry = {}
    w_clipped = 0.0
    if rec.kind == 'adder':
      qmax = config.qmax
      if config.clip_kernel and x_range > 0:
        rng, bound = x_range, 'x'
      else:
        rng = max(x_range, w_absmax)
        bound = 'x' if x_range >= w_absmax else 'w'
      scale = rng / qmax if rng > 0 else 1.0
      # Kernel entries beyond the range: for |x| <= R and |w| > R,
      # |x - w| = |x - clip(w)| + (|w| - R), so clipping is exact once the
      # per-channel constant sum (|w| - R)_+ is subtracted from the output.
      r = qmax * scale
      excess = jnp.maximum(jnp.abs(kernel) - r, 0.0)
      w_clipped = float(jnp.mean(excess > 0)) if kernel.size else 0.0
      correction = jnp.sum(excess.reshape(-1, kernel.shape[-1]), axis=0)
      entry['wq'] = quantize(jnp.clip(kernel, -r, r), scale, config.bits)
      mult = jnp.full((kernel.shape[-1],), scale, jnp.float32)
      shift = (bias if bias is not None else jnp.zeros_like(mult)) - correction
      if a is not None:  # BN(s * acc + shift) = (a s) acc + a shift + c
        mult, shift = a * mult, a * shift + c
      entry['mult'], entry['shift'] = mult, shift
      bits = config.bits
    else:
      if a is not None:  # fold BN into the kernel and bias (a conv's fold)
        kernel = kernel * a
        bias = (a * bias + c) if bias is not None else c
      bound = 'x'
      if config.first_last == 'int8':
        scale = x_range / 127 if x_range > 0 else 1.0
        axes = tuple(range(kernel.ndim - 1))
        wmax = jnp.max(jnp.abs(kernel), axis=axes)
        wscale = jnp.where(wmax > 0, wmax / 127, 1.0)
        entry['wq'] = quantize(kernel, wscale, 8)
        entry['mult'] = scale * wscale
        bits = 8
      else:
        scale = math.nan
        entry['kernel'] = kernel
        bits = None
      entry['shift'] = (bias if bias is not None else
                        jnp.zeros((kernel.shape[-1],), jnp.float32))
    x_clipped = (float(np.mean(xs > (config.qmax if rec.kind == 'adder'
                                     else 127) * scale))
                 if bits is not None else 0.0)
    qparams[path] = entry
    plan.append(LayerPlan(
        path=path, kind=rec.kind, op=rec.op, bits=bits, scale=float(scale),
        x_absmax=rec.absmax, x_range=x_range, w_absmax=w_absmax,
        bound_by=bound, x_clipped=x_clipped, w_clipped=w_clipped, bn=bn))
  return QuantizedModel(model=model, variables=variables, config=config,
                        plan=tuple(plan), qparams=qparams,
                        call_kwargs=dict(call_kwargs),
                        calibration=(records, order, bn_modules))


@dataclasses.dataclass
class QuantizedModel:
  """A calibrated model whose weighted layers run on integers.

  Built by :func:`calibrate`. Calling it runs the model with every adder
  layer replaced by its integer form (int8 input and kernel on the layer's
  shared scale, :func:`adder_conv_int`, then the folded per-channel affine),
  and the stem / classifier in float or int8 (``config.first_last``).

  Attributes:
    model: the Linen model.
    variables: its float variables.
    config: the :class:`QuantConfig`.
    plan: one :class:`LayerPlan` per weighted layer, in call order.
    qparams: per layer path: int8 kernel ``wq`` (or float ``kernel``),
      per-channel ``mult`` and ``shift`` of the output affine.
    call_kwargs: extra model call arguments.
    calibration: the statistics gathered by :func:`calibrate` (reused by
      :meth:`requantize`).
  """
  model: nn.Module
  variables: Any
  config: QuantConfig
  plan: tuple[LayerPlan, ...]
  qparams: dict
  call_kwargs: dict
  calibration: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    self._jitted = jax.jit(self.apply)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The quantized forward pass (jitted)."""
    return self._jitted(self.qparams, jnp.asarray(x))

  def apply(self, qparams: dict, x: jax.Array) -> jax.Array:
    """The quantized forward pass as a pure function of ``qparams`` and ``x``."""
    plans = {p.path: p for p in self.plan}
    folded = {p.bn for p in self.plan if p.bn is not None}
    cfg = self.config

    def reinterpreted(module) -> bool:
      path = _path(module)
      return ((path in folded and isinstance(module, nn.BatchNorm)) or
              (path in plans and _layer_kind(module) is not None))

    def run(next_fun, args, kwargs, context):
      module = context.module
      path = _path(module)
      if path in folded and isinstance(module, nn.BatchNorm):
        return args[0]
      return _run_layer(module, plans[path], qparams[path], args[0], cfg)

    with introspect.intercept_layers(reinterpreted, replace=run):
      return self.model.apply(self.variables, x, **self.call_kwargs)

  def requantize(self, config: QuantConfig) -> 'QuantizedModel':
    """The same calibration quantized with another :class:`QuantConfig`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from adderjax import linen, quant
      >>> model = linen.AdderDense(3)
      >>> x = jnp.arange(8.).reshape(2, 4)
      >>> q8 = quant.calibrate(model, model.init(jax.random.key(0), x), [x])
      >>> q4 = q8.requantize(quant.QuantConfig(bits=4))
      >>> q4.plan[0].bits, round(q4.plan[0].scale * 7, 4)  # range: max |x|
      (4, 7.0)
    """
    if not isinstance(config, QuantConfig):
      raise TypeError(f'config must be a QuantConfig, got {config!r}.')
    records, order, bn_modules = self.calibration
    return _build(self.model, self.variables, config, records, order,
                  bn_modules, self.call_kwargs)

  def table(self) -> str:
    """The per-layer scale choice as a markdown table."""
    head = ('| layer | kind | bits | scale | max abs x | x range | max abs w '
            '| scale set by | x clipped | w clipped (exact) | BN folded |')
    lines = [head, '|' + '---|' * 11]
    for p in self.plan:
      bits = '-' if p.bits is None else str(p.bits)
      scale = '-' if p.bits is None else f'{p.scale:.4g}'
      if p.kind == 'fp' and p.bits is not None:
        scale += ' (x); w per channel'
      lines.append(
          f'| {p.path} | {p.kind} | {bits} | {scale} | {p.x_absmax:.4g} | '
          f'{p.x_range:.4g} | {p.w_absmax:.4g} | '
          f'{p.bound_by if p.kind == "adder" else "-"} | '
          f'{100 * p.x_clipped:.3f} % | '
          f'{f"{100 * p.w_clipped:.1f} %" if p.kind == "adder" else "-"} | '
          f'{p.bn or "-"} |')
    return '\n'.join(lines)


def _run_layer(module, plan: LayerPlan, q: dict, x: jax.Array,
               cfg: QuantConfig) -> jax.Array:
  """One weighted layer of the quantized forward pass (float32 output)."""
  x = jnp.asarray(x, jnp.float32)
  if plan.kind == 'adder':
    xq = quantize(x, plan.scale, cfg.bits)
    if plan.op == 'dense':
      acc = adder_dense_int(xq, q['wq'], partial_dtype=cfg.partial_dtype,
                            method=cfg.method)
    else:
      _check_conv_input(module, x)
      acc = adder_conv_int(xq, q['wq'], module.strides, module.padding,
                           module.kernel_dilation, module.feature_group_count,
                           partial_dtype=cfg.partial_dtype,
                           method=cfg.method)
    return acc.astype(jnp.float32) * q['mult'] + q['shift']
  if plan.bits is None:  # float stem / classifier (BN folded in the kernel)
    kernel = q['kernel']
    if plan.op == 'dense':
      y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST)
    else:
      _check_conv_input(module, x)
      x, strides, pads, dilation = _conv_padding(module, x, kernel.shape)
      y = _lax_conv(x, kernel, strides, pads, dilation,
                    module.feature_group_count, jnp.float32)
    return y + q['shift']
  xq = quantize(x, plan.scale, 8)
  wq = q['wq']
  if plan.op == 'dense':
    acc = lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
  else:
    _check_conv_input(module, x)
    xq, strides, pads, dilation = _conv_padding(module, xq, wq.shape)
    acc = _lax_conv(xq, wq, strides, pads, dilation,
                    module.feature_group_count, jnp.int32)
  return acc.astype(jnp.float32) * q['mult'] + q['shift']


def _lax_conv(x, kernel, strides, pads, dilation, groups, out_dtype):
  nsp = kernel.ndim - 2
  spatial = ''.join('DHW'[3 - nsp:])
  dn = lax.conv_dimension_numbers(
      x.shape, kernel.shape, (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
  return lax.conv_general_dilated(
      x, kernel, strides, pads, rhs_dilation=dilation,
      dimension_numbers=dn, feature_group_count=groups,
      precision=lax.Precision.HIGHEST if out_dtype == jnp.float32 else None,
      preferred_element_type=out_dtype)
