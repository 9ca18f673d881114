"""The compiled (non-interpret) kernels lower for their hardware, here on CPU.

* GPU: ``jax.export`` lowers every Triton kernel for ``'cuda'`` (Pallas'
  Triton lowering runs in jaxlib; only the final Triton compile needs a GPU),
  and the ``'pallas'`` backend's lowering-time dispatch picks the Triton
  kernels for ``'cuda'`` and the Mosaic ones for ``'tpu'``.
* TPU: with libtpu installed (``jax[tpu]``), every Mosaic kernel is compiled
  for a v5e topology without a TPU, including a batch-sharded forward +
  input gradient over 8 TPU devices whose HLO must not all-gather the
  patches (under ``jax.set_mesh``, see :mod:`adderjax.ops.pallas_backend`). libtpu
  prints initialisation errors and would be picked up by
  ``import jax`` without ``JAX_PLATFORMS=cpu``, so this runs in its own
  process (this file as a script) with the variables below; the test skips,
  saying why, only when libtpu is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('full_precision', 'sign', 'unclipped')

#: Environment of the deviceless TPU compile (DESIGN.md section 4).
TPU_COMPILE_ENV = {
    'JAX_PLATFORMS': 'cpu',
    'TPU_SKIP_MDS_QUERY': '1',
    'TPU_ACCELERATOR_TYPE': 'v5litepod-8',
    'TPU_WORKER_HOSTNAMES': 'localhost',
    # Another process holding libtpu (a parallel test worker, a training run
    # on the same machine) must not make this compile fail on libtpu's lock.
    'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
}

# (G, K, M, T): non-divisible, a ResNet-20 stage-1 layer, a ResNet-50 one.
SHAPES = ((2, 20, 37, 3), (1, 144, 4096, 16), (1, 4608, 1568, 512))


@pytest.mark.parametrize('dtype_name', ['float32', 'bfloat16'])
def test_every_gpu_kernel_lowers_for_cuda(dtype_name):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from pallas_kernels import adder_gpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels import adder_gpu_config  # pylint: disable=g-import-not-at-top
  from pallas_kernels import gpu_lowering  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(dtype_name)
  checks = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  configs = (None, adder_gpu_config.ForwardConfig(block_m=32, block_t=16,
                                                  block_k=3, num_warps=2))
  for g, k, m, t in SHAPES:
    p = jax.ShapeDtypeStruct((g, k, m), dtype)
    w = jax.ShapeDtypeStruct((g, k, t), dtype)
    gy = jax.ShapeDtypeStruct((g, t, m), dtype)
    lowered = []
    # The kernels used directly: the caller names the GPU to lower for.
    with gpu_lowering.gpu_lowering('cuda'):
      for cfg in configs:
        lowered.append(export.export(
            jax.jit(lambda p, w, cfg=cfg: adder_gpu.l1_forward(
                p, w, config=cfg)),
            platforms=['cuda'], disabled_checks=checks)(p, w))
      for mode in MODES:
        lowered.append(export.export(
            jax.jit(lambda p, w, gy, mode=mode: adder_gpu.l1_input_grad(
                p, w, gy, mode)),
            platforms=['cuda'], disabled_checks=checks)(p, w, gy))
    for exp in lowered:
      assert exp.platforms == ('cuda',)
      assert exp.mlir_module().count('__gpu$xla.gpu.triton') == 1


def test_gpu_lowering_rejects_non_power_of_two_tiles():
  # The constraint the GPU configs encode: Triton tiles are powers of two.
  from pallas_kernels import adder_gpu_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='power of two'):
    adder_gpu_config.ForwardConfig(block_m=48)


TRITON, MOSAIC = '__gpu$xla.gpu.triton', 'tpu_custom_call'


def _export_public_op(platforms, implementation=None):
  """``jax.export`` of an adder layer's value and both gradients."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  import adderjax  # pylint: disable=g-import-not-at-top

  def loss(x, w):
    y = adderjax.adder_conv(x, w, strides=2, padding='SAME',
                            implementation=implementation)
    return jnp.sum(y * y)

  args = (jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32))
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in (TRITON, MOSAIC)]
  exported = export.export(jax.jit(jax.value_and_grad(loss, (0, 1))),
                           platforms=platforms, disabled_checks=checks)(*args)
  return exported.mlir_module()


@pytest.mark.parametrize('platform,target,other', [
    ('cuda', TRITON, MOSAIC), ('tpu', MOSAIC, TRITON)])
def test_default_implementation_lowers_to_the_platforms_kernels(
    platform, target, other):
  # implementation=None is chosen when lowering: from this CPU host, an
  # export for an accelerator holds its kernels (forward + input gradient).
  text = _export_public_op([platform])
  # Forward + input gradient (the GPU input gradient is one call per stride
  # phase that holds taps: 4 for this stride-2 layer).
  assert text.count(target) == {MOSAIC: 2, TRITON: 5}[target]
  assert other not in text


def test_one_export_carries_every_platforms_kernels():
  # From this CPU host with no abstract device set by the caller (jax >= 0.11
  # needs one for Triton: the op sets it up), and without warnings (jax >=
  # 0.12 deprecates Pallas' Triton backend: a notice to us, not to users).
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    text = _export_public_op(['cpu', 'cuda', 'tpu'])
  assert [str(w.message) for w in caught] == []
  assert text.count(TRITON) == 5 and text.count(MOSAIC) == 2
  # The CPU branch is the XLA backend: no kernel call of its own.
  assert 'platform_index' in text or 'case' in text


# --- TPU: deviceless compile through libtpu, in its own process ------------


def compile_tpu_kernels() -> None:
  """Compiles every Mosaic kernel for v5e; run with TPU_COMPILE_ENV."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from pallas_kernels import adder_tpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels import adder_tpu_config  # pylint: disable=g-import-not-at-top
  from adderjax.ops import pallas_backend as backend  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc('v5e:2x4', 'tpu')
  assert len(topo.devices) == 8, topo.devices
  one = Mesh(np.array(topo.devices[:1]), ('x',))

  def sds(shape, dtype, mesh=one, spec=P()):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=NamedSharding(mesh, spec))

  small_fwd = adder_tpu_config.ForwardConfig(block_m=128, block_t=8,
                                             block_k=128)
  small_dx = adder_tpu_config.InputGradConfig(block_k=16, block_m=128,
                                              block_t=128)
  count = 0
  for dtype in (jnp.float32, jnp.bfloat16):
    for i, (g, k, m, t) in enumerate(SHAPES):
      p, w, gy = sds((g, k, m), dtype), sds((g, k, t), dtype), sds(
          (g, t, m), dtype)
      # Default configs everywhere, small ones (many grid steps) once.
      configs = (None, small_fwd) if i == 0 else (None,)
      dx_configs = (None, small_dx) if i == 0 else (None,)
      for cfg in configs:
        fwd = jax.jit(lambda p, w, cfg=cfg: adder_tpu.l1_forward(
            p, w, config=cfg))
        assert 'tpu_custom_call' in fwd.trace(p, w).lower().as_text()
        fwd.trace(p, w).lower().compile()
        count += 1
      for mode in MODES:
        for cfg in dx_configs:
          dx = jax.jit(lambda p, w, gy, mode=mode, cfg=cfg:
                       adder_tpu.l1_input_grad(p, w, gy, mode, config=cfg))
          dx.trace(p, w, gy).lower().compile()
          count += 1

  # Batch-sharded over the 8 devices: each runs the kernels on its M shard.
  # On TPU this needs the mesh context (shard_map); custom_partitioning is not
  # wired to libtpu in jax 0.10.2 (jax-ml/jax#38196).
  mesh = Mesh(np.array(topo.devices), ('data',),
              axis_types=(jax.sharding.AxisType.Auto,))
  ks = backend.KernelSet('tpu')
  g, k, m, t = 1, 144, 8 * 1024, 16
  p = sds((g, k, m), jnp.bfloat16, mesh, P(None, None, 'data'))
  w = sds((g, k, t), jnp.float32, mesh, P())
  gy = sds((g, t, m), jnp.float32, mesh, P(None, None, 'data'))
  step = jax.jit(lambda p, w, gy: (backend.forward_op(ks)(p, w),
                                   backend.input_grad_op(ks, 'sign')(p, w, gy)))
  with jax.set_mesh(mesh):
    compiled = step.trace(p, w, gy).lower().compile()
  hlo = compiled.as_text()
  assert 'all-gather' not in hlo, hlo
  assert hlo.count('tpu_custom_call') == 2, hlo
  y_sharding, dp_sharding = compiled.output_shardings
  assert y_sharding.spec == P(None, None, 'data'), y_sharding
  assert dp_sharding.spec == P(None, None, 'data'), dp_sharding
  print(f'compiled {count} TPU kernels and a sharded step for v5e')


def test_every_tpu_kernel_compiles_for_v5e_without_a_tpu():
  # Not marked slow on purpose (~50 s): CI installs libtpu so this runs there.
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==0.10.2"): '
                'the deviceless Mosaic compile needs it.')
  env = dict(os.environ, **TPU_COMPILE_ENV)
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)],
                        cwd=_REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  assert 'compiled 32 TPU kernels and a sharded step for v5e' in proc.stdout


if __name__ == '__main__':
  compile_tpu_kernels()
