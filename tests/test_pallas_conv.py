"""Patch-free adder conv kernels in interpret mode against a numpy oracle.

The oracle below is written from the formulas of the kernels' contract
(loops over output positions and taps, float64, no patch matrix, no code
shared with ``pallas_kernels`` or ``adderjax``):

* forward ``y[n, oh, ow, t] = -sum_{i,j,c} |xpad[n, oh*sh + i*dh,
  ow*sw + j*dw, c] - w[i, j, c, t]|`` (zero padding enters the distance);
* input gradient ``dx[n, h, w, c] = sum g[n, oh, ow, t] f(w[i, j, c, t] -
  x[n, h, w, c])`` over the (tap, output) pairs that read ``x[n, h, w, c]``.

One shared base, subclassed for the GPU-flavoured (Triton) and TPU-flavoured
(Mosaic) kernels. The shapes cover today's patch-kernel tests
(tests/test_pallas_kernels.py, tests/test_pallas_adder.py) rewritten as the
convolutions they came from, ResNet-20 layers at a small batch, strides,
1x1 stride 2, explicit / 'VALID' / asymmetric padding, dilation, groups,
depthwise, 1-D, bf16, NaN locality and N=1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from pallas_kernels import conv_gpu
from pallas_kernels import conv_gpu_config
from pallas_kernels import conv_tpu
from pallas_kernels import conv_tpu_config
from pallas_kernels.conv_spec import ConvSpec

MODES = ('full_precision', 'sign', 'unclipped')


# --- oracle -----------------------------------------------------------------


def _f(mode, d):
  if mode == 'full_precision':
    return np.clip(d, -1.0, 1.0)
  if mode == 'sign':
    return np.sign(d)
  return d


def _lift(x, w, strides, padding, dilation, g=None):
  """1-D arguments as 2-D ones over H = 1."""
  if x.ndim == 3:
    x, w = x[:, None], w[None]
    g = None if g is None else g[:, None]
    strides, dilation = (1,) + tuple(strides), (1,) + tuple(dilation)
    padding = ((0, 0),) + tuple(padding)
  return x, w, g, strides, padding, dilation


def oracle_forward(x, w, strides, padding, dilation, groups):
  x1d = x.ndim == 3
  x, w, _, (sh, sw), pads, (dh, dw) = _lift(
      np.asarray(x, np.float64), np.asarray(w, np.float64), strides, padding,
      dilation)
  n, h, wd, c = x.shape
  kh, kw, cg, t = w.shape
  tg = t // groups
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
  y = np.zeros((n, oh, ow, t))
  for a in range(oh):
    for b in range(ow):
      for i in range(kh):
        for j in range(kw):
          xv = xp[:, a * sh + i * dh, b * sw + j * dw, :]       # (N, C)
          for gi in range(groups):
            d = np.abs(xv[:, gi * cg:(gi + 1) * cg, None] -
                       w[i, j, :, gi * tg:(gi + 1) * tg][None])
            y[:, a, b, gi * tg:(gi + 1) * tg] -= d.sum(1)
  return y[:, 0] if x1d else y


def oracle_input_grad(x, w, g, strides, padding, dilation, groups, mode):
  x1d = x.ndim == 3
  x, w, g, (sh, sw), pads, (dh, dw) = _lift(
      np.asarray(x, np.float64), np.asarray(w, np.float64), strides, padding,
      dilation, np.asarray(g, np.float64))
  n, h, wd, c = x.shape
  kh, kw, cg, t = w.shape
  tg = t // groups
  dx = np.zeros_like(x)
  for a in range(g.shape[1]):
    for b in range(g.shape[2]):
      for i in range(kh):
        for j in range(kw):
          r = a * sh + i * dh - pads[0][0]
          s = b * sw + j * dw - pads[1][0]
          if not (0 <= r < h and 0 <= s < wd):
            continue  # the tap reads a padded zero
          for gi in range(groups):
            cs = slice(gi * cg, (gi + 1) * cg)
            ts = slice(gi * tg, (gi + 1) * tg)
            d = w[i, j, :, ts][None] - x[:, r, s, cs, None]      # (N, cg, tg)
            dx[:, r, s, cs] += (g[:, a, b, None, ts] * _f(mode, d)).sum(-1)
  return dx[:, 0] if x1d else dx


# --- cases ------------------------------------------------------------------


def _spec(nsp, strides=1, padding=0, dilation=1, groups=1):
  def tup(v):
    return (v,) * nsp if isinstance(v, int) else tuple(v)
  if isinstance(padding, int):
    padding = ((padding, padding),) * nsp
  return ConvSpec(strides=tup(strides), padding=tuple(padding),
                  dilation=tup(dilation), groups=groups)


# name: (x shape, w shape, spec kwargs).
CASES = {
    # tests/test_pallas_adder.py, as convolutions.
    'same_s1': ((2, 7, 6, 3), (3, 3, 3, 5), dict(padding=1)),
    'valid_s2_groups': ((2, 9, 7, 4), (3, 3, 2, 6),
                        dict(strides=2, groups=2)),
    'int_pad_s21': ((1, 8, 7, 3), (2, 3, 3, 4),
                    dict(strides=(2, 1), padding=1)),
    'pairs_dilated': ((2, 7, 8, 2), (3, 2, 2, 3),
                      dict(padding=((1, 0), (2, 1)), dilation=(2, 1))),
    'conv1d_depthwise': ((3, 11, 4), (3, 1, 4),
                         dict(strides=2, padding=((2, 1),), groups=4)),
    # tests/test_pallas_kernels.py (G, K, M, T): (1, 27, 50, 10) is a 3x3x3
    # layer with 50 outputs; (2, 20, 37, 3) two groups of K=20 (5 taps x 4
    # channels) over 37 outputs, 1-D.
    'k27_m50_t10': ((2, 7, 7, 3), (3, 3, 3, 10), {}),
    'g2_k20_m37_t3': ((1, 41, 8), (5, 4, 6), dict(groups=2)),
    # ResNet-20 stage shapes at batch 2 (3x3 same, stride-2 entries, 1x1
    # stride-2 shortcut).
    'resnet20_s1': ((2, 8, 8, 16), (3, 3, 16, 16), dict(padding=1)),
    'resnet20_s2': ((2, 8, 8, 16), (3, 3, 16, 32),
                    dict(strides=2, padding=1)),
    'resnet20_1x1_s2': ((2, 8, 8, 16), (1, 1, 16, 32), dict(strides=2)),
    'valid': ((2, 6, 5, 3), (3, 3, 3, 4), {}),
    'asymmetric': ((2, 5, 6, 3), (2, 3, 3, 4),
                   dict(strides=(1, 2), padding=((0, 2), (1, 0)))),
    'dilation2': ((1, 7, 7, 2), (3, 3, 2, 3), dict(padding=2, dilation=2)),
    'depthwise': ((2, 5, 5, 4), (3, 3, 1, 8), dict(padding=1, groups=4)),
    'n1_1x1': ((1, 4, 3, 5), (1, 1, 5, 7), {}),
}


#: The default suite's share (~25 s on 2 cores for both flavours): stride 2 +
#: groups + 'VALID', asymmetric padding + dilation (and the NaN test: 3x3
#: stride 2 padding 1). The rest is marked slow.
FAST_CASES = ('valid_s2_groups', 'pairs_dilated')


def _data(case, dtype=jnp.float32, seed=0):
  x_shape, w_shape, kwargs = CASES[case]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  w = jnp.asarray(rng.normal(size=w_shape), dtype)
  spec = _spec(len(x_shape) - 2, **kwargs)
  return x, w, spec


def _oracle_args(spec):
  return spec.strides, spec.padding, spec.dilation, spec.groups


#: The interpreted kernels are big XLA:CPU programs: compiling them without the
#: backend's expensive optimisations is ~5x faster, and they run on tiny data.
_FAST_COMPILE = {'xla_backend_optimization_level': 0,
                 'xla_llvm_disable_expensive_passes': True}


def _run(fn, *args):
  """``fn(*args)`` through a quickly compiled ``jit``."""
  return jax.jit(fn).trace(*args).lower().compile(_FAST_COMPILE)(*args)


def _close(actual, expected, reduction, dtype=jnp.float32):
  assert actual.dtype == jnp.float32, actual.dtype
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = 1.0 if dtype == jnp.float32 else 2.0
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=2e-5 * scale,
                             atol=2e-6 * reduction * scale)


class _ConvTestBase(parameterized.TestCase):
  """Forward and input gradient of one kernel flavour vs the oracle."""

  __test__ = False
  module = None
  fwd_config = None   # small blocks: several blocks along every grid axis
  dx_config = None

  def _check(self, case, mode='full_precision', dtype=jnp.float32,
             fwd_config=None, dx_config=None, seed=0):
    x, w, spec = _data(case, dtype, seed)
    y = _run(lambda x, w: self.module.l1_conv_forward(
        x, w, spec, interpret=True, config=fwd_config), x, w)
    args = _oracle_args(spec)
    y_ref = oracle_forward(np.asarray(x, np.float32),
                           np.asarray(w, np.float32), *args)
    k = w.shape[-2] * int(np.prod(w.shape[:-2]))
    _close(y, y_ref, k, dtype)
    g = jnp.asarray(np.random.default_rng(seed + 1).normal(size=y.shape),
                    jnp.float32)
    dx = _run(lambda x, w, g: self.module.l1_conv_input_grad(
        x, w, g, spec, mode=mode, interpret=True, config=dx_config), x, w, g)
    dx_ref = oracle_input_grad(np.asarray(x, np.float32),
                               np.asarray(w, np.float32), g, *args, mode)
    _close(dx, dx_ref, w.shape[-1] * int(np.prod(w.shape[:-2])), dtype)

  @parameterized.parameters(*FAST_CASES)
  def test_against_oracle(self, case):
    self._check(case, mode='sign' if 'dilated' in case else 'full_precision')

  @parameterized.parameters(*[c for c in CASES if c not in FAST_CASES])
  @pytest.mark.slow
  def test_against_oracle_more_shapes(self, case):
    self._check(case, mode='sign' if 'dilation' in case else 'full_precision')

  @parameterized.parameters(*MODES)
  @pytest.mark.slow
  def test_modes(self, mode):
    self._check('int_pad_s21', mode=mode, seed=3)

  @pytest.mark.slow
  def test_bf16_inputs(self):
    self._check('resnet20_s2', dtype=jnp.bfloat16, seed=4)

  @pytest.mark.slow
  def test_many_blocks(self):
    self._check('many_blocks', fwd_config=self.fwd_config,
                dx_config=self.dx_config, seed=5)

  def test_nan_locality(self):
    # A NaN input reaches exactly the outputs whose window reads it (forward)
    # and the gradient of exactly that input (input gradient); a NaN
    # cotangent reaches exactly the inputs its output reads.
    x, w, spec = _data('nan_s2', seed=6)
    x = x.at[1, 3, 4, 2].set(jnp.nan)
    y = _run(lambda x, w: self.module.l1_conv_forward(
        x, w, spec, interpret=True), x, w)
    reads = np.zeros(x.shape[:3], bool)
    reads[1, 3, 4] = True
    hit = oracle_forward(reads[..., None].astype(np.float64),
                         np.zeros((3, 3, 1, 1)), *_oracle_args(spec)) != 0
    np.testing.assert_array_equal(np.isnan(np.asarray(y)).any(-1), hit[..., 0])
    g = jnp.ones(y.shape, jnp.float32).at[0, 2, 1, 3].set(jnp.nan)
    dx = np.asarray(_run(lambda x, w, g: self.module.l1_conv_input_grad(
        x, w, g, spec, mode='sign', interpret=True), x, w, g))
    want = np.zeros(x.shape, bool)
    want[1, 3, 4, 2] = True          # dx[n, h, w, c] reads x[n, h, w, c] only
    # Inputs read by output (0, 2, 1): rows 2*2-1+i, cols 2*1-1+j.
    for i in range(3):
      for j in range(3):
        want[0, 3 + i, 1 + j, :] = True
    np.testing.assert_array_equal(np.isnan(dx), want)

  @pytest.mark.slow
  def test_unread_inputs_get_exact_zero(self):
    # 1x1 stride 2: odd rows / columns are read by no output; a NaN there
    # must not leak, and their gradient is exactly 0.
    x, w, spec = _data('resnet20_1x1_s2', seed=7)
    x = x.at[0, 1, 3, 0].set(jnp.nan)
    y = _run(lambda x, w: self.module.l1_conv_forward(
        x, w, spec, interpret=True), x, w)
    assert np.isfinite(np.asarray(y)).all()
    dx = np.asarray(_run(lambda x, w, g: self.module.l1_conv_input_grad(
        x, w, g, spec, mode='full_precision', interpret=True), x, w,
                         jnp.ones(y.shape)))
    np.testing.assert_array_equal(dx[:, 1::2], 0.0)
    np.testing.assert_array_equal(dx[:, :, 1::2], 0.0)
    assert np.isfinite(dx).all()

  def test_bad_arguments_name_the_value(self):
    x, w, spec = _data('same_s1')
    with pytest.raises(ValueError, match=r'x has 3 channels.*\(3, 3, 2, 5\)'):
      self.module.l1_conv_forward(x, w[:, :, :2], spec, interpret=True)
    with pytest.raises(ValueError, match=r'cotangent g must have shape'):
      self.module.l1_conv_input_grad(x, w, jnp.ones((2, 7, 6, 4)), spec,
                                     mode='sign', interpret=True)
    with pytest.raises(ValueError, match="mode must be one of.*'sgn'"):
      self.module.l1_conv_input_grad(x, w, jnp.ones((2, 7, 6, 5)), spec,
                                     mode='sgn', interpret=True)
    with pytest.raises(TypeError, match='floating'):
      self.module.l1_conv_forward(x.astype(jnp.int32), w, spec,
                                  interpret=True)
    with pytest.raises(TypeError, match='ConvSpec'):
      self.module.l1_conv_forward(x, w, (1, 1), interpret=True)
    with pytest.raises(NotImplementedError, match='3 spatial dims'):
      self.module.l1_conv_forward(
          jnp.ones((1, 3, 3, 3, 2)), jnp.ones((1, 1, 1, 2, 2)),
          _spec(3), interpret=True)


# The NaN-locality geometry: 3x3, stride 2, padding 1, 3x3 outputs.
CASES['nan_s2'] = ((2, 6, 6, 3), (3, 3, 3, 4), dict(strides=2, padding=1))
# 3 blocks along N (TPU: 2 lane blocks of 128), C, T and W.
CASES['many_blocks'] = ((130, 3, 5, 136), (2, 2, 136, 20), dict(padding=1))
# A full lane block of images: the TPU kernels read the unpadded activation
# and cotangent, copying the rows a step reads into VMEM, with the padding
# handled by index arithmetic (the small batches above go through row
# strips). With 2 rows per step the copied windows are clamped at both edges.
CASES['wide_pad_s1'] = ((128, 6, 5, 16), (3, 3, 16, 8), dict(padding=1))
CASES['wide_asym_s2_dil_groups'] = (
    (128, 9, 7, 4), (3, 2, 2, 6),
    dict(strides=(2, 1), padding=((2, 1), (0, 2)), dilation=(2, 1),
         groups=2))

# Small batches of a multiple of 8 images, one group: the TPU forward reads
# the activation as (H, W, N, C) (channels on the lanes), copies each row
# strip's window and transposes it in VMEM so that the lanes are strips x
# images; windows are clamped and zero-filled per strip.
CASES['small_pad_s1'] = ((16, 9, 6, 5), (3, 3, 5, 12), dict(padding=1))
CASES['small_asym_s2_dil'] = (
    (8, 11, 7, 3), (3, 2, 3, 10),
    dict(strides=(2, 1), padding=((2, 1), (0, 2)), dilation=(2, 1)))
CASES['small_1x1_s2'] = ((32, 8, 8, 16), (1, 1, 16, 20), dict(strides=2))
# 2 channel blocks of 128 and 2 output-channel blocks of 128.
CASES['small_blocks'] = ((8, 4, 3, 136), (2, 2, 136, 136), dict(padding=1))


class TestGpuConvInterpret(_ConvTestBase):
  __test__ = True
  module = conv_gpu
  fwd_config = conv_gpu_config.ForwardConfig(block_t=8, block_w=2,
                                             num_warps=1)
  dx_config = conv_gpu_config.InputGradConfig(block_c=64, block_w=2,
                                              num_warps=1)


class TestTpuConvInterpret(_ConvTestBase):
  __test__ = True
  module = conv_tpu
  # T=20: 2 steps of 16, each 2 register sub-blocks of 8; C=136: 2 steps of
  # 128 (forward), 3 steps of 64 in sub-blocks of 32 (input gradient).
  fwd_config = conv_tpu_config.ForwardConfig(block_n=128, block_t=16,
                                             block_c=128, sub_t=8)
  dx_config = conv_tpu_config.InputGradConfig(block_n=128, block_c=64,
                                              block_t=128, sub_c=32)

  @parameterized.parameters('wide_pad_s1', 'wide_asym_s2_dil_groups')
  def test_full_lane_batch_in_row_blocks(self, case):
    self._check(
        case, mode='sign' if 'dil' in case else 'full_precision', seed=8,
        fwd_config=conv_tpu_config.ForwardConfig(block_t=8, sub_t=8,
                                                 block_r=2),
        dx_config=conv_tpu_config.InputGradConfig(block_c=16, sub_c=16,
                                                  block_r=2))

  def test_full_lane_batch_bf16(self):
    # bf16 windows: rows are read as packed 16-sublane tiles.
    self._check(
        'wide_pad_s1', dtype=jnp.bfloat16, seed=10,
        fwd_config=conv_tpu_config.ForwardConfig(block_t=8, sub_t=8,
                                                 block_r=4),
        dx_config=conv_tpu_config.InputGradConfig(block_c=16, sub_c=16,
                                                  block_r=3))

  @parameterized.parameters(
      ('small_pad_s1', 1), ('small_pad_s1', 2), ('small_asym_s2_dil', 1),
      ('small_1x1_s2', 8))
  def test_small_batch_channels_on_lanes(self, case, block_r):
    # Several strips per image; with block_r rows per step the windows of
    # the first and last strips are clamped and zero-filled.
    self._check(
        case, mode='sign' if block_r == 2 else 'full_precision', seed=11,
        fwd_config=conv_tpu_config.ForwardConfig(block_t=8, sub_t=8,
                                                 block_r=block_r),
        dx_config=conv_tpu_config.InputGradConfig(block_c=16, sub_c=16,
                                                  block_r=block_r))

  def test_small_batch_wider_block_n(self):
    # block_n=256 would fold 9 strips of 16 images (144 lanes): the
    # channels-on-lanes path keeps one lane block (8 strips).
    self._check(
        'small_pad_s1', seed=16,
        fwd_config=conv_tpu_config.ForwardConfig(block_n=256, block_t=8,
                                                 sub_t=8),
        dx_config=conv_tpu_config.InputGradConfig(block_n=256, block_c=16,
                                                  sub_c=16))

  def test_small_batch_channel_blocks(self):
    self._check(
        'small_blocks', mode='sign', seed=12,
        fwd_config=conv_tpu_config.ForwardConfig(block_t=128, block_c=128,
                                                 sub_t=32, block_r=1),
        dx_config=conv_tpu_config.InputGradConfig(block_c=64, sub_c=32))

  def test_small_batch_row_strips(self):
    # channels_on_lanes=False: the zero-padded row strips copied in HBM.
    self._check(
        'small_asym_s2_dil', seed=15,
        fwd_config=conv_tpu_config.ForwardConfig(block_t=8, sub_t=8,
                                                 channels_on_lanes=False),
        dx_config=conv_tpu_config.InputGradConfig(channels_on_lanes=False))

  def test_small_batch_bf16_and_nan_locality(self):
    self._check('small_pad_s1', dtype=jnp.bfloat16, seed=13)
    x, w, spec = _data('small_pad_s1', seed=14)
    x = x.at[3, 8, 0, 2].set(jnp.nan)        # last row, first column
    cfg = conv_tpu_config.ForwardConfig(block_t=8, sub_t=8, block_r=1)
    y = _run(lambda x, w: conv_tpu.l1_conv_forward(
        x, w, spec, interpret=True, config=cfg), x, w)
    nan = np.isnan(np.asarray(y)).any(-1)
    want = np.zeros(nan.shape, bool)
    want[3, 7:9, 0:2] = True
    np.testing.assert_array_equal(nan, want)
    # Input gradient: a NaN cotangent reaches exactly the inputs its output
    # reads; the NaN input only its own position (2 row blocks per strip,
    # so the cotangent windows are clamped and lanes masked per strip).
    g = jnp.ones(y.shape, jnp.float32).at[5, 4, 5, 1].set(jnp.nan)
    dcfg = conv_tpu_config.InputGradConfig(block_c=16, sub_c=16, block_r=1)
    dx = np.isnan(np.asarray(_run(lambda x, w, g: conv_tpu.l1_conv_input_grad(
        x, w, g, spec, mode='full_precision', interpret=True, config=dcfg),
        x, w, g)))
    want = np.zeros(x.shape, bool)
    want[3, 8, 0, 2] = True
    want[5, 3:6, 4:6, :] = True       # inputs read by output (4, 5)
    np.testing.assert_array_equal(dx, want)

  def test_full_lane_batch_nan_locality(self):
    # Unstripped path: a NaN at the image border reaches exactly the outputs
    # that read it, and a tap over the padding never reads a clamped row.
    x, w, spec = _data('wide_pad_s1', seed=9)
    x = x.at[5, 0, 4, 3].set(jnp.nan)
    cfg = conv_tpu_config.ForwardConfig(block_t=8, sub_t=8, block_r=2)
    y = _run(lambda x, w: conv_tpu.l1_conv_forward(
        x, w, spec, interpret=True, config=cfg), x, w)
    nan = np.isnan(np.asarray(y)).any(-1)
    want = np.zeros(nan.shape, bool)
    want[5, 0:2, 3:5] = True          # outputs (oh, ow) with |oh - 0|, |ow - 4| <= 1
    np.testing.assert_array_equal(nan, want)
    g = jnp.ones(y.shape, jnp.float32).at[7, 5, 0, 1].set(jnp.nan)
    dcfg = conv_tpu_config.InputGradConfig(block_c=16, sub_c=16, block_r=2)
    dx = np.isnan(np.asarray(_run(lambda x, w, g: conv_tpu.l1_conv_input_grad(
        x, w, g, spec, mode='sign', interpret=True, config=dcfg), x, w, g)))
    want = np.zeros(x.shape, bool)
    want[5, 0, 4, 3] = True
    want[7, 4:6, 0:2, :] = True       # inputs read by output (5, 0)
    np.testing.assert_array_equal(dx, want)


# --- spec and configs ---------------------------------------------------------


@pytest.mark.parametrize('kwargs,message', [
    (dict(strides=(1, 0)), 'strides must be positive'),
    (dict(dilation=(1,)), 'dilation must have one entry per spatial dim'),
    (dict(padding=((1, 1),)), 'padding must have one'),
    (dict(padding=((1, -1), (0, 0))), 'padding must be non-negative'),
    (dict(padding=((1, 1, 1), (0, 0))), 'padding must be one'),
    (dict(groups=0), 'groups must be a positive int, got 0'),
    (dict(strides=(1.5, 1)), 'strides must hold ints'),
])
def test_conv_spec_validation(kwargs, message):
  base = dict(strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
              groups=1)
  with pytest.raises((ValueError, TypeError), match=message):
    ConvSpec(**dict(base, **kwargs))


def test_conv_spec_canonical_and_hashable():
  a = ConvSpec([2, 2], [[1, 1], [0, 1]], [1, 1], 1)
  b = ConvSpec((2, 2), ((1, 1), (0, 1)), (1, 1), 1)
  assert a == b and hash(a) == hash(b)
  assert a.padding == ((1, 1), (0, 1))
  assert a.output_spatial((9, 7), (3, 3)) == (5, 3)
  with pytest.raises(ValueError, match='exceeds the padded input'):
    a.output_spatial((1, 1), (5, 5))
  with pytest.raises(Exception):
    a.groups = 2


@pytest.mark.parametrize('cls,kwargs,message', [
    (conv_tpu_config.ForwardConfig, dict(block_t=12), 'block_t.*8.*12'),
    (conv_tpu_config.ForwardConfig, dict(block_n=64), 'block_n.*128.*64'),
    (conv_tpu_config.ForwardConfig, dict(channels_on_lanes='yes'),
     "channels_on_lanes must be a bool, got 'yes'"),
    (conv_tpu_config.InputGradConfig, dict(block_c=24), 'block_c.*16.*24'),
    (conv_tpu_config.InputGradConfig, dict(vmem_limit_bytes=10),
     'vmem_limit_bytes.*10'),
    (conv_gpu_config.ForwardConfig, dict(block_w=48), 'block_w.*48'),
    (conv_gpu_config.InputGradConfig, dict(num_warps=3), 'num_warps.*3'),
])
def test_config_validation_names_bad_value(cls, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cls(**kwargs)


@pytest.mark.parametrize('generation', ['v4', 'v5e', 'v6e'])
@pytest.mark.parametrize('layer', [
    (128, 34, 34, 16, 16, 3, 3, 32, 32),     # ResNet-20 stage 1
    (32, 58, 58, 64, 64, 3, 3, 56, 56),      # ResNet-50 conv2_x 3x3
    (32, 56, 56, 256, 512, 1, 1, 28, 28),    # ResNet-50 downsample
    (32, 9, 9, 512, 512, 3, 3, 7, 7),        # ResNet-50 conv5_x 3x3
])
def test_tpu_defaults_fit_the_generation(generation, layer):
  n, h, w, c, t, kh, kw, oh, ow = layer
  gen = conv_tpu_config.get_generation(generation)
  for cls in (conv_tpu_config.ForwardConfig,
              conv_tpu_config.InputGradConfig):
    cfg = cls.get_default(n=n, h=h, w=w, c=c, t=t, kh=kh, kw=kw, oh=oh,
                          ow=ow, generation=generation)
    est = cfg.vmem_estimate(n=n, w=w, c=c, t=t, kh=kh, kw=kw, ow=ow)
    assert est <= cfg.vmem_limit_bytes <= gen.vmem_bytes, (cfg, est)
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    conv_tpu_config.get_generation('v9')


@pytest.mark.parametrize('n', [8, 32])
def test_tpu_defaults_of_grouped_small_batches_size_the_hbm_strips(n):
  # A grouped layer never reads with the channels on the lanes (the kernels
  # build its row strips in HBM): its default config, VMEM estimate and
  # limit are those of that path, not of the channels-on-lanes one.
  layer = dict(n=n, w=58, c=64, t=64, kh=3, kw=3, ow=56)
  for cls in (conv_tpu_config.ForwardConfig,
              conv_tpu_config.InputGradConfig):
    grouped = cls.get_default(h=58, oh=56, groups=2, **layer)
    assert not grouped.channels_on_lanes, grouped
    est = grouped.vmem_estimate(**layer)
    assert est <= grouped.vmem_limit_bytes, (grouped, est)
    assert cls.get_default(h=58, oh=56, **layer).channels_on_lanes


@pytest.mark.parametrize('generation', ['a100', 'h100'])
def test_gpu_defaults_fit_the_generation(generation):
  gen = conv_gpu_config.get_generation(generation)
  for t, ow in ((16, 32), (512, 7), (64, 56), (3, 1)):
    f = conv_gpu_config.ForwardConfig.get_default(t=t, ow=ow,
                                                  generation=generation)
    assert f.block_t * f.block_w <= gen.acc_elements
    d = conv_gpu_config.InputGradConfig.get_default(c=t, w=ow,
                                                    generation=generation)
    assert 2 * d.block_c * d.block_w <= gen.acc_elements
  with pytest.raises(ValueError, match="unknown GPU generation 'v100'"):
    conv_gpu_config.get_generation('v100')
