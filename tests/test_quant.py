"""adderjax.quant: the integer adder layer against a numpy int32 oracle, the
quantizer, calibration, BatchNorm folding and the quantized model."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import linen as adder_linen
from adderjax import models
from adderjax import quant
import adder_oracle


# ---------------------------------------------------------------------------
# An independent integer oracle: numpy int32 loops, written from the paper's
# eq. 2 (Y = -sum |X - F| over the window and the group's input channels).


def int_oracle(x, w, strides, pads, dilation, groups):
  """Integer adder conv in numpy int32, one output position at a time."""
  x = np.asarray(x, np.int32)
  w = np.asarray(w, np.int32)
  nsp = x.ndim - 2
  ks = w.shape[:nsp]
  cg, t_all = w.shape[-2], w.shape[-1]
  tg = t_all // groups
  xp = np.zeros((x.shape[0],) + tuple(s + lo + hi for s, (lo, hi) in
                                      zip(x.shape[1:-1], pads)) +
                (x.shape[-1],), np.int32)
  xp[(slice(None),) + tuple(slice(lo, lo + s) for s, (lo, _) in
                            zip(x.shape[1:-1], pads))] = x
  out_sp = [(xp.shape[1 + i] - (ks[i] - 1) * dilation[i] - 1) // strides[i]
            + 1 for i in range(nsp)]
  y = np.zeros((x.shape[0], *out_sp, t_all), np.int32)
  for n in range(x.shape[0]):
    for o in itertools.product(*[range(v) for v in out_sp]):
      for t in range(t_all):
        g = t // tg
        acc = np.int32(0)
        for tap in itertools.product(*[range(k) for k in ks]):
          pos = tuple(o[i] * strides[i] + tap[i] * dilation[i]
                      for i in range(nsp))
          xs = xp[(n,) + pos][g * cg:(g + 1) * cg]
          ws = w[tap + (slice(None), t)]
          acc += np.sum(np.abs(xs - ws), dtype=np.int32)
        y[(n,) + o + (t,)] = -acc
  return y


def _pads(padding, in_sp, ks, strides, dilation):
  nsp = len(ks)
  if padding == 'VALID':
    return [(0, 0)] * nsp
  if padding == 'SAME':
    return adder_oracle.same_padding(in_sp, ks, strides, dilation)
  if isinstance(padding, int):
    return [(padding, padding)] * nsp
  return [p if isinstance(p, tuple) else (p, p) for p in padding]


def _rand_int8(rng, shape, lo=-128, hi=127):
  return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


# (x shape, kernel shape, strides, padding, dilation, groups)
CASES = [
    ((2, 7, 6, 3), (3, 3, 3, 4), 1, 'SAME', 1, 1),
    ((2, 7, 6, 3), (3, 3, 3, 4), 1, 'VALID', 1, 1),
    ((1, 8, 7, 2), (3, 3, 2, 3), 2, 'SAME', 1, 1),            # asymmetric
    ((1, 6, 6, 2), (2, 3, 2, 3), (1, 2), ((1, 2), (0, 3)), 1, 1),
    ((1, 6, 5, 2), (3, 3, 2, 2), 1, 1, 1, 1),                 # int padding
    ((1, 9, 8, 2), (3, 3, 2, 2), 1, 'SAME', 2, 1),            # dilation
    ((1, 11, 10, 2), (3, 2, 2, 3), 2, [1, (2, 0)], (2, 3), 1),
    ((2, 6, 6, 4), (3, 3, 2, 6), 1, 'SAME', 1, 2),            # groups
    ((1, 6, 6, 4), (3, 3, 1, 4), 2, 'SAME', 1, 4),            # depthwise
    ((1, 7, 7, 3), (1, 1, 3, 5), 2, 'VALID', 1, 1),           # 1x1 stride 2
    ((2, 13, 3), (3, 3, 2), 3, 'SAME', 2, 1),                 # 1-D
    ((1, 4, 5, 4, 2), (2, 3, 2, 2, 2), (1, 2, 1), 'VALID', 1, 1),  # 3-D
    ((1, 4, 4, 40), (3, 3, 20, 4), 1, 'SAME', 1, 2),  # K = 180: loop chunks
]


@pytest.mark.parametrize('case,method', [(c, 'max') for c in CASES] + [
    (CASES[i], 'abs') for i in (2, 6, 7, 11)], ids=[
        f'case{i}' for i in range(len(CASES))] + [
            f'abs-case{i}' for i in (2, 6, 7, 11)])
def test_adder_conv_int_equals_numpy_oracle(case, method):
  x_shape, w_shape, strides, padding, dilation, groups = case
  rng = np.random.default_rng(len(x_shape) * 100 + w_shape[-1])
  x = _rand_int8(rng, x_shape)
  w = _rand_int8(rng, w_shape)
  nsp = len(x_shape) - 2
  st = (strides,) * nsp if isinstance(strides, int) else strides
  dl = (dilation,) * nsp if isinstance(dilation, int) else dilation
  pads = _pads(padding, x_shape[1:-1], w_shape[:nsp], st, dl)
  want = int_oracle(x, w, st, pads, dl, groups)
  got = quant.adder_conv_int(jnp.asarray(x), jnp.asarray(w), strides, padding,
                             dilation, groups, method=method)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)


def test_int32_partials_and_extremes_exact():
  """|-128 - 127| = 255 on every term of a 131-tap window: more terms than
  one int16 group holds (128), so the group split is exercised; both
  partial-sum dtypes give the oracle's value."""
  x = np.full((1, 140, 1), 127, np.int8)
  x[0, 135:, 0] = -128
  w = np.full((131, 1, 2), -128, np.int8)
  w[::2, 0, 1] = 127
  want = int_oracle(x, w, (1,), [(0, 0)], (1,), 1)
  assert want.min() < -32767  # beyond int16
  for pdt, method in itertools.product(quant.PARTIAL_DTYPES, quant.METHODS):
    got = quant.adder_conv_int(jnp.asarray(x), jnp.asarray(w), 1, 'VALID',
                               partial_dtype=pdt, method=method)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_adder_conv_int_under_jit_and_empty_batch():
  rng = np.random.default_rng(3)
  x = _rand_int8(rng, (2, 5, 5, 3))
  w = _rand_int8(rng, (3, 3, 3, 2))
  f = jax.jit(lambda a, b: quant.adder_conv_int(a, b, 2, 'SAME'))
  want = int_oracle(x, w, (2, 2), adder_oracle.same_padding(
      (5, 5), (3, 3), (2, 2), (1, 1)), (1, 1), 1)
  np.testing.assert_array_equal(np.asarray(f(x, w)), want)
  empty = quant.adder_conv_int(jnp.zeros((0, 5, 5, 3), jnp.int8), w)
  assert empty.shape == (0, 5, 5, 2) and empty.dtype == jnp.int32


def test_adder_dense_int_equals_oracle():
  rng = np.random.default_rng(4)
  x = _rand_int8(rng, (3, 2, 37))
  w = _rand_int8(rng, (37, 5))
  want = -np.abs(x.astype(np.int32)[..., :, None] -
                 w.astype(np.int32)[None, None]).sum(axis=-2)
  got = quant.adder_dense_int(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_integer_layer_is_float_layer_on_dequantized_operands():
  """s * acc == adder_conv(s xq, s wq): zero padding pads the quantized 0."""
  rng = np.random.default_rng(5)
  x = _rand_int8(rng, (2, 6, 6, 3), -127, 127)
  w = _rand_int8(rng, (3, 3, 3, 4), -127, 127)
  s = 0.125  # a power of two: every float product and sum here is exact
  from adderjax import adder_conv  # pylint: disable=g-import-not-at-top
  want = adder_conv(jnp.asarray(x, jnp.float32) * s,
                    jnp.asarray(w, jnp.float32) * s, 2, 'SAME')
  got = quant.adder_conv_int(jnp.asarray(x), jnp.asarray(w), 2, 'SAME')
  np.testing.assert_array_equal(np.asarray(got, np.float32) * s,
                                np.asarray(want))


def test_quantize_matches_numpy():
  rng = np.random.default_rng(6)
  x = rng.normal(size=1000).astype(np.float32) * 3
  x[:4] = [0.5, 1.5, -2.5, 1e9]  # ties round to even; large values clip
  for bits in (4, 6, 8):
    qmax = 2**(bits - 1) - 1
    want = np.clip(np.round(x / np.float32(0.25)), -qmax, qmax)
    got = quant.quantize(jnp.asarray(x), 0.25, bits)
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(got), want)


def test_validation_errors_name_the_value():
  i8 = jnp.zeros((1, 4, 4, 2), jnp.int8)
  w8 = jnp.zeros((3, 3, 2, 2), jnp.int8)
  with pytest.raises(TypeError, match='float32'):
    quant.adder_conv_int(i8.astype(jnp.float32), w8)
  with pytest.raises(TypeError, match='int32'):
    quant.adder_dense_int(jnp.zeros((2, 3), jnp.int8),
                          jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="'int64'"):
    quant.adder_conv_int(i8, w8, partial_dtype='int64')
  with pytest.raises(ValueError, match="'min'"):
    quant.adder_conv_int(i8, w8, method='min')
  with pytest.raises(ValueError, match="'min'"):
    quant.QuantConfig(method='min')
  with pytest.raises(ValueError, match='feature_group_count=3'):
    quant.adder_conv_int(i8, w8, feature_group_count=3)
  with pytest.raises(ValueError, match='expects 5'):
    quant.adder_dense_int(jnp.zeros((2, 3), jnp.int8),
                          jnp.zeros((5, 2), jnp.int8))
  for bits in (3, 9, 8.0):
    with pytest.raises(ValueError, match=f'got {bits!r}'):
      quant.QuantConfig(bits=bits)
  with pytest.raises(ValueError, match="'mse'"):
    quant.QuantConfig(calibration='mse')
  with pytest.raises(ValueError, match="'int4'"):
    quant.QuantConfig(first_last='int4')
  with pytest.raises(ValueError, match='percentile'):
    quant.QuantConfig(percentile=0)
  with pytest.raises(ValueError, match='-1.0'):
    quant.quantize(jnp.ones(3), -1.0)


# ---------------------------------------------------------------------------
# Calibration, folding and the quantized model, against a numpy pipeline.


class _Net(nn.Module):
  """Stem conv + BN, adder conv + BN, adder dense with bias, classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train,
                                   momentum=0.0, name=name)
    x = nn.Conv(3, (3, 3), padding='SAME', use_bias=False, name='stem')(x)
    x = nn.relu(bn('bn0')(x))
    x = adder_linen.AdderConv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                              use_bias=False, name='add1')(x)
    x = nn.relu(bn('bn1')(x))
    x = x.reshape(x.shape[0], -1)
    x = adder_linen.AdderDense(6, use_bias=True, name='add2')(x)
    return nn.Dense(3, name='head')(x)


@functools.lru_cache(maxsize=None)
def _net_and_data():
  model = _Net()
  x = jax.random.normal(jax.random.key(0), (6, 6, 6, 2))
  variables = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)
  params = dict(variables['params'])
  for name in ('add1', 'add2'):  # trained adder kernels outgrow the inputs
    params[name] = {**params[name], 'kernel': params[name]['kernel'] * 3.0}
  params['add2']['bias'] = jnp.linspace(-2., 2., 6)
  # Running statistics from one train-mode pass (momentum 0), then perturbed
  # BN affine parameters so that the fold has something to fold.
  state = _batch_stats(model, {**variables, 'params': params}, x)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 1.3 + 0.1 if 'bn' in jax.tree_util.keystr(p) else v,
      params)
  return model, {'params': params, 'batch_stats': state['batch_stats']}, x


def _batch_stats(model, variables, x):
  return jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'])[1])(variables, x)


def _np_bn(y, v, name):
  p, s = v['params'][name], v['batch_stats'][name]
  return ((y - np.asarray(s['mean'])) / np.sqrt(np.asarray(s['var']) + 1e-5)
          * np.asarray(p['scale']) + np.asarray(p['bias']))


def _np_conv(x, w, pads):
  """Float conv (cross-correlation) in numpy, stride 1."""
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  kh, kw = w.shape[:2]
  out = np.zeros((x.shape[0], xp.shape[1] - kh + 1, xp.shape[2] - kw + 1,
                  w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('nhwc,co->nhwo',
                       xp[:, i:i + out.shape[1], j:j + out.shape[2]], w[i, j])
  return out


def _np_pipeline(v, x, bits, first_last, clip_kernel):
  """The quantized network written out in numpy from the definitions.

  Scales come from the float activations of the calibration batch ``x``;
  the quantized forward pass then feeds quantized-path activations on. An
  adder layer is the float64 oracle on its dequantized operands: the input
  ``s * xq`` and the kernel ``s * wq``, except (``clip_kernel``) entries
  beyond the range, which the definition keeps exact.
  """
  p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in d.items()}
       for k, d in v['params'].items()}
  x = np.asarray(x, np.float64)
  qmax = 2**(bits - 1) - 1
  q = lambda a, s, m: np.clip(np.round(np.float32(a) / np.float32(s)), -m, m)

  def stem(a, int8, sx=None):
    if not int8:
      return np.maximum(_np_bn(_np_conv(a, p['stem']['kernel'],
                                        [(1, 1), (1, 1)]), v, 'bn0'), 0)
    st, pr = v['batch_stats']['bn0'], v['params']['bn0']
    mult = np.asarray(pr['scale']) / np.sqrt(np.asarray(st['var']) + 1e-5)
    wf = p['stem']['kernel'] * mult
    shift = np.asarray(pr['bias']) - mult * np.asarray(st['mean'])
    ws = np.abs(wf).max(axis=(0, 1, 2)) / 127
    acc = _np_conv(q(a, sx, 127), q(wf, ws, 127), [(1, 1), (1, 1)])
    return np.maximum(acc * sx * ws + shift, 0)

  def scale(a, w):
    r = np.abs(a).max()
    return (r if clip_kernel else max(r, np.abs(w).max())) / qmax

  def w_eff(w, s):
    return np.where(np.abs(w) > qmax * s, w, s * q(w, s, qmax))

  # Float activations (calibration).
  k1, k2 = p['add1']['kernel'], p['add2']['kernel']
  conv1 = lambda a, w: adder_oracle.forward(a, w, (2, 2), [(1, 1), (1, 1)],
                                            (1, 1), 1)
  dense2 = lambda a, w: adder_oracle.forward(a[:, None], w[None], (1,),
                                             [(0, 0)], (1,), 1)[:, 0]
  h0 = stem(x, False)
  a1 = np.maximum(_np_bn(conv1(h0, k1), v, 'bn1'), 0).reshape(len(x), -1)
  a2 = dense2(a1, k2) + p['add2']['bias']
  s1, s2 = scale(h0, k1), scale(a1, k2)
  sx0 = np.abs(x).max() / 127
  sx3 = np.abs(a2).max() / 127
  # Quantized forward pass.
  h = stem(x, first_last == 'int8', sx0)
  h = conv1(s1 * q(h, s1, qmax), w_eff(k1, s1))
  h = np.maximum(_np_bn(h, v, 'bn1'), 0).reshape(len(x), -1)
  h = dense2(s2 * q(h, s2, qmax), w_eff(k2, s2)) + p['add2']['bias']
  if first_last == 'int8':
    ws = np.abs(p['head']['kernel']).max(axis=0) / 127
    acc = q(h, sx3, 127) @ q(p['head']['kernel'], ws, 127)
    out = acc * sx3 * ws + p['head']['bias']
  else:
    out = h @ p['head']['kernel'] + p['head']['bias']
  return out, {'add1': s1, 'add2': s2, 'stem': sx0, 'head': sx3}


@pytest.mark.parametrize('bits,first_last,clip_kernel',
                         [(8, 'float', True), (5, 'int8', False)])
def test_quantized_model_matches_numpy_pipeline(bits, first_last,
                                                clip_kernel):
  model, v, x = _net_and_data()
  cfg = quant.QuantConfig(bits=bits, first_last=first_last,
                          clip_kernel=clip_kernel)
  qm = quant.calibrate(model, v, [x], cfg)
  want, scales = _np_pipeline(v, x, bits, first_last, clip_kernel)
  plan = {p.path: p for p in qm.plan}
  assert [p.path for p in qm.plan] == ['stem', 'add1', 'add2', 'head']
  assert plan['stem'].bn == 'bn0' and plan['add1'].bn == 'bn1'
  assert plan['add2'].bn is None and plan['head'].bn is None
  if clip_kernel:  # the random kernels reach beyond the activations
    assert plan['add1'].w_clipped > 0 and plan['add2'].w_clipped > 0
  else:
    assert plan['add1'].w_clipped == 0 and plan['add2'].w_clipped == 0
  for name in ('add1', 'add2'):
    np.testing.assert_allclose(plan[name].scale, scales[name], rtol=1e-5)
  if first_last == 'int8':
    for name in ('stem', 'head'):
      np.testing.assert_allclose(plan[name].scale, scales[name], rtol=1e-5)
  got = np.asarray(qm(x))
  # Float32 against float64 arithmetic: a value on a rounding boundary may
  # land one level apart; allow that for a few entries.
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(
      want).max())


def test_fold_equals_unfolded_batchnorm():
  model, v, x = _net_and_data()
  q = quant.calibrate(model, v, [x])
  for first_last in quant.FIRST_LAST:
    fold = q.requantize(quant.QuantConfig(first_last=first_last))
    nofold = q.requantize(quant.QuantConfig(first_last=first_last,
                                            fold_bn=False))
    assert all(p.bn is None for p in nofold.plan)
    np.testing.assert_allclose(fold(x), nofold(x), rtol=1e-4, atol=1e-4)


def test_percentile_calibration_clips_activations():
  model, v, x = _net_and_data()
  qm = quant.calibrate(model, v, [x], quant.QuantConfig(
      calibration='percentile', percentile=90.0))
  for p in qm.plan:
    if p.kind == 'adder':
      assert p.x_range < p.x_absmax
      np.testing.assert_allclose(p.scale, p.x_range / 127, rtol=1e-6)
  assert '| add1 | adder | 8 |' in qm.table()


@pytest.mark.slow
def test_lenet_int8_close_to_float_and_bits_order():
  """Random LeNet-5-BN with BN statistics of its own data: int8 logits stay
  close to float; fewer bits give a larger error."""
  model = models.LeNet5BN(num_classes=10)
  x = jax.random.uniform(jax.random.key(0), (64, 28, 28, 1))
  v = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)
  state = _batch_stats(model, v, x)
  v = {'params': v['params'], 'batch_stats': jax.tree.map(
      lambda a, b: (a - 0.9 * b) / 0.1, state['batch_stats'],
      v['batch_stats'])}  # undo the momentum: exactly the batch statistics
  yf = np.asarray(jax.jit(model.apply)(v, x))
  errs = {}
  q8 = quant.calibrate(model, v, [x[:32]], quant.QuantConfig(bits=8))
  for bits in (8, 4):
    qm = q8.requantize(quant.QuantConfig(bits=bits))
    assert [p.bits for p in qm.plan] == [None, bits, bits, bits, None]
    y = np.asarray(qm(x))
    errs[bits] = np.abs(y - yf).mean() / np.abs(yf).mean()
    if bits == 8:
      assert (y.argmax(1) == yf.argmax(1)).mean() >= 0.95
  assert errs[8] < 0.05, errs
  assert errs[4] > errs[8], errs


def test_calibrate_errors():
  model, v, x = _net_and_data()
  with pytest.raises(ValueError, match='at least one batch'):
    quant.calibrate(model, v, [])
  with pytest.raises(TypeError, match='QuantConfig'):
    quant.calibrate(model, v, [x], {'bits': 8})
  plain = nn.Dense(3)
  pv = jax.jit(plain.init)(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match='no AdderConv'):
    quant.calibrate(plain, pv, [jnp.ones((2, 4))])


# ---------------------------------------------------------------------------
# Every padding form of the adder layer, through the quantized model.


def _padded_oracle_input(x, padding, ks, dilation):
  """The input the oracle convolves with 'VALID' for an input padding."""
  dilated = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
  if padding == 'CAUSAL':
    return np.pad(x, [(0, 0), (dilated[0] - 1, 0), (0, 0)])
  mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
  return np.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] +
                [(0, 0)], mode=mode)


# (input shape, kernel size, strides, padding, dilation)
PADDING_CASES = {
    'SAME': ((2, 7, 6, 3), (3, 3), 2, 'SAME', 1),
    'VALID': ((2, 7, 6, 3), (3, 2), 1, 'VALID', 1),
    'int': ((1, 5, 6, 2), (3, 3), 1, 2, 1),
    'ints': ((1, 6, 5, 2), (3, 3), (2, 1), (1, 2), 1),
    'pairs': ((1, 6, 6, 2), (2, 3), 1, ((1, 0), (2, 1)), (1, 2)),
    'CIRCULAR': ((2, 5, 6, 3), (3, 2), 1, 'CIRCULAR', 1),
    'CIRCULAR-strided-dilated': ((1, 8, 7, 2), (3, 3), 2, 'circular', 2),
    'REFLECT': ((2, 6, 5, 3), (3, 3), (1, 2), 'REFLECT', 1),
    'CAUSAL': ((2, 9, 3), (3,), 1, 'CAUSAL', 2),
    'CAUSAL-strided': ((1, 10, 2), (4,), 3, 'CAUSAL', 1),
}


@pytest.mark.parametrize('name', list(PADDING_CASES))
def test_quantized_model_every_padding_form_equals_numpy_int_loop(name):
  """A model of one AdderConv with each padding form of the float layer,
  quantized on a scale of exactly 1 (integer-valued inputs reaching 127,
  kernel within them, nothing clipped): the quantized model's output is the
  int32 accumulator, equal to the numpy loop on the padded integer input and
  to the float layer itself."""
  x_shape, ks, strides, padding, dilation = PADDING_CASES[name]
  nsp = len(ks)
  rng = np.random.default_rng(sum(map(ord, name)))
  x = _rand_int8(rng, x_shape, -127, 127)
  x.flat[0] = 127  # the calibration range is 127: the scale is exactly 1
  w = _rand_int8(rng, ks + (x_shape[-1], 4), -127, 127)
  model = adder_linen.AdderConv(4, ks, strides=strides, padding=padding,
                                kernel_dilation=dilation, use_bias=False)
  xf = jnp.asarray(x, jnp.float32)
  v = {'params': {'kernel': jnp.asarray(w, jnp.float32)}}
  qm = quant.calibrate(model, v, [xf], quant.QuantConfig(clip_kernel=False))
  assert qm.plan[0].scale == 1.0 and qm.plan[0].kind == 'adder'
  st = (strides,) * nsp if isinstance(strides, int) else strides
  dl = (dilation,) * nsp if isinstance(dilation, int) else dilation
  if isinstance(padding, str) and padding.upper() in (
      'CIRCULAR', 'REFLECT', 'CAUSAL'):
    xo = _padded_oracle_input(x, padding.upper(), ks, dl)
    pads = [(0, 0)] * nsp
  else:
    xo = x
    pads = _pads(padding if not isinstance(padding, tuple) else list(padding),
                 x_shape[1:-1], ks, st, dl)
  want = int_oracle(xo, w, st, pads, dl, 1)
  got = np.asarray(qm(xf))
  np.testing.assert_array_equal(got, want.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(model.apply(v, xf)), got)
  # The op itself takes the same padding.
  direct = quant.adder_conv_int(jnp.asarray(x), jnp.asarray(w), strides,
                                padding, dilation)
  np.testing.assert_array_equal(np.asarray(direct), want)


@pytest.mark.parametrize('padding', ['CIRCULAR', 'REFLECT'])
@pytest.mark.parametrize('first_last', quant.FIRST_LAST)
def test_full_precision_conv_with_input_padding(padding, first_last):
  """An nn.Conv stem with an input padding runs in float or int8."""
  model = nn.Sequential([
      nn.Conv(3, (3, 3), padding=padding),
      adder_linen.AdderConv(2, (3, 3), padding=padding)])
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 2))
  v = model.init(jax.random.key(1), x)
  qm = quant.calibrate(model, v, [x], quant.QuantConfig(first_last=first_last))
  want = np.asarray(model.apply(v, x))
  np.testing.assert_allclose(np.asarray(qm(x)), want, rtol=0.05,
                             atol=0.05 * np.abs(want).max())


def test_causal_padding_is_one_dimensional():
  with pytest.raises(ValueError, match='CAUSAL'):
    quant.adder_conv_int(jnp.zeros((1, 4, 4, 1), jnp.int8),
                         jnp.zeros((2, 2, 1, 1), jnp.int8), padding='CAUSAL')


# ---------------------------------------------------------------------------
# Wrong input refused, right input accepted (issue 32).


def _calibrate_with(bad_value, index):
  model, v, x = _net_and_data()
  batches = [x, x]
  batches[index] = x.at[1, 2, 3, 0].set(bad_value)
  return quant.calibrate(model, v, batches)


def _calibrate_bad_kernel():
  model, v, x = _net_and_data()
  params = dict(v['params'])
  params['add1'] = {**params['add1'],
                    'kernel': params['add1']['kernel'].at[0, 0, 0, 0].set(
                        jnp.nan)}
  return quant.calibrate(model, {**v, 'params': params}, [x])


_X = jnp.array([0.3, -1.2, 2.6])

# (case, call, exception type or None (accepted), words of the message)
BAD_INPUT = [
    ('calibrate inf', lambda: _calibrate_with(jnp.inf, 1), ValueError,
     ['batch 1', "'stem'", 'non-finite', 'batch itself']),
    ('calibrate -inf', lambda: _calibrate_with(-jnp.inf, 0), ValueError,
     ['batch 0', "'stem'"]),
    ('calibrate nan', lambda: _calibrate_with(jnp.nan, 1), ValueError,
     ['batch 1', "'stem'", 'NaN']),
    ('calibrate nan kernel', _calibrate_bad_kernel, ValueError,
     ["'add1'", 'kernel']),
    ('quantize jnp 0.0', lambda: quant.quantize(_X, jnp.asarray(0.0)),
     ValueError, ['`scale`', '> 0', 'Array(0.']),
    ('quantize np 0.0', lambda: quant.quantize(_X, np.float32(0.0)),
     ValueError, ['`scale`', '> 0']),
    ('quantize inf', lambda: quant.quantize(_X, float('inf')), ValueError,
     ['`scale`', 'finite', 'inf']),
    ('quantize jnp inf', lambda: quant.quantize(_X, jnp.asarray(jnp.inf)),
     ValueError, ['`scale`', 'finite']),
    ('quantize nan', lambda: quant.quantize(_X, float('nan')), ValueError,
     ['`scale`', 'nan']),
    ('quantize -1', lambda: quant.quantize(_X, -1.0), ValueError,
     ['`scale`', '-1.0']),
    ('quantize array with 0', lambda: quant.quantize(
        _X, jnp.array([1.0, 0.0, 2.0])), ValueError,
     ['`scale`', 'everywhere', '0.0', 'index (1,)']),
    ('quantize np array with inf', lambda: quant.quantize(
        _X, np.array([1.0, 2.0, np.inf])), ValueError,
     ['`scale`', 'inf', 'index (2,)']),
    ('quantize array with nan', lambda: quant.quantize(
        _X, jnp.array([jnp.nan, 1.0, 1.0])), ValueError,
     ['`scale`', 'nan', 'index (0,)']),
    ('quantize bool array', lambda: quant.quantize(_X, jnp.array([True])),
     TypeError, ['`scale`', 'bool']),
    ('quantize str', lambda: quant.quantize(_X, '0.5'), TypeError,
     ['`scale`', "'0.5'"]),
    ('quantize bool', lambda: quant.quantize(_X, True), TypeError,
     ['`scale`', 'True']),
    ('quantize bits 3', lambda: quant.quantize(_X, 0.5, bits=3), ValueError,
     ['`bits`', 'got 3']),
    ('quantize bits 8.0', lambda: quant.quantize(_X, 0.5, bits=8.0),
     TypeError, ['`bits`', '8.0']),
    ('percentile np.float32', lambda: quant.QuantConfig(
        percentile=np.float32(99.9)), None, []),
    ('percentile jnp scalar', lambda: quant.QuantConfig(
        percentile=jnp.float32(50.0)), None, []),
    ('percentile np.int64', lambda: quant.QuantConfig(
        percentile=np.int64(100)), None, []),
    ('percentile nan', lambda: quant.QuantConfig(percentile=float('nan')),
     ValueError, ['`percentile`', 'nan']),
    ('percentile 100.5', lambda: quant.QuantConfig(percentile=100.5),
     ValueError, ['`percentile`', '(0, 100]']),
    ('percentile str', lambda: quant.QuantConfig(percentile='99'), TypeError,
     ['`percentile`', "'99'"]),
    ('percentile bool', lambda: quant.QuantConfig(percentile=True),
     TypeError, ['`percentile`']),
    ('bits np.int64', lambda: quant.QuantConfig(bits=np.int64(6)), None, []),
    ('calibration bad', lambda: quant.QuantConfig(calibration='mse'),
     ValueError, ['`calibration`', "'mse'", "'percentile'"]),
    ('quantize array scale', lambda: quant.quantize(
        _X, jnp.array([0.5, 1.0, 2.0])), None, []),
    ('quantize traced scale', lambda: jax.jit(
        lambda s: quant.quantize(_X, s))(jnp.float32(0.5)), None, []),
]


@pytest.mark.parametrize('case,call,error,words', BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_table(case, call, error, words):
  del case
  if error is None:
    call()
    return
  with pytest.raises(error) as info:
    call()
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_valid_scales_unchanged():
  """Array and NumPy scales give what a Python scale gives."""
  x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3)) * 3,
                  jnp.float32)
  want = np.asarray(quant.quantize(x, 0.25))
  for scale in (np.float32(0.25), jnp.float32(0.25), jnp.full((3,), 0.25),
                np.full((4, 1), 0.25)):
    np.testing.assert_array_equal(np.asarray(quant.quantize(x, scale)), want)
  cfg = quant.QuantConfig(percentile=np.float32(99.9))
  assert type(cfg.percentile) is float
