"""The patch-free conv kernels lower for their hardware, here on CPU.

* GPU: ``jax.export`` for ``'cuda'`` of the forward and input gradient holds
  the Triton call (one per stride phase that has taps, for the gradient).
* TPU: with libtpu installed, every kernel variant the interpret tests run
  (strides, dilation, groups, depthwise, 1-D, 1x1, bf16, several blocks) is
  compiled by Mosaic for a v5e topology without a TPU, in its own process
  (this file as a script, environment as tests/test_pallas_lowering.py).
  Interpret mode accepts things Mosaic rejects, so this is the check that
  counts. The slow variant adds ResNet-20 (batch 128) and ResNet-50 (batch
  32, 224 px) layers and prints ``memory_analysis()`` temp bytes next to
  ``lax.conv_general_dilated``'s forward + input gradient (``jax.vjp``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TPU_COMPILE_ENV = {
    'JAX_PLATFORMS': 'cpu',
    'TPU_SKIP_MDS_QUERY': '1',
    'TPU_ACCELERATOR_TYPE': 'v5litepod-8',
    'TPU_WORKER_HOSTNAMES': 'localhost',
    'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
}

# (x shape, w shape, strides, padding, dilation, groups): every geometry of
# tests/test_pallas_conv.py, batch 8 (row strips folded into the lanes), two
# more small batches, and two at batch 128 (the unpadded activation, windows
# copied by the kernel).
VARIANTS = (
    ((128, 6, 5, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((128, 9, 7, 4), (3, 2, 2, 6), (2, 1), ((2, 1), (0, 2)), (2, 1), 2),
    ((8, 7, 6, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((8, 9, 7, 4), (3, 3, 2, 6), (2, 2), ((0, 0), (0, 0)), (1, 1), 2),
    ((8, 8, 7, 3), (2, 3, 3, 4), (2, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((8, 7, 8, 2), (3, 2, 2, 3), (1, 1), ((1, 0), (2, 1)), (2, 1), 1),
    ((8, 11, 4), (3, 1, 4), (2,), ((2, 1),), (1,), 4),
    ((8, 8, 8, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),
    ((8, 5, 5, 4), (3, 3, 1, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),
    # Small batches read with the channels on the lanes: 24 images (lanes
    # 120-127 empty), stride 2; 32 images of 136 channels (not a multiple
    # of 128) in and out.
    ((24, 10, 6, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((32, 12, 10, 136), (3, 3, 136, 136), (1, 1), ((1, 1), (1, 1)), (1, 1),
     1),
)

# name, N, H (= W), C, T, kernel, stride (padding k // 2).
LAYERS = (
    ('resnet20 32x32x16 3x3', 128, 32, 16, 16, 3, 1),
    ('resnet20 16x16x32 3x3', 128, 16, 32, 32, 3, 1),
    ('resnet20 8x8x64 3x3', 128, 8, 64, 64, 3, 1),
    ('resnet20 32x32x16->32 3x3 s2', 128, 32, 16, 32, 3, 2),
    ('resnet20 16x16x32->64 3x3 s2', 128, 16, 32, 64, 3, 2),
    ('resnet20 32x32x16->32 1x1 s2', 128, 32, 16, 32, 1, 2),
    ('resnet50 56x56x64 3x3', 32, 56, 64, 64, 3, 1),
    ('resnet50 56x56x64->256 1x1', 32, 56, 64, 256, 1, 1),
    ('resnet50 56x56x256->64 1x1', 32, 56, 256, 64, 1, 1),
    ('resnet50 56x56x128 3x3 s2', 32, 56, 128, 128, 3, 2),
    ('resnet50 56x56x256->512 1x1 s2', 32, 56, 256, 512, 1, 2),
    ('resnet50 28x28x128 3x3', 32, 28, 128, 128, 3, 1),
    ('resnet50 28x28x512->128 1x1', 32, 28, 512, 128, 1, 1),
    ('resnet50 14x14x256 3x3', 32, 14, 256, 256, 3, 1),
    ('resnet50 7x7x512 3x3', 32, 7, 512, 512, 3, 1),
)
MODES = ('full_precision', 'sign')


def _spec(strides, padding, dilation, groups):
  from pallas_kernels.conv_spec import ConvSpec  # pylint: disable=g-import-not-at-top
  return ConvSpec(strides, padding, dilation, groups)


@pytest.mark.parametrize('dtype_name', ['float32', 'bfloat16'])
def test_gpu_conv_kernels_export_for_cuda(dtype_name):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from pallas_kernels import conv_gpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels import gpu_lowering  # pylint: disable=g-import-not-at-top

  checks = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  dtype = jnp.dtype(dtype_name)
  variants = VARIANTS if dtype_name == 'float32' else VARIANTS[:1]
  # The kernels used directly: the caller names the GPU to lower for.
  with gpu_lowering.gpu_lowering('cuda'):
    for x_shape, w_shape, *geometry in variants:
      spec = _spec(*geometry)
      x = jax.ShapeDtypeStruct(x_shape, dtype)
      w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
      y = jax.eval_shape(lambda x, w, s=spec: conv_gpu.l1_conv_forward(x, w, s),
                         x, w)
      g = jax.ShapeDtypeStruct(y.shape, jnp.float32)
      fwd = export.export(
          jax.jit(lambda x, w, s=spec: conv_gpu.l1_conv_forward(x, w, s)),
          platforms=['cuda'], disabled_checks=checks)(x, w)
      assert fwd.platforms == ('cuda',)
      assert fwd.mlir_module().count('__gpu$xla.gpu.triton') == 1
      sh, sw = spec.as_2d().strides
      dh, dw = spec.as_2d().dilation
      kh, kw = (1,) + w_shape[:1] if len(x_shape) == 3 else w_shape[:2]
      phases = len({((i * dh) % sh, (j * dw) % sw) for i in range(kh)
                    for j in range(kw)})
      for mode in MODES:
        dx = export.export(
            jax.jit(lambda x, w, g, s=spec, m=mode: conv_gpu.l1_conv_input_grad(
                x, w, g, s, mode=m)),
            platforms=['cuda'], disabled_checks=checks)(x, w, g)
        assert dx.mlir_module().count('__gpu$xla.gpu.triton') == phases


# --- TPU: deviceless compile through libtpu, in its own process ------------


def compile_tpu_conv_kernels(sweep: bool) -> None:
  """Compiles the Mosaic conv kernels for v5e; run with TPU_COMPILE_ENV."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from pallas_kernels import conv_tpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels import conv_tpu_config  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc('v5e:2x4', 'tpu')
  one = Mesh(np.array(topo.devices[:1]), ('x',))

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(one, P()))

  def compile_pair(x, w, spec, mode, fwd_cfg=None, dx_cfg=None):
    y = jax.eval_shape(lambda x, w: conv_tpu.l1_conv_forward(x, w, spec),
                       x, w)
    g = sds(y.shape, jnp.float32)

    def f(x, w, g):
      return (conv_tpu.l1_conv_forward(x, w, spec, config=fwd_cfg),
              conv_tpu.l1_conv_input_grad(x, w, g, spec, mode=mode,
                                          config=dx_cfg))
    compiled = jax.jit(f).trace(x, w, g).lower().compile()
    assert compiled.as_text().count('custom-call') >= 2
    return compiled

  count = 0
  for dtype in (jnp.float32, jnp.bfloat16):
    for k, (x_shape, w_shape, *geometry) in enumerate(VARIANTS):
      # bf16 by default: the full-lane batch and the small-batch
      # (channels-on-lanes) path; every variant with --sweep.
      if dtype == jnp.bfloat16 and k not in (0, 2) and not sweep:
        continue
      spec = _spec(*geometry)
      compile_pair(sds(x_shape, dtype), sds(w_shape, jnp.float32), spec,
                   MODES[k % 2])
      count += 2
  # Several blocks along every grid axis (N: 2 lane blocks; C, T: 2 blocks).
  spec = _spec((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  compile_pair(sds((130, 3, 5, 136), jnp.bfloat16),
               sds((2, 2, 136, 136), jnp.float32), spec, 'sign',
               conv_tpu_config.ForwardConfig(block_t=16, block_c=128,
                                             sub_t=8),
               conv_tpu_config.InputGradConfig(block_c=64, block_t=128,
                                               sub_c=32))
  count += 2
  print(f'compiled {count} TPU conv kernels for v5e', flush=True)
  if not sweep:
    return

  # The v4 and v6e defaults (other block_t / channel blocks), compiled here
  # for v5e: Mosaic's tiling rules are the same on the three generations.
  count = 0
  spec = _spec((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  dims = dict(n=32, h=18, w=18, c=64, t=64, kh=3, kw=3, oh=16, ow=16)
  for gen in ('v4', 'v6e'):
    compile_pair(sds((32, 16, 16, 64), jnp.float32),
                 sds((3, 3, 64, 64), jnp.float32), spec, 'full_precision',
                 conv_tpu_config.ForwardConfig.get_default(
                     **dims, generation=gen),
                 conv_tpu_config.InputGradConfig.get_default(
                     **dims, generation=gen))
    count += 2
  print(f'compiled {count} TPU conv kernels (v4, v6e defaults)', flush=True)

  from pallas_kernels import adder_tpu  # pylint: disable=g-import-not-at-top
  print(f'{"layer (batch per chip)":34s} {"adder fwd+dx":>13s} '
        f'{"patch kernels":>14s} {"conv fwd+dx":>12s} {"activation":>11s}'
        '  (temp MiB, v5e) | bytes accessed MiB: adder, patch, conv')

  def accessed(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost.get('bytes accessed', float('nan')) / (1 << 20)
  for name, n, hw, c, t, k, s in LAYERS:
    p = k // 2
    spec = _spec((s, s), ((p, p), (p, p)), (1, 1), 1)
    x, w = sds((n, hw, hw, c), jnp.float32), sds((k, k, c, t), jnp.float32)
    adder_c = compile_pair(x, w, spec, 'full_precision')
    adder = adder_c.memory_analysis()
    y = jax.eval_shape(lambda x, w: conv_tpu.l1_conv_forward(x, w, spec),
                       x, w)
    g = sds(y.shape, jnp.float32)

    def conv(x, w, g):
      y, vjp = jax.vjp(lambda x: lax.conv_general_dilated(
          x, w, (s, s), ((p, p), (p, p)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')), x)
      return y, vjp(g)[0]
    ref_c = jax.jit(conv).trace(x, w, g).lower().compile()
    ref = ref_c.memory_analysis()

    def patches(x, w, g):
      # Today's path: a materialised patch matrix P[1, K, M], the patch
      # kernels, and col2im as the transpose of patch extraction.
      def unfold(x):
        pt = lax.conv_general_dilated_patches(
            x, (k, k), (s, s), ((p, p), (p, p)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return pt.reshape(-1, pt.shape[-1]).T[None]
      pm, col2im = jax.vjp(unfold, x)
      # conv_general_dilated_patches orders K as (C, KH, KW).
      wk = jnp.transpose(w, (2, 0, 1, 3)).reshape(1, -1, w.shape[-1])
      gm = g.reshape(-1, g.shape[-1]).T[None]
      return (adder_tpu.l1_forward(pm, wk),
              col2im(adder_tpu.l1_input_grad(pm, wk, gm).astype(x.dtype))[0])
    old_c = jax.jit(patches).trace(x, w, g).lower().compile()
    old = old_c.memory_analysis()
    mib = 1 << 20
    print(f'{name:34s} {adder.temp_size_in_bytes / mib:13.1f} '
          f'{old.temp_size_in_bytes / mib:14.1f} '
          f'{ref.temp_size_in_bytes / mib:12.1f} '
          f'{n * hw * hw * c * 4 / mib:11.1f}  | {accessed(adder_c):8.0f} '
          f'{accessed(old_c):8.0f} {accessed(ref_c):8.0f}', flush=True)


def _run_tpu_compile(sweep: bool) -> str:
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==0.10.2"): '
                'the deviceless Mosaic compile needs it.')
  env = dict(os.environ, **TPU_COMPILE_ENV)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__)] + (['--sweep'] if sweep
                                                     else []),
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=1200,
      check=False)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  return proc.stdout


def test_tpu_conv_kernels_compile_for_v5e_without_a_tpu():
  out = _run_tpu_compile(sweep=False)
  # Every variant in f32, two in bf16, and the many-blocks case.
  assert f'compiled {2 * len(VARIANTS) + 2 * 2 + 2} TPU conv kernels' in out


@pytest.mark.slow
def test_tpu_conv_kernels_resnet_layers_compile_and_memory():
  out = _run_tpu_compile(sweep=True)
  print(out)
  assert 'compiled 4 TPU conv kernels (v4, v6e defaults)' in out, out
  for name, *_ in LAYERS:
    assert name in out, out


if __name__ == '__main__':
  compile_tpu_conv_kernels(sweep='--sweep' in sys.argv)
