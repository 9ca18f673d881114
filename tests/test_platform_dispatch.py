"""The lowering-time platform switch behind ``implementation=None``.

Each branch returns a distinct constant, so the compiled or exported code
shows which branch was lowered: eager and ``jit`` on this CPU host take the
CPU branch, an export for TPU the TPU branch, one export for several
platforms carries one branch per platform (``lax.platform_dependent`` would
lower a TPU-only primitive for the CPU there), ``vmap`` re-traces every
branch, and the ``partitioned`` branch replaces a platform's branch only when
XLA partitions the computation over several devices (checked in a process
with 4 CPU devices).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.ops.platform_dispatch import platform_dispatch
from adderjax.ops.platform_dispatch import target_device_kinds

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _switch(x, partitioned=None):
  return platform_dispatch(
      x, cpu=lambda a: a * 2.0 + 1.0, tpu=lambda a: a * 2.0 + 7.0,
      cuda=lambda a: a * 2.0 + 5.0, default=lambda a: a * 2.0 + 3.0,
      partitioned=partitioned)


def test_eager_and_jit_take_the_cpu_branch():
  x = jnp.arange(4.0)
  np.testing.assert_array_equal(_switch(x), 2 * np.arange(4.0) + 1)
  np.testing.assert_array_equal(jax.jit(_switch)(x), 2 * np.arange(4.0) + 1)


def test_vmap_of_every_branch():
  x = jnp.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(jax.vmap(_switch)(x), 2 * x + 1)
  np.testing.assert_array_equal(jax.jit(jax.vmap(_switch, in_axes=1))(x),
                                (2 * x + 1).T)


def test_pytrees_pass_through():
  out = platform_dispatch({'a': jnp.ones(2)}, jnp.zeros(()),
                          cpu=lambda d, z: (d['a'] + z, z),
                          default=lambda d, z: (d['a'] - z, z))
  assert isinstance(out, tuple) and out[0].shape == (2,)


def _exported_constants(platforms):
  exp = jax.export.export(jax.jit(_switch), platforms=platforms)(
      jax.ShapeDtypeStruct((4,), jnp.float32))
  text = exp.mlir_module()
  return {c for c in (1, 3, 5, 7)
          if f'{float(c):.6e}' in text or f'{c}.000000e+00' in text}


@pytest.mark.parametrize('platforms,constants', [
    (['cpu'], {1}), (['tpu'], {7}), (['cuda'], {5}), (['rocm'], {3}),
    (['cpu', 'tpu', 'cuda'], {1, 5, 7})])
def test_lowering_keeps_only_the_platforms_branches(platforms, constants):
  assert _exported_constants(platforms) == constants


def test_bad_branches_are_named():
  with pytest.raises(ValueError, match="unknown platform.*'gpu'"):
    platform_dispatch(jnp.ones(2), gpu=lambda a: a, default=lambda a: a)
  bad = lambda a: platform_dispatch(a, cpu=lambda b: b[:1],
                                    default=lambda b: b)
  for run in (bad, jax.jit(bad)):  # eagerly, and when lowered
    with pytest.raises(TypeError, match=r'a branch returns \[\(\(1,\)'):
      run(jnp.ones(2))


def test_other_platforms_branches_are_not_traced_for_cpu():
  traced = []

  def tpu_branch(a):
    traced.append(a)
    return a

  f = jax.jit(lambda a: platform_dispatch(a, tpu=tpu_branch,
                                          default=lambda b: b + 1.0))
  np.testing.assert_array_equal(f(jnp.zeros(3)), 1.0)
  assert not traced  # lowered for the CPU only
  jax.export.export(f, platforms=['tpu'])(jax.ShapeDtypeStruct((3,),
                                                               jnp.float32))
  assert traced


def test_a_branch_sees_the_device_kinds_it_is_lowered_for():
  # What the TPU kernels size their blocks by (an AOT compile for a v4
  # topology gets 'TPU v4'; tests/test_accelerator_compile.py, slow).
  seen = []

  def cpu_branch(a):
    seen.append(target_device_kinds())
    return a + 1.0

  assert target_device_kinds() == ()
  f = jax.jit(lambda a: platform_dispatch(a, cpu=cpu_branch,
                                          default=lambda b: b + 2.0))
  np.testing.assert_array_equal(f(jnp.zeros(3)), 1.0)
  assert seen[-1] == tuple(sorted({d.device_kind for d in jax.devices()}))
  assert target_device_kinds() == ()


_PARTITIONED_CHECK = r'''
import warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from adderjax.ops.platform_dispatch import platform_dispatch
from adderjax.ops.platform_dispatch import target_device_kinds
assert jax.device_count() == 4
f = lambda x: platform_dispatch(x, cpu=lambda a: a + 1.0,
                                partitioned={'cpu': lambda a: a + 2.0},
                                default=lambda a: a + 3.0)
x = jnp.zeros(8)
mesh = jax.make_mesh((4,), ('d',), (jax.sharding.AxisType.Auto,))
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  one = jax.jit(f)(x)                                   # one device
  many = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P('d'))))
  manual = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P('d'),
                                 out_specs=P('d')))(x)
np.testing.assert_array_equal(one, 1.0)
np.testing.assert_array_equal(many, 2.0)
np.testing.assert_array_equal(manual, 1.0)
assert sum('jax.set_mesh' in str(w.message) for w in caught) == 1, caught
print('partitioned ok')
'''


def test_partitioned_branch_only_where_xla_partitions():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  env['PYTHONPATH'] = os.pathsep.join(
      [_REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  proc = subprocess.run([sys.executable, '-c', _PARTITIONED_CHECK],
                        cwd=_REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'partitioned ok' in proc.stdout
