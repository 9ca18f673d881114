"""Adder attention under a mesh (issue 31): ``l1_scores`` runs per batch
shard with ``shard_map``; on 4 devices the attention, its gradients and a
whole ViT's train-mode gradient equal the unsharded computation, for the XLA
backend and the TPU kernels in interpret mode (Auto and Explicit mesh axes), and the
compiled step holds no all-gather. Runs in a fresh process with 4 CPU devices (as
``tests/test_optim_sharding.py``)."""

import textwrap

import multidevice

SCRIPT = textwrap.dedent('''
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from adderjax import attention, create_model

    auto = jax.make_mesh((4,), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    explicit = jax.make_mesh((4,), ('data',),
                             axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(8, 6, 2, 4)), jnp.float32)
               for _ in range(3))
    g = jnp.asarray(rng.normal(size=(8, 6, 2, 4)), jnp.float32)

    def loss(impl):
      return lambda q, k, v: jnp.sum(g * attention.attention(
          q, k, v, implementation=impl))

    for impl, mesh in ((None, auto), ('pallas_tpu_interpret', auto),
                       (None, explicit)):
      want = jax.jit(jax.value_and_grad(loss(impl), (0, 1, 2)))(q, k, v)
      fn = jax.jit(jax.value_and_grad(loss(impl), (0, 1, 2)))
      shard = NamedSharding(mesh, P('data'))
      with jax.set_mesh(mesh):
        args = [jax.device_put(a, shard) for a in (q, k, v)]
        got = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
      assert 'all-gather' not in hlo, impl

    model = create_model('vit_tiny', kind='adder', num_classes=10, depth=1,
                         hidden=8, num_heads=2, mlp_dim=8)
    x = jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)

    def vit_loss(params, x):
      out, _ = model.apply({'params': params,
                            'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
      return jnp.sum(out ** 2)

    step = jax.jit(jax.value_and_grad(vit_loss))
    want = step(variables['params'], x)
    with jax.set_mesh(auto):  # the experiments' runners use Auto axes
      got = step(variables['params'],
                 jax.device_put(x, NamedSharding(auto, P('data'))))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    print('OK')
''')


def test_sharded_attention_equals_unsharded(tmp_path):
  multidevice.run_script(tmp_path, SCRIPT, timeout=600)
