"""Adder layers under Explicit mesh axes (``jax.make_mesh``'s default since
jax 0.7): ``adder_conv`` and ``adder_dense`` run per shard of the batch, so a
batch-sharded input trains (before, the weight gradient's contraction over
the batch and ``adder_dense``'s reshape of a 3-D input raised jax's
``ShardingTypeError``). On 4 CPU devices the forward equals a float64 numpy
oracle and the gradients equal the unsharded ones, for the XLA backend and
the TPU kernels in interpret mode; a model of adder layers (convolution,
attention, dense, BatchNorm) too; an input sharded along another axis is refused by name. Runs in
a fresh process with 4 CPU devices (as ``tests/test_optim_sharding.py``)."""

import textwrap

import multidevice

SCRIPT = textwrap.dedent('''
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import adderjax

    mesh = jax.make_mesh((4,), ('data',),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    batch = NamedSharding(mesh, P('data'))
    rng = np.random.default_rng(0)

    def oracle_conv(x, w, stride, pad):
      x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      kh, kw, _, t = w.shape
      n, h, wd, _ = x.shape
      oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
      y = np.zeros((n, oh, ow, t))
      for i in range(oh):
        for j in range(ow):
          p = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
          y[:, i, j] = -np.abs(p[..., None] - w[None]).sum((1, 2, 3))
      return y

    def close(got, want, rtol=2e-5):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1.0)
        assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)

    x = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
    g = rng.normal(size=(8, 6, 6, 5)).astype(np.float32)
    for impl in (None, 'pallas_tpu_interpret'):
      for k, stride, pad in ((3, 1, 1), (1, 2, 0)):
        w = rng.normal(size=(k, k, 4, 5)).astype(np.float32)
        gy = g[:, ::stride, ::stride]

        def loss(a, b):
          y = adderjax.adder_conv(a, b, stride, pad, implementation=impl)
          return jnp.sum(gy * y), y

        fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        (_, want_y), want_g = fn(x, w)
        with jax.set_mesh(mesh):
          xs = jax.device_put(x, batch)
          (_, y), grads = fn(xs, w)
          hlo = fn.lower(xs, w).compile().as_text()
        assert y.sharding.spec[0] == 'data', y.sharding
        assert grads[0].sharding.spec[0] == 'data', grads[0].sharding
        close(y, oracle_conv(x, w.astype(np.float64), stride, pad))
        close(grads, want_g)
        assert 'all-gather' not in hlo, (impl, k)

    # adder_dense on a (batch, tokens, features) input.
    x3 = rng.normal(size=(8, 5, 6)).astype(np.float32)
    w2 = rng.normal(size=(6, 3)).astype(np.float32)
    g3 = rng.normal(size=(8, 5, 3)).astype(np.float32)
    dense_loss = lambda a, b: jnp.sum(g3 * adderjax.adder_dense(a, b))
    fn = jax.jit(jax.value_and_grad(dense_loss, (0, 1)))
    want = fn(x3, w2)
    with jax.set_mesh(mesh):
      xs = jax.device_put(x3, batch)
      y = jax.jit(adderjax.adder_dense)(xs, w2)
      got = fn(xs, w2)
    assert y.sharding.spec[0] == 'data', y.sharding
    close(y, -np.abs(x3[..., :, None].astype(np.float64) - w2).sum(-2))
    close(got, want)

    # Sharded along the channels: refused, naming the op and the spec.
    cmesh = jax.make_mesh((4,), ('model',),
                          axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(cmesh):
      xc = jax.device_put(x, NamedSharding(cmesh, P(None, None, None, 'model')))
      try:
        adderjax.adder_conv(xc, np.ones((3, 3, 4, 5), np.float32))
      except ValueError as e:
        assert 'adder_conv' in str(e) and "'model'" in str(e), e
      else:
        raise AssertionError('a channel-sharded input was accepted')
    with jax.set_mesh(mesh):  # a 1-D x: its only axis is the features
      x1 = jax.device_put(np.ones(8, np.float32), batch)
      try:
        adderjax.adder_dense(x1, np.ones((8, 3), np.float32))
      except ValueError as e:
        assert 'adder_dense' in str(e) and "'data'" in str(e), e
      else:
        raise AssertionError('a feature-sharded 1-D input was accepted')

    # A model of adder layers only (attention included), train-mode
    # gradients: Explicit mesh == one device. (The zoo's models have a
    # full-precision conv stem, and flax's Conv cannot take a gradient under
    # Explicit axes in jax 0.10-0.12: conv_general_dilated asks for an
    # out_sharding.)
    import flax.linen as nn
    from adderjax import linen as al

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = al.AdderConv(8, (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # tokens
        x = x + al.AdderMultiHeadAttention(num_heads=2)(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        return al.AdderDense(10)(x.mean(1))

    net = Net()
    xm = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
    variables = jax.jit(lambda x: net.init(jax.random.key(0), x))(xm)

    def net_loss(params, x):
      out, _ = net.apply({'params': params,
                          'batch_stats': variables['batch_stats']}, x,
                         mutable=['batch_stats'])
      return jnp.sum(out ** 2)

    step = jax.jit(jax.value_and_grad(net_loss))
    want = step(variables['params'], xm)
    with jax.set_mesh(mesh):
      got = step(variables['params'], jax.device_put(xm, batch))
    close(got, want, rtol=1e-4)
    print('OK')
''')


def test_adder_layers_under_explicit_axes(tmp_path):
  multidevice.run_script(tmp_path, SCRIPT, timeout=900)
