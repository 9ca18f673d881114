"""8 devices vs 1 for a user's own train step: the bound of docs/architecture.md.

Issue 28 (item 9): the README's "Swap a conv" net trained with
``addernet_sgd`` under ``jax.jit`` with the batch sharded over 8 devices
(``NamedSharding``) vs the same step on one device. In float64 the two agree
to rounding (1e-14) at every step: every reduction (BatchNorm's statistics,
the weight gradients, the adaptive learning rate's norm) is global. In
float32 they agree to 1e-5 at the first step, but the adder kernels can drift
apart by ~1e-3 of their size within 5 steps: the reduction order rounds
BatchNorm's mean of the adder outputs (which sit ~20 standard deviations
below zero) differently, a BatchNorm output within ~1e-6 of zero lands on the
other side of the ReLU, and that one element's gradient, switched on or off,
moves the adder kernel's (noise-like) gradient by up to ~1e-2; the adaptive
learning rate steps every adder kernel by a fixed ~2 % of its size, so the
parameters inherit it. With a smooth activation (softplus) in place of the
ReLU the float32 gap stays at ~1e-6 (the cause, checked here).

Each case runs in a fresh Python process that sets ``jax_num_cpu_devices=8``
before JAX starts (as ``tests/test_optim_sharding.py``), so the devices of
this pytest process are left alone.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5

# The bounds documented in docs/architecture.md ("Data parallelism: what
# 'equal' means"), as max |a - b| / max |b| per leaf (8 devices vs 1); the
# values measured on CPU with jax 0.10.2 in the comments.
LOSS_RTOL = 1e-5               # every step, float32 (measured 3e-7)
STEP1_RTOL = 1e-4              # step-1 gradients and updates, float32 (9e-6)
ADDER_KERNEL_RTOL = 1e-2       # adder kernels after 5 steps, float32 (1.6e-3)
KERNEL_RTOL = 1e-4             # other kernels and BN scales, 5 steps (5.3e-6)
IN_UPDATES = 0.2               # any parameter's gap after 5 steps in units of
                               # one step's update, float32 (0.034, adder)
SMOOTH_RTOL = 1e-4             # every parameter, softplus for ReLU (7e-6)
FLOAT64_RTOL = 1e-10           # everything, every step, float64 (6e-14)

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    if sys.argv[1] == 'float64':
      jax.config.update('jax_enable_x64', True)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import adderjax
    from adderjax.linen import AdderConv

    DTYPE = jnp.float64 if sys.argv[1] == 'float64' else jnp.float32
    STEPS, BATCH = int(sys.argv[2]), 64

    class Net(nn.Module):  # the README's "Swap a conv" net
      act: str = 'relu'

      @nn.compact
      def __call__(self, x, train: bool):
        act = getattr(nn, self.act)
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = AdderConv(64, (3, 3), strides=2, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         use_fast_variance=False)(x)
        return nn.Dense(10)(act(x).mean(axis=(1, 2)))

    rng = np.random.default_rng(0)
    images = rng.normal(size=(STEPS * BATCH, 32, 32, 3))
    labels = rng.integers(0, 10, size=STEPS * BATCH).astype(np.int32)
    example = jnp.zeros((1, 32, 32, 3))

    def train(model, devices):
      variables = jax.tree.map(lambda a: jnp.asarray(a, DTYPE),
                               model.init(jax.random.key(0), example,
                                          train=False))
      tx = adderjax.optim.addernet_sgd(
          0.1, mask=adderjax.optim.adder_mask(model, example, train=True))
      mesh = Mesh(np.asarray(devices), ('data',))
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

      def loss_fn(params, stats, x, y):
        logits, new = model.apply({'params': params, 'batch_stats': stats},
                                  x, train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.mean(), new['batch_stats']

      @jax.jit
      def step(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state, loss,
                grads, updates)

      params = jax.device_put(variables['params'], rep)
      stats = jax.device_put(variables['batch_stats'], rep)
      opt_state = jax.device_put(tx.init(variables['params']), rep)
      history = []
      for s in range(STEPS):
        batch = slice(s * BATCH, (s + 1) * BATCH)
        x = jax.device_put(jnp.asarray(images[batch], DTYPE), data)
        y = jax.device_put(jnp.asarray(labels[batch]), data)
        params, stats, opt_state, loss, grads, updates = step(
            params, stats, opt_state, x, y)
        assert grads['AdderConv_0']['kernel'].dtype == DTYPE
        history.append({'loss': float(loss), 'grads': grads,
                         'updates': updates, 'params': params})
      return history

    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return float(np.abs(a - b).max() / np.abs(b).max())

    def compare(eight, one):
      steps = []
      for e, o in zip(eight, one):
        row = {'loss': abs(e['loss'] - o['loss']) / abs(o['loss'])}
        for part in ('grads', 'updates', 'params'):
          flat_e = jax.tree_util.tree_leaves_with_path(e[part])
          flat_o = jax.tree.leaves(o[part])
          row[part] = {jax.tree_util.keystr(k): rel(a, b)
                       for (k, a), b in zip(flat_e, flat_o)}
        # The parameter gap in units of this step's update (one device).
        row['params_in_updates'] = {
            jax.tree_util.keystr(k): float(
                np.abs(np.asarray(a, np.float64) - np.asarray(b)).max()
                / np.abs(np.asarray(u)).max())
            for (k, a), b, u in zip(
                jax.tree_util.tree_leaves_with_path(e['params']),
                jax.tree.leaves(o['params']), jax.tree.leaves(o['updates']))}
        steps.append(row)
      return steps

    devices = jax.devices()
    assert len(devices) == 8, devices
    out = {}
    acts = ('relu',) if DTYPE == jnp.float64 else ('relu', 'softplus')
    for act in acts:
      model = Net(act=act)
      out[act] = compare(train(model, devices), train(model, devices[:1]))
    print('RESULT' + json.dumps(out))
''')


def _run(tmp_path, dtype: str) -> dict:
  script = tmp_path / 'data_parallel.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (REPO, env.get('PYTHONPATH')) if p)
  proc = subprocess.run([sys.executable, str(script), dtype, str(STEPS)],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  return json.loads(line[len('RESULT'):])


def _worst(rows: list[dict], part: str, select=lambda name: True) -> float:
  return max(v for row in rows for k, v in row[part].items() if select(k))


def _is_adder_kernel(name: str) -> bool:
  return 'AdderConv' in name and 'kernel' in name


def test_float32_within_documented_bound(tmp_path):
  out = _run(tmp_path, 'float32')
  relu = out['relu']
  assert len(relu) == STEPS
  # The loss of every step (a mean over the whole batch).
  assert max(row['loss'] for row in relu) <= LOSS_RTOL, relu
  # Step 1: the same parameters on 1 and 8 devices, only the order of the
  # batch reductions differs: gradients and updates agree to rounding.
  first = relu[0]
  for part in ('grads', 'updates'):
    assert max(first[part].values()) <= STEP1_RTOL, (part, first[part])
  # After 5 steps: the adder kernels within the documented bound (a ReLU
  # switched by rounding, amplified by the adaptive learning rate); other
  # kernels and scales move little per step, so to 1e-4 of their size; every
  # parameter (zero-initialised biases included) within a fraction of one
  # step's update.
  last = relu[-1]
  adder = [v for k, v in last['params'].items() if _is_adder_kernel(k)]
  assert len(adder) == 1 and adder[0] <= ADDER_KERNEL_RTOL, last['params']
  assert _worst(relu, 'params', lambda k: not _is_adder_kernel(k) and (
      'kernel' in k or 'scale' in k)) <= KERNEL_RTOL, last['params']
  assert max(last['params_in_updates'].values()) <= IN_UPDATES, (
      last['params_in_updates'])
  # The cause: without the ReLU's kink after the adder layer's BatchNorm the
  # float32 runs stay together (every parameter, every step).
  smooth = out['softplus']
  assert _worst(smooth, 'params') <= SMOOTH_RTOL, smooth[-1]['params']
  assert max(row['loss'] for row in smooth) <= LOSS_RTOL


def test_float64_equal(tmp_path):
  # In float64 the rounding is too small to switch a ReLU: 8 devices and 1
  # agree to rounding at every step, so every reduction is a global one.
  relu = _run(tmp_path, 'float64')['relu']
  assert len(relu) == STEPS
  for part in ('grads', 'updates', 'params'):
    assert _worst(relu, part) <= FLOAT64_RTOL, (part, relu[-1][part])
  assert max(row['loss'] for row in relu) <= FLOAT64_RTOL
