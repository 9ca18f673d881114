"""adderjax.attacks against independent references (numpy gradients, the
l_inf ball and the pixel range), and their argument checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import attacks


def _linear_model(rng, d=12, k=4):
  w = rng.normal(size=(d, k)).astype(np.float32)
  b = rng.normal(size=(k,)).astype(np.float32)
  return w, b


def _numpy_ce_grad(x, y, w, b, mean, std):
  """d/dx of the mean cross-entropy of ((x - mean) / std) @ w + b (float64)."""
  x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
  z = ((x - mean) / std) @ w + b
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return (p @ w.T) / std / len(y)


def test_fgsm_is_the_hand_computed_sign_step_of_a_linear_model():
  rng = np.random.default_rng(0)
  w, b = _linear_model(rng)
  x = rng.uniform(0, 1, size=(32, 12)).astype(np.float32)
  x[:4, :3] = 0.0   # on the range's edges: the clip must act
  x[4:8, 3:6] = 1.0
  y = rng.integers(0, 4, size=32)
  mean, std = 0.4, 0.3
  model = nn.Dense(4)
  variables = {'params': {'kernel': jnp.asarray(w), 'bias': jnp.asarray(b)}}
  loss = attacks.classifier_loss(model.apply, variables,
                                 preprocess=lambda v: (v - mean) / std)
  eps = 0.1
  got = np.asarray(attacks.fgsm(loss, jnp.asarray(x), jnp.asarray(y), eps))
  g = _numpy_ce_grad(x, y, w, b, mean, std)
  want = np.clip(x + eps * np.sign(g), 0.0, 1.0)
  clear = np.abs(g) > 1e-6  # float32 vs float64 may disagree on a sign at 0
  assert clear.mean() > 0.99
  np.testing.assert_allclose(got[clear], want[clear], atol=1e-6)
  # The clip to [0, 1] did act somewhere.
  assert np.any((x + eps * np.sign(g) < 0) & clear)
  assert np.any((x + eps * np.sign(g) > 1) & clear)


def test_one_step_bim_and_mim_are_fgsm():
  rng = np.random.default_rng(1)
  w, b = _linear_model(rng)
  x = jnp.asarray(rng.uniform(0, 1, size=(8, 12)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=8))
  loss = attacks.classifier_loss(nn.Dense(4).apply, {'params': {
      'kernel': jnp.asarray(w), 'bias': jnp.asarray(b)}})
  f = attacks.fgsm(loss, x, y, 0.05)
  np.testing.assert_array_equal(attacks.bim(loss, x, y, 0.05, steps=1), f)
  np.testing.assert_array_equal(attacks.mim(loss, x, y, 0.05, steps=1), f)
  np.testing.assert_array_equal(
      attacks.pgd(loss, x, y, 0.05, steps=1, step_size=0.05,
                  random_start=False), f)


def _mlp_loss(rng, d):
  w1 = jnp.asarray(rng.normal(size=(d, 16)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

  def loss(x, y):
    logits = jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])
  return loss


@pytest.mark.parametrize('name', ['pgd', 'bim', 'mim'])
def test_iterates_never_leave_the_ball_nor_the_valid_range(name):
  rng = np.random.default_rng(2)
  for trial in range(4):
    shape = (int(rng.integers(1, 9)), 3, 3, 2)
    lo, hi = ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0))[trial % 3]
    x = rng.uniform(lo, hi, size=shape).astype(np.float32)
    x[0, 0] = lo  # pixels on the edges
    x[-1, -1] = hi
    y = rng.integers(0, 3, size=shape[0])
    eps = float(rng.choice([0.0, 0.01, 0.3, 2.0])) * (hi - lo)
    step_size = float(rng.choice([1e-3, 0.1, 1.0])) * (hi - lo)  # > eps too
    options = dict(steps=int(rng.integers(1, 6)), step_size=step_size,
                   valid_range=(lo, hi))
    if name == 'pgd':
      options.update(random_start=bool(trial % 2),
                     key=jax.random.key(trial))
    out = np.asarray(attacks.attack(name, _mlp_loss(rng, 18), jnp.asarray(x),
                                    jnp.asarray(y), eps, **options))
    assert out.shape == x.shape and out.dtype == np.float32
    tol = 1e-6 * max(1.0, hi)
    assert np.max(np.abs(out - x)) <= eps + tol, (name, trial, eps)
    assert out.min() >= lo and out.max() <= hi, (name, trial)


def test_pgd_raises_the_loss_and_random_start_depends_on_the_key():
  rng = np.random.default_rng(3)
  loss = _mlp_loss(rng, 18)
  x = jnp.asarray(rng.uniform(0, 1, size=(16, 18)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  a = attacks.pgd(loss, x, y, 0.1, steps=5, key=jax.random.key(0))
  b = attacks.pgd(loss, x, y, 0.1, steps=5, key=jax.random.key(1))
  assert float(loss(a, y)) > float(loss(x, y))
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  # Deterministic for a key; jit gives the same (epsilon traced).
  again = jax.jit(lambda e: attacks.pgd(loss, x, y, e, steps=5,
                                        key=jax.random.key(0)))(0.1)
  np.testing.assert_allclose(np.asarray(again), np.asarray(a), atol=1e-6)


def test_pgd_takes_a_trained_model_s_accuracy_down():
  # Two Gaussian classes in [0, 1]^d, separable with margin; a logistic
  # regression trained by gradient descent, then attacked.
  rng = np.random.default_rng(4)
  d, n = 20, 200
  y = rng.integers(0, 2, size=n)
  centres = np.where(y[:, None] == 1, 0.6, 0.4)
  x = np.clip(centres + 0.05 * rng.normal(size=(n, d)), 0, 1)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), x[:1])['params']

  def ce(p, xs, ys):
    return attacks.classifier_loss(model.apply, {'params': p})(xs, ys)
  grad = jax.jit(jax.grad(ce))
  for _ in range(200):
    params = jax.tree.map(lambda p, g: p - 1.0 * g, params, grad(params, x,
                                                                  y))

  def accuracy(xs):
    return float(jnp.mean(jnp.argmax(model.apply({'params': params}, xs), -1)
                          == y))
  assert accuracy(x) > 0.95
  loss = attacks.classifier_loss(model.apply, {'params': params})
  adv = attacks.pgd(loss, x, y, 0.15, steps=10, key=jax.random.key(1))
  assert accuracy(adv) < 0.2
  small = attacks.pgd(loss, x, y, 0.01, steps=10, key=jax.random.key(1))
  assert accuracy(adv) <= accuracy(small) <= accuracy(x)


@pytest.mark.parametrize('call, match', [
    (lambda l, x, y: attacks.fgsm(l, x, y, -0.1), '`epsilon`'),
    (lambda l, x, y: attacks.fgsm(l, x, y, float('nan')), '`epsilon`'),
    (lambda l, x, y: attacks.fgsm(l, x, y, '0.1'), '`epsilon`'),
    (lambda l, x, y: attacks.pgd(l, x, y, 0.1, steps=0), '`steps`'),
    (lambda l, x, y: attacks.bim(l, x, y, 0.1, steps=2.0), '`steps`'),
    (lambda l, x, y: attacks.mim(l, x, y, 0.1, step_size=0.0),
     '`step_size`'),
    (lambda l, x, y: attacks.pgd(l, x, y, 0.1, step_size=float('inf'),
                                 random_start=False), '`step_size`'),
    (lambda l, x, y: attacks.mim(l, x, y, 0.1, decay=-1.0), '`decay`'),
    (lambda l, x, y: attacks.pgd(l, x, y, 0.1), '`key`'),
    (lambda l, x, y: attacks.fgsm(l, (x * 255).astype(jnp.uint8), y, 0.1),
     '`x`'),
    (lambda l, x, y: attacks.fgsm(l, x, y[:2], 0.1), '`y`'),
    (lambda l, x, y: attacks.fgsm(lambda a, b: a.sum(-1), x, y, 0.1),
     '`loss_fn'),
    (lambda l, x, y: attacks.fgsm(None, x, y, 0.1), '`loss_fn`'),
    (lambda l, x, y: attacks.fgsm(l, x, y, 0.1, valid_range=(1, 0)),
     '`valid_range`'),
    (lambda l, x, y: attacks.fgsm(l, x, y, 0.1, valid_range=(0, 1, 2)),
     '`valid_range`'),
    (lambda l, x, y: attacks.attack('deepfool', l, x, y, 0.1), '`name`'),
])
def test_bad_arguments_are_named(call, match):
  rng = np.random.default_rng(5)
  loss = _mlp_loss(rng, 18)
  x = jnp.asarray(rng.uniform(0, 1, size=(4, 18)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=4))
  with pytest.raises(ValueError, match=match):
    call(loss, x, y)


def test_epsilon_zero_returns_the_input():
  rng = np.random.default_rng(6)
  loss = _mlp_loss(rng, 18)
  x = jnp.asarray(rng.uniform(0, 1, size=(4, 18)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=4))
  for name in attacks.ATTACKS:
    out = attacks.attack(name, loss, x, y, 0.0, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
