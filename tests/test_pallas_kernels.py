"""Pallas l1 kernels in interpret mode against the XLA reference.

One shared test base, subclassed for the GPU-flavoured (Triton) and the
TPU-flavoured (Mosaic) kernels; everything runs on CPU through the Pallas
interpreter. The oracle is :mod:`adderjax.ops.reference` (pure jnp, a different
algorithm: a fused max-trick loop and matmul identities). Shapes are chosen not
to divide the blocks, and small configs force several blocks / grid steps /
in-kernel chunks along every axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from adderjax.ops import reference
from pallas_kernels import adder_gpu
from pallas_kernels import adder_gpu_config
from pallas_kernels import adder_tpu
from pallas_kernels import adder_tpu_config

MODES = ('full_precision', 'sign', 'unclipped')


def _data(g, k, m, t, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=(g, k, m)), dtype)
  w = jnp.asarray(rng.normal(size=(g, k, t)), dtype)
  gy = jnp.asarray(rng.normal(size=(g, t, m)), dtype)
  return p, w, gy


def _close(actual, expected, reduction, dtype=jnp.float32):
  """atol scaled to the reduction length (f32 accumulation either way)."""
  assert actual.dtype == jnp.float32, actual.dtype
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = 1.0 if dtype == jnp.float32 else 2.0
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=2e-5 * scale, atol=2e-6 * reduction * scale)


class _KernelTestBase(parameterized.TestCase):
  """Forward and input gradient of one kernel flavour vs the reference."""

  __test__ = False     # only the subclasses run
  module = None        # adder_gpu or adder_tpu
  fwd_config = None    # small config that forces many blocks
  dx_config = None

  # (G, K, M, T): none divides a block; the first has a 3x3x3 first layer.
  @parameterized.parameters((1, 27, 50, 10), (2, 20, 37, 3))
  def test_forward_default_config(self, g, k, m, t):
    p, w, _ = _data(g, k, m, t)
    y = self.module.l1_forward(p, w, interpret=True)
    _close(y, reference.l1_forward(p, w), k)

  def test_forward_many_blocks(self):
    g, k, m, t = 1, 300, 300, 20
    p, w, _ = _data(g, k, m, t, seed=1)
    y = self.module.l1_forward(p, w, config=self.fwd_config, interpret=True)
    _close(y, reference.l1_forward(p, w), k)

  @parameterized.parameters(*MODES)
  def test_input_grad(self, mode):
    g, k, m, t = 2, 20, 37, 5
    p, w, gy = _data(g, k, m, t, seed=2)
    dp = self.module.l1_input_grad(p, w, gy, mode, interpret=True)
    _close(dp, reference.l1_input_grad(p, w, gy, mode), t)

  @parameterized.parameters('full_precision', 'sign')
  def test_input_grad_many_blocks(self, mode):
    g, k, m, t = 1, 40, 300, 300
    p, w, gy = _data(g, k, m, t, seed=3)
    dp = self.module.l1_input_grad(p, w, gy, mode, config=self.dx_config,
                                   interpret=True)
    _close(dp, reference.l1_input_grad(p, w, gy, mode), t)

  def test_bf16_inputs(self):
    g, k, m, t = 1, 36, 70, 6
    p, w, gy = _data(g, k, m, t, jnp.bfloat16, seed=4)
    y = self.module.l1_forward(p, w, interpret=True)
    _close(y, reference.l1_forward(p, w), k, jnp.bfloat16)
    dp = self.module.l1_input_grad(p, w, gy, 'full_precision', interpret=True)
    _close(dp, reference.l1_input_grad(p, w, gy, 'full_precision'), t,
           jnp.bfloat16)

  def test_sign_mode_ties_are_zero(self):
    # W == P exactly: sign(0) = 0, HardTanh(0) = 0.
    p = jnp.full((1, 4, 5), 0.5)
    w = jnp.full((1, 4, 3), 0.5)
    gy = jnp.ones((1, 3, 5))
    for mode in ('sign', 'full_precision'):
      dp = self.module.l1_input_grad(p, w, gy, mode, interpret=True)
      np.testing.assert_array_equal(np.asarray(dp), 0.0)
    y = self.module.l1_forward(p, w, interpret=True)
    np.testing.assert_array_equal(np.asarray(y), 0.0)

  def test_jit_vmap_grad_transforms(self):
    # The kernel wrappers compose with jit and vmap (pallas_call batches).
    p, w, _ = _data(1, 12, 20, 4, seed=5)
    ps = jnp.stack([p, 2 * p])
    ys = jax.jit(jax.vmap(lambda a: self.module.l1_forward(
        a, w, interpret=True)))(ps)
    _close(ys[1], reference.l1_forward(2 * p, w), 12)

  def test_bad_layout_and_mode(self):
    p, w, gy = _data(1, 4, 5, 3)
    with pytest.raises(ValueError, match=r'\(1, 4, 5\).*\(1, 6, 3\)'):
      self.module.l1_forward(p, jnp.ones((1, 6, 3)), interpret=True)
    with pytest.raises(ValueError, match=r'cotangent.*\(1, 3, 5\)'):
      self.module.l1_input_grad(p, w, gy[:, :2], 'sign', interpret=True)
    with pytest.raises(ValueError, match="mode must be one of.*'sgn'"):
      self.module.l1_input_grad(p, w, gy, 'sgn', interpret=True)
    with pytest.raises(TypeError, match='floating'):
      self.module.l1_forward(p.astype(jnp.int32), w, interpret=True)


class TestGpuKernelsInterpret(_KernelTestBase):
  __test__ = True
  module = adder_gpu
  # block_k=7 does not divide K=300; 2 T-blocks, 10 M-blocks.
  fwd_config = adder_gpu_config.ForwardConfig(block_m=32, block_t=16,
                                              block_k=7, num_warps=2)
  dx_config = adder_gpu_config.InputGradConfig(block_k=16, block_m=64,
                                               block_t=24, num_warps=2)


class TestTpuKernelsInterpret(_KernelTestBase):
  __test__ = True
  module = adder_tpu
  # K=300 -> 3 reduction grid steps of 128; T=20 -> 3 blocks of 8.
  fwd_config = adder_tpu_config.ForwardConfig(block_m=128, block_t=8,
                                              block_k=128)
  # T=300 -> 3 reduction grid steps of 128 (the last one padded).
  dx_config = adder_tpu_config.InputGradConfig(block_k=16, block_m=128,
                                               block_t=128)


class TestConfigs(parameterized.TestCase):
  """Frozen config dataclasses: validation and shape heuristics."""

  @parameterized.parameters(
      (adder_gpu_config.ForwardConfig, {'block_m': 48}, 'block_m.*48'),
      (adder_gpu_config.ForwardConfig, {'block_k': 0}, 'block_k.*0'),
      (adder_gpu_config.ForwardConfig, {'num_warps': 3}, 'num_warps.*3'),
      (adder_gpu_config.InputGradConfig, {'block_k': 24}, 'block_k.*24'),
      (adder_tpu_config.ForwardConfig, {'block_m': 100}, 'block_m.*128.*100'),
      (adder_tpu_config.ForwardConfig, {'block_k': 64}, 'block_k.*128.*64'),
      (adder_tpu_config.InputGradConfig, {'block_k': 8}, 'block_k.*16.*8'),
      (adder_tpu_config.InputGradConfig, {'block_t': 96}, 'block_t.*96'),
  )
  def test_validation_names_bad_value(self, cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
      cls(**kwargs)

  def test_frozen_and_hashable(self):
    cfg = adder_tpu_config.ForwardConfig()
    with pytest.raises(AttributeError):
      cfg.block_m = 256  # type: ignore[misc]
    assert hash(cfg) == hash(adder_tpu_config.ForwardConfig())

  # ResNet-20 (CIFAR, batch 128) and ResNet-50 (ImageNet, batch 64) layers.
  @parameterized.parameters((27, 131072, 16), (144, 131072, 16),
                            (576, 8192, 64), (4608, 3136, 512), (2048, 64, 1000),
                            (9, 5, 2))
  def test_defaults_are_valid_and_not_oversized(self, k, m, t):
    for cls in (adder_gpu_config.ForwardConfig,
                adder_gpu_config.InputGradConfig,
                adder_tpu_config.ForwardConfig,
                adder_tpu_config.InputGradConfig):
      cfg = cls.get_default(k=k, m=m, t=t)
      # Valid (post_init ran) and at most one block of padding along M.
      assert cfg.block_m <= max(128, 2 * m), (cls, cfg)
    tpu_fwd = adder_tpu_config.ForwardConfig.get_default(k=k, m=m, t=t)
    assert tpu_fwd.block_t * tpu_fwd.block_m <= 32 * 1024  # 32 vregs
    assert tpu_fwd.padded_k(k) % 16 == 0
    assert (tpu_fwd.padded_k(k) <= tpu_fwd.block_k or
            tpu_fwd.padded_k(k) % tpu_fwd.block_k == 0)
