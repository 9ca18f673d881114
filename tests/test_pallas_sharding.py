"""Batch-sharded adder layers through the Pallas kernels on 8 fake CPU devices.

A ``pallas_call`` is opaque to XLA's partitioner: left alone, XLA gathers its
operands onto every device. Under ``jax.set_mesh`` (what the experiments'
runners do) the Pallas backends run each kernel per batch shard with
``jax.shard_map``. For a jitted forward + backward step on a batch-sharded
input this checks that the compiled HLO gathers nothing, that the gradients
keep the batch sharding, and that the numbers equal the unsharded ones (and the
XLA backend's); without a mesh the numbers are still right (the named
interpret backends then let XLA gather; ``implementation=None`` lowers the XLA
backend there, see ``tests/test_platform_dispatch.py``). A control shows the
same check catches the gather of an unpartitioned kernel.

Eight CPU devices must be requested before JAX initialises its backends, which
has usually happened in a shared pytest process; so the checks run in a fresh
process (this file as a script) unless this one already has 8 devices.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NUM_DEVICES = 8
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLLECTIVE = re.compile(r'\b(all-gather|all-to-all|collective-permute)'
                         r'(-start)?[.(]')


def _collectives(hlo: str) -> list[str]:
  return [line.strip()[:200] for line in hlo.splitlines()
          if _COLLECTIVE.search(line)]


def check_sharded_steps() -> None:
  """The sharded/unsharded comparisons; needs >= 8 JAX devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import adderjax  # pylint: disable=g-import-not-at-top
  from pallas_kernels import adder_gpu  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) >= NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  # M = 16 * 8 * 8 = 1024 output positions: 128 per device, while the
  # unsharded kernels tile M in several blocks.
  x = rng.normal(size=(16, 8, 8, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 2, 6)).astype(np.float32)
  batch = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  xs = jax.device_put(x, batch)
  ks = jax.device_put(kernel, replicated)

  def make_step(impl):
    def loss(x, k):
      y = adderjax.adder_conv(x, k, strides=1, padding='SAME',
                              feature_group_count=2, implementation=impl)
      return jnp.sum(jnp.sin(y / 4))
    return jax.jit(jax.value_and_grad(loss, (0, 1)))

  expected = make_step('xla')(x, kernel)
  for impl in ('pallas_gpu_interpret', 'pallas_tpu_interpret'):
    step = make_step(impl)
    unsharded = step(x, kernel)
    with jax.set_mesh(mesh):
      compiled = step.lower(xs, ks).compile()
      value, (dx, dk) = step(xs, ks)
    hlo = compiled.as_text()
    assert not _collectives(hlo), (impl, _collectives(hlo))
    assert 'all-reduce' in hlo  # dW (and the loss) are reduced over M.
    assert dx.sharding.is_equivalent_to(batch, x.ndim), dx.sharding
    np.testing.assert_allclose(value, unsharded[0], rtol=1e-5)
    np.testing.assert_allclose(dx, unsharded[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, unsharded[1][1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, expected[1][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk, expected[1][1], rtol=1e-4, atol=1e-4)
    # Without a mesh: right numbers (XLA may gather the interpret kernels).
    value_nm, (dx_nm, _) = step(xs, ks)
    np.testing.assert_allclose(value_nm, unsharded[0], rtol=1e-5)
    np.testing.assert_allclose(dx_nm, unsharded[1][0], rtol=1e-5, atol=1e-5)
    print(f'{impl}: no gather, sharded == unsharded')

  # Control: the bare kernel (no partitioning) on M-sharded patches gathers.
  p = jax.device_put(rng.normal(size=(1, 18, 1024)).astype(np.float32),
                     NamedSharding(mesh, P(None, None, 'data')))
  w = jax.device_put(rng.normal(size=(1, 18, 6)).astype(np.float32),
                     replicated)
  bare = jax.jit(lambda p, w: adder_gpu.l1_forward(p, w, interpret=True))
  assert any('all-gather' in c
             for c in _collectives(bare.lower(p, w).compile().as_text()))
  print('control: the unpartitioned kernel gathers')


def test_sharded_in_process():
  import jax  # pylint: disable=g-import-not-at-top
  if len(jax.devices()) < NUM_DEVICES:
    pytest.skip(f'this process has {len(jax.devices())} device(s); '
                'test_sharded_in_subprocess covers it')
  check_sharded_steps()


def test_sharded_in_subprocess():
  import jax  # pylint: disable=g-import-not-at-top
  if len(jax.devices()) >= NUM_DEVICES:
    pytest.skip('covered by test_sharded_in_process')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)],
                        cwd=_REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert 'pallas_gpu_interpret: no gather' in out, out[-3000:]
  assert 'pallas_tpu_interpret: no gather' in out, out[-3000:]
  assert 'control: the unpartitioned kernel gathers' in out, out[-3000:]


if __name__ == '__main__':
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', NUM_DEVICES)
  check_sharded_steps()
