"""adderjax.optim against numpy oracles of the paper's eq. 12-13 and PyTorch SGD.

The oracles below are written from the formulas (float64 numpy), not from the
library: eq. 13 is ``eta * sqrt(k) * g / max(||g||_2, eps)``; the official
training then runs ``torch.optim.SGD`` (``d = g + wd * p; buf = m * buf + d;
p -= lr * buf``, Nesterov: ``d + m * buf``) with a per-epoch cosine LR.
"""

from __future__ import annotations

import math

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax import linen as alinen
from adderjax import nnx as annx
from adderjax import optim

ETA, EPS = 0.2, 1e-12


# ---------------------------------------------------------------------------
# Oracles.


def np_adaptive(g, eta=ETA, eps=EPS):
  g = np.asarray(g, np.float64)
  return eta * math.sqrt(g.size) * g / max(np.sqrt(np.sum(g * g)), eps)


def np_sgd_steps(params, grads_seq, lrs, adder_keys, *, scaling='adaptive',
                 ilr_factor=None, momentum=0.9, wd=5e-4, nesterov=False):
  """The official recipe by hand: scale, weight decay, momentum, -lr."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: None for k in p}
  all_updates = []
  for grads, lr in zip(grads_seq, lrs):
    updates = {}
    for k in p:
      g = np.asarray(grads[k], np.float64)
      if k in adder_keys and scaling == 'adaptive':
        g = np_adaptive(g)
      elif k in adder_keys and scaling == 'ilr':
        g = ilr_factor * g
      d = g + wd * p[k]
      buf[k] = d if buf[k] is None else momentum * buf[k] + d
      step = d + momentum * buf[k] if nesterov else buf[k]
      updates[k] = -lr * step
      p[k] = p[k] + updates[k]
    all_updates.append(updates)
  return all_updates


SHAPES = {'conv': (3, 3, 4, 8), 'dense': (16, 10), 'vec': (7,), 'one': (1,),
          'odd': (2, 1, 5)}


def make_tree(dtype, seed=0):
  rng = np.random.default_rng(seed)
  scales = {'conv': 1e-3, 'dense': 1.0, 'vec': 30.0, 'one': 2.0, 'odd': 1e-2}
  return {k: jnp.asarray(rng.normal(size=s) * scales[k], dtype)
          for k, s in SHAPES.items()}


def tol(dtype, atol=0.0):
  return dict(rtol=1e-2 if dtype == jnp.bfloat16 else 2e-6, atol=atol)


# ---------------------------------------------------------------------------
# scale_by_adaptive_lr.


@pytest.mark.parametrize('use_jit', [False, True])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_adaptive_matches_eq13(dtype, use_jit):
  tx = optim.scale_by_adaptive_lr(eta=ETA, eps=EPS)
  grads = make_tree(dtype)
  state = tx.init(grads)
  assert isinstance(state, optax.EmptyState)
  update = jax.jit(tx.update) if use_jit else tx.update
  updates, new_state = update(grads, state)
  assert isinstance(new_state, optax.EmptyState)
  for k, g in grads.items():
    assert updates[k].dtype == dtype and updates[k].shape == g.shape
    np.testing.assert_allclose(np.asarray(updates[k], np.float64),
                               np_adaptive(g), **tol(dtype), err_msg=k)


def test_adaptive_other_eta_eps_and_f16():
  tx = optim.scale_by_adaptive_lr(eta=0.7, eps=1e-3)
  g = {'a': jnp.asarray([1e-5, -2e-5], jnp.float32),     # ||g|| < eps
       'b': jnp.asarray(np.arange(12.).reshape(3, 4) - 5, jnp.float16)}
  updates, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(updates['a'], np_adaptive(g['a'], 0.7, 1e-3),
                             rtol=1e-6)
  assert updates['b'].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(updates['b'], np.float64),
                             np_adaptive(g['b'], 0.7, 1e-3), rtol=2e-3)


def test_bf16_norm_is_accumulated_in_f32():
  # 4096 ones: a bf16 running sum of squares stalls at 256 (norm 16, not 64).
  g = jnp.ones((64, 64), jnp.bfloat16)
  updates, _ = optim.scale_by_adaptive_lr().update(g, optax.EmptyState())
  assert updates.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(updates, np.float64), 0.2, rtol=4e-3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_zero_tiny_and_huge_gradients_are_finite(dtype):
  tx = optim.scale_by_adaptive_lr()
  grads = {
      'zero': jnp.zeros((3, 3, 2, 4), dtype),
      'huge': jnp.full((5, 6), 1e30, dtype),
      'huge_mixed': jnp.asarray([1e30, -3e29, 1.0, 0.0], dtype),
      'tiny': jnp.asarray([1e-30, -2e-30, 0.0], dtype),
  }
  if dtype == jnp.float32:
    grads['near_max'] = jnp.asarray([3e38, -3e38, 1.0], dtype)
  updates = jax.jit(tx.update)(grads, tx.init(grads))[0]
  for k, u in updates.items():
    assert u.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(u))), k
    # atol: XLA on CPU flushes f32 subnormals (< 1.2e-38) to zero.
    np.testing.assert_allclose(np.asarray(u, np.float64),
                               np_adaptive(grads[k]), **tol(dtype, 1e-37),
                               err_msg=k)
  assert not np.any(np.asarray(updates['zero']))


def test_masked_leaves_are_untouched():
  grads = make_tree(jnp.float32)
  mask = {k: k in ('conv', 'odd') for k in grads}
  tx = optax.masked(optim.scale_by_adaptive_lr(), mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for k in grads:
    if mask[k]:
      np.testing.assert_allclose(updates[k], np_adaptive(grads[k]), rtol=2e-6)
    else:
      np.testing.assert_array_equal(updates[k], grads[k])


def test_increased_lr_scales_and_keeps_dtype():
  g = {'a': jnp.asarray([1.0, -2.0], jnp.bfloat16),
       'b': jnp.asarray([0.5, 3.0], jnp.float32)}
  tx = optax.masked(optim.increased_lr(3.3), {'a': True, 'b': False})
  updates, _ = tx.update(g, tx.init(g))
  assert updates['a'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(updates['a'], np.float64),
                             [3.3, -6.6], rtol=4e-3)
  np.testing.assert_array_equal(updates['b'], g['b'])


# ---------------------------------------------------------------------------
# addernet_sgd: the chain against the official recipe.


def _recipe_case(seed=1):
  rng = np.random.default_rng(seed)
  shapes = {'adder_conv': (3, 3, 4, 8), 'adder_dense': (12, 5),
            'stem': (3, 3, 1, 4), 'bn_scale': (8,), 'bias': (5,),
            'head': (5, 10)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-4, 1),
                           jnp.float32) for k, s in shapes.items()}
           for _ in range(2)]
  return params, grads, ('adder_conv', 'adder_dense')


@pytest.mark.parametrize('scaling,nesterov,ilr', [
    ('adaptive', False, None), ('adaptive', True, None), ('ilr', False, 5.0),
    ('none', False, None)])
def test_two_steps_match_official_recipe(scaling, nesterov, ilr):
  params, grads, adder_keys = _recipe_case()
  mask = {k: k in adder_keys for k in params}
  sched = optim.cosine_lr_schedule(0.1, num_epochs=3, steps_per_epoch=1)
  lrs = [0.05 * (1 + math.cos(math.pi * e / 3)) for e in (0, 1)]  # official
  tx = optim.addernet_sgd(sched, mask=None if scaling == 'none' else mask,
                          momentum=0.9, weight_decay=5e-4, eta=ETA,
                          nesterov=nesterov, scaling=scaling, ilr_factor=ilr)
  want = np_sgd_steps(params, grads, lrs, adder_keys, scaling=scaling,
                      ilr_factor=ilr, nesterov=nesterov)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  p = params
  for step in range(2):
    updates, state = update(grads[step], state, p)
    for k in params:
      np.testing.assert_allclose(updates[k], want[step][k], rtol=2e-5,
                                 atol=1e-9, err_msg=f'step {step} {k}')
    p = optax.apply_updates(p, updates)


def test_zero_momentum_and_weight_decay_mask():
  params, grads, adder_keys = _recipe_case(seed=2)
  mask = {k: k in adder_keys for k in params}
  wd_mask = {k: k != 'bn_scale' for k in params}
  tx = optim.addernet_sgd(0.2, mask=mask, momentum=0.0, weight_decay=1e-2,
                          weight_decay_mask=wd_mask)
  updates, _ = tx.update(grads[0], tx.init(params), params)
  for k in params:
    g = np.asarray(grads[0][k], np.float64)
    if k in adder_keys:
      g = np_adaptive(g)
    if wd_mask[k]:
      g = g + 1e-2 * np.asarray(params[k], np.float64)
    np.testing.assert_allclose(updates[k], -0.2 * g, rtol=2e-5, err_msg=k)


def test_no_recompile_and_stable_state():
  params, grads, adder_keys = _recipe_case(seed=3)
  params['bf16'] = jnp.ones((4, 4), jnp.bfloat16)
  grads = [dict(g, bf16=jnp.full((4, 4), 0.5, jnp.bfloat16)) for g in grads]
  mask = {k: k in adder_keys + ('bf16',) for k in params}
  tx = optim.addernet_sgd(
      optim.cosine_lr_schedule(0.1, num_epochs=2, steps_per_epoch=2),
      mask=mask)
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state0 = jax.jit(tx.init)(params)
  p, s = params, state0
  for i in range(3):
    p, s = step(p, s, grads[i % 2])
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  # State and params keep structure, shapes and dtypes (incl. weak types).
  spec = lambda t: jax.tree.map(lambda x: jax.typeof(x), t)
  assert spec(s) == spec(state0)
  assert spec(p) == spec(params)


def test_cosine_schedule_matches_official_formula():
  sched = optim.cosine_lr_schedule(0.1, num_epochs=400, steps_per_epoch=196)
  steps = np.array([0, 1, 195, 196, 197, 391, 392, 196 * 137 + 5, 196 * 399,
                    196 * 400, 196 * 400 + 1000])
  epochs = np.minimum(steps // 196, 400)
  want = 0.05 * (1 + np.cos(np.pi * epochs / 400))
  got = jax.jit(jax.vmap(sched))(jnp.asarray(steps))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  smooth = optim.cosine_lr_schedule(0.1, 4, 10, per_epoch=False)
  np.testing.assert_allclose(
      [float(smooth(s)) for s in (0, 5, 20, 40)],
      [0.1, 0.05 * (1 + math.cos(math.pi * 5 / 40)), 0.05, 0.0], atol=1e-7)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='eta'):
    optim.scale_by_adaptive_lr(eta=0.0)
  with pytest.raises(ValueError, match='eps'):
    optim.scale_by_adaptive_lr(eps=float('nan'))
  with pytest.raises(ValueError, match='factor'):
    optim.increased_lr(-2)
  with pytest.raises(ValueError, match="'adam'"):
    optim.addernet_sgd(0.1, mask={}, scaling='adam')
  with pytest.raises(ValueError, match='needs mask='):
    optim.addernet_sgd(0.1)
  with pytest.raises(ValueError, match='ilr_factor'):
    optim.addernet_sgd(0.1, mask={}, scaling='ilr')
  with pytest.raises(ValueError, match='ilr_factor=2'):
    optim.addernet_sgd(0.1, mask={}, ilr_factor=2)
  with pytest.raises(ValueError, match='nesterov'):
    optim.addernet_sgd(0.1, mask={}, momentum=0, nesterov=True)
  with pytest.raises(ValueError, match='momentum'):
    optim.addernet_sgd(0.1, mask={}, momentum=-0.9)
  with pytest.raises(ValueError, match='num_epochs'):
    optim.cosine_lr_schedule(0.1, num_epochs=0)
  with pytest.raises(TypeError, match='int32'):
    optim.scale_by_adaptive_lr().update(jnp.ones(3, jnp.int32),
                                        optax.EmptyState())
  with pytest.raises(TypeError, match='Linen or an NNX|linen.Module'):
    optim.adder_mask(lambda x: x)
  with pytest.raises(TypeError, match='adder_types'):
    optim.adder_mask(nn.Dense(2), jnp.ones((1, 2)), adder_types=['Dense'])


# ---------------------------------------------------------------------------
# adder_mask: Linen.


class LinenBlock(nn.Module):
  """A residual block written with setup (the NNX-like style)."""
  in_features: int
  features: int
  stride: int = 1

  def setup(self):
    self.conv = alinen.AdderConv(self.features, (3, 3), self.stride,
                                 use_bias=False)
    self.bn = nn.BatchNorm()
    if self.in_features != self.features or self.stride != 1:
      self.proj = alinen.AdderConv(self.features, (1, 1), self.stride,
                                   use_bias=False)
      self.proj_bn = nn.BatchNorm()
    else:
      self.proj = None

  def __call__(self, x, train):
    y = self.bn(self.conv(x), use_running_average=not train)
    if self.proj is not None:
      x = self.proj_bn(self.proj(x), use_running_average=not train)
    return nn.relu(x + y)


class MyAdderConv(alinen.AdderConv):  # a subclass is selected by default
  pass


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name='stem')(x)               # plain first conv
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = LinenBlock(4, 4)(x, train)
    x = LinenBlock(4, 8, stride=2)(x, train)
    x = MyAdderConv(8, (3, 3), kernel_init=nn.with_partitioning(
        nn.initializers.normal(1.0), (None, None, None, 'model')))(x)
    x = nn.remat(alinen.AdderConv)(8, (3, 3), name='remat_adder')(x)
    x = x.mean(axis=(1, 2))
    x = alinen.AdderDense(6)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10, name='head')(x)                  # plain classifier


LINEN_SELECTED = {
    ('LinenBlock_0', 'conv', 'kernel'),
    ('LinenBlock_1', 'conv', 'kernel'),
    ('LinenBlock_1', 'proj', 'kernel'),
    ('MyAdderConv_0', 'kernel'),
    ('remat_adder', 'kernel'),
    ('AdderDense_0', 'kernel'),
}


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
  return {tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
                for k in path): leaf for path, leaf in leaves}


def test_linen_mask_selects_exactly_the_adder_kernels():
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  mask = optim.adder_mask(LinenNet(), x, train=True)
  variables = jax.eval_shape(LinenNet().init, jax.random.key(0), x)
  params = variables['params']
  flat = _flat(mask)
  assert set(flat) == set(_flat(params))       # shaped like variables['params']
  assert all(isinstance(v, bool) for v in flat.values())
  assert {k for k, v in flat.items() if v} == LINEN_SELECTED
  # The boxed (nn.Partitioned) kernel is one mask leaf; optax.masked accepts
  # the mask for both the boxed and the unboxed tree.
  unboxed = nn.meta.unbox(params)
  for tree in (params, unboxed):
    tx = optax.masked(optim.scale_by_adaptive_lr(), mask)
    grads = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), tree)
    updates, _ = tx.update(grads, tx.init(grads))
    u = _flat(nn.meta.unbox(updates))
    for k, v in u.items():
      if k in LINEN_SELECTED:
        np.testing.assert_allclose(v, ETA, rtol=1e-6)   # sqrt(k)*1/sqrt(k)
      else:
        np.testing.assert_array_equal(v, 1.0)


class NotAnAdder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param('w', nn.initializers.ones, (x.shape[-1],))


class CustomAdder(nn.Module):
  @nn.compact
  def __call__(self, x):
    k = self.param('kernel', nn.initializers.normal(1.0), (x.shape[-1], 3))
    return -jnp.abs(x[..., :, None] - k).sum(-2)


class CustomNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = CustomAdder()(x)
    x = NotAnAdder()(x)
    return alinen.AdderDense(2)(x)


def test_linen_mask_extra_adder_types():
  x = jnp.ones((1, 4))
  default = _flat(optim.adder_mask(CustomNet(), x))
  assert {k for k, v in default.items() if v} == {('AdderDense_0', 'kernel')}
  extended = _flat(optim.adder_mask(
      CustomNet(), x, adder_types=optim.LINEN_ADDER_TYPES + (CustomAdder,)))
  assert {k for k, v in extended.items() if v} == {
      ('AdderDense_0', 'kernel'), ('CustomAdder_0', 'kernel')}
  with pytest.raises(ValueError, match='NotAnAdder at path NotAnAdder_0'):
    optim.adder_mask(CustomNet(), x, adder_types=(NotAnAdder,))


# ---------------------------------------------------------------------------
# adder_mask: NNX.


class NnxBlock(nnx.Module):

  def __init__(self, cin, cout, stride, *, rngs):
    self.conv = annx.AdderConv(cin, cout, (3, 3), stride, use_bias=False,
                               rngs=rngs)
    self.bn = nnx.BatchNorm(cout, rngs=rngs)
    self.proj = (annx.AdderConv(cin, cout, (1, 1), stride, use_bias=False,
                                rngs=rngs)
                 if cin != cout or stride != 1 else None)

  def __call__(self, x):
    y = self.bn(self.conv(x))
    if self.proj is not None:
      x = self.proj(x)
    return nnx.relu(x + y)


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(4, 4, 1, rngs=rngs),
                            NnxBlock(4, 8, 2, rngs=rngs)])
    self.fc = annx.AdderDense(8, 6, rngs=rngs)
    self.fc_bn = nnx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(self.fc_bn(self.fc(x.mean(axis=(1, 2)))))


NNX_SELECTED = {('blocks', 0, 'conv', 'kernel'), ('blocks', 1, 'conv', 'kernel'),
                ('blocks', 1, 'proj', 'kernel'), ('fc', 'kernel')}


def _concrete(abstract_model, seed=0):
  """Random values for an abstract (nnx.eval_shape) model: no init compiles."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract_model)
  state = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


def test_nnx_mask_selects_exactly_the_adder_kernels():
  model = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))   # abstract is enough
  mask = optim.adder_mask(model)
  flat = dict(nnx.to_flat_state(mask))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  assert set(flat) == set(dict(nnx.to_flat_state(params)))
  assert all(isinstance(v, bool) for v in flat.values())
  assert {k for k, v in flat.items() if v} == NNX_SELECTED


def test_nnx_optimizer_step_matches_recipe():
  model = _concrete(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
  mask = optim.adder_mask(model)
  lr, wd = 0.1, 5e-4
  optimizer = nnx.Optimizer(
      model, optim.addernet_sgd(lr, mask=mask, weight_decay=wd), wrt=nnx.Param)
  before = {k: np.asarray(v, np.float64) for k, v in
            nnx.to_flat_state(nnx.as_pure(nnx.state(model, nnx.Param)))}
  rng = np.random.default_rng(1)
  grad_state = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, p.dtype),
      nnx.state(model, nnx.Param))
  grads = {k: np.asarray(v, np.float64)
           for k, v in nnx.to_flat_state(nnx.as_pure(grad_state))}
  optimizer.update(model, grad_state)
  after = dict(nnx.to_flat_state(nnx.as_pure(nnx.state(model, nnx.Param))))
  assert set(after) == set(before)
  for k, p0 in before.items():
    g = np_adaptive(grads[k]) if k in NNX_SELECTED else grads[k]
    np.testing.assert_allclose(after[k], p0 - lr * (g + wd * p0), rtol=1e-5,
                               atol=1e-7, err_msg=str(k))


def test_nnx_mask_rejects_example_inputs():
  with pytest.raises(TypeError, match='no example inputs'):
    optim.adder_mask(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))),
                     jnp.ones((1, 8, 8, 1)))


# ---------------------------------------------------------------------------
# optax wrappers: inject_hyperparams (every numeric argument traced under
# jit), MultiSteps, apply_if_finite (issue 28 item 8).


def _jit_steps(tx, params, grads_seq):
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  p, out = params, []
  for g in grads_seq:
    u, state = update(g, state, p)
    out.append(u)
    p = optax.apply_updates(p, u)
  return out, state


@pytest.mark.parametrize('kwargs', [
    dict(), dict(nesterov=True), dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.5, weight_decay=1e-2, eta=0.3, eps=1e-6),
    dict(scaling='ilr', ilr_factor=5.0), dict(scaling='none'),
])
def test_inject_hyperparams_under_jit_matches_constants_and_numpy(kwargs):
  params, grads, adder_keys = _recipe_case(seed=4)
  mask = None if kwargs.get('scaling') == 'none' else {
      k: k in adder_keys for k in params}
  injected = optax.inject_hyperparams(optim.addernet_sgd)(
      learning_rate=0.1, mask=mask, **kwargs)
  got, state = _jit_steps(injected, params, grads)
  numeric = {'learning_rate', 'momentum', 'weight_decay', 'eta', 'eps',
             'ilr_factor'}
  # Every numeric argument given (defaults included) is in the state, i.e.
  # traced inside the jitted update.
  assert set(state.hyperparams) == numeric & (
      {'learning_rate', 'momentum', 'weight_decay', 'eta', 'eps'}
      | set(kwargs))
  plain, _ = _jit_steps(optim.addernet_sgd(0.1, mask=mask, **kwargs),
                        params, grads)
  hand = np_sgd_steps(
      params, grads, [0.1, 0.1], adder_keys,
      scaling=kwargs.get('scaling', 'adaptive'),
      ilr_factor=kwargs.get('ilr_factor'),
      momentum=kwargs.get('momentum', 0.9),
      wd=kwargs.get('weight_decay', 5e-4), nesterov=kwargs.get('nesterov',
                                                               False))
  eta, eps = kwargs.get('eta', ETA), kwargs.get('eps', EPS)
  if (eta, eps) != (ETA, EPS):  # np_sgd_steps's oracle has the defaults
    hand = None
  for step in range(2):
    for k in params:
      # Constants vs traced values: XLA may fold and reassociate the
      # constant products differently (f32 rounding of the largest terms).
      np.testing.assert_allclose(got[step][k], plain[step][k], rtol=1e-6,
                                 atol=1e-8, err_msg=f'step {step} {k}')
      if hand is not None:
        np.testing.assert_allclose(got[step][k], hand[step][k], rtol=2e-5,
                                   atol=1e-8, err_msg=f'step {step} {k}')


def test_inject_hyperparams_eta_eps_by_hand_and_lr_change():
  # One step by hand in numpy with eta / eps that are not the defaults.
  params = {'a': jnp.asarray([3.0, 4.0, 0.0, 0.0]), 'b': jnp.asarray([2.0])}
  grads = {'a': jnp.asarray([0.3, -0.4, 0.0, 1.2]), 'b': jnp.asarray([0.5])}
  mask = {'a': True, 'b': False}
  tx = optax.inject_hyperparams(optim.addernet_sgd)(
      learning_rate=0.05, mask=mask, momentum=0.8, weight_decay=0.01,
      eta=0.5, eps=1e-3)
  (u,), state = _jit_steps(tx, params, [grads])
  ga = np.array([0.3, -0.4, 0.0, 1.2])
  want_a = -0.05 * (0.5 * 2.0 * ga / np.linalg.norm(ga)
                    + 0.01 * np.array([3.0, 4.0, 0.0, 0.0]))
  np.testing.assert_allclose(u['a'], want_a, rtol=1e-6)
  np.testing.assert_allclose(u['b'], [-0.05 * (0.5 + 0.01 * 2.0)], rtol=1e-6)
  # A new learning rate in the state: the next step uses it, no retrace.
  update = jax.jit(tx.update)
  p = optax.apply_updates(params, u)
  a, _ = update(grads, state, p)
  state.hyperparams['learning_rate'] = jnp.asarray(0.1, jnp.float32)
  b, _ = update(grads, state, p)
  np.testing.assert_allclose(b['b'], 2 * a['b'], rtol=1e-6)
  assert update._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize('factory,kwargs', [
    (optim.scale_by_adaptive_lr, dict(eta=0.3, eps=1e-8)),
    (optim.increased_lr, dict(factor=4.0)),
])
def test_inject_hyperparams_of_the_scaling_transforms(factory, kwargs):
  g = {'k': jnp.asarray([3.0, 4.0, 0.0])}
  tx = optax.inject_hyperparams(factory)(**kwargs)
  got = jax.jit(tx.update)(g, jax.jit(tx.init)(g))[0]['k']
  ref = factory(**kwargs)
  want = ref.update(g, ref.init(g))[0]['k']
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize('kwargs', [
    dict(momentum=1.5), dict(momentum=-0.1), dict(eta=-1.0),
    dict(eps=0.0), dict(learning_rate=-0.1), dict(weight_decay=np.nan),
    dict(momentum=0.0, nesterov=True),
    dict(scaling='ilr', ilr_factor=-2.0),
])
def test_injected_bad_values_raise_eagerly_and_are_nan_under_jit(kwargs):
  params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
  mask = {'a': True, 'b': False}
  kwargs = {'learning_rate': 0.1, **kwargs}
  tx = optax.inject_hyperparams(optim.addernet_sgd)(mask=mask, **kwargs)
  name = [k for k in kwargs if k not in ('learning_rate', 'nesterov',
                                         'scaling')]
  name = name[0] if name else 'learning_rate'
  with pytest.raises(ValueError, match=name):
    tx.init(params)  # concrete: the same error as addernet_sgd's
  with pytest.raises(ValueError, match=name):
    optim.addernet_sgd(mask=mask, **kwargs)
  # Traced (init and update under jit): no error can be raised, the updates
  # are NaN.
  grads = {'a': jnp.full(3, 0.1), 'b': jnp.full(2, 0.1)}
  (u,), _ = _jit_steps(tx, params, [grads])
  assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(u))


def test_multisteps_wraps_addernet_sgd():
  params, grads, adder_keys = _recipe_case(seed=5)
  mask = {k: k in adder_keys for k in params}
  tx = optim.addernet_sgd(0.1, mask=mask)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  state = jax.jit(multi.init)(params)
  update = jax.jit(multi.update)
  u0, state = update(grads[0], state, params)
  for leaf in jax.tree.leaves(u0):  # accumulating: no update yet
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  u1, state = update(grads[1], state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1])
  want = np_sgd_steps(params, [mean], [0.1], adder_keys)[0]
  for k in params:
    np.testing.assert_allclose(u1[k], want[k], rtol=2e-5, atol=1e-9,
                               err_msg=k)
  # And with injected hyperparameters inside.
  inner = optax.inject_hyperparams(optim.addernet_sgd)(learning_rate=0.1,
                                                       mask=mask)
  multi = optax.MultiSteps(inner, every_k_schedule=2)
  state = jax.jit(multi.init)(params)
  _, state = jax.jit(multi.update)(grads[0], state, params)
  u, _ = jax.jit(multi.update)(grads[1], state, params)
  for k in params:
    np.testing.assert_allclose(u[k], want[k], rtol=2e-5, atol=1e-9,
                               err_msg=k)


def test_apply_if_finite_wraps_addernet_sgd():
  params, grads, adder_keys = _recipe_case(seed=6)
  mask = {k: k in adder_keys for k in params}
  for tx in (optim.addernet_sgd(0.1, mask=mask),
             optax.inject_hyperparams(optim.addernet_sgd)(learning_rate=0.1,
                                                          mask=mask)):
    safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
    state = jax.jit(safe.init)(params)
    update = jax.jit(safe.update)
    bad = dict(grads[0], adder_conv=grads[0]['adder_conv'].at[0, 0, 0, 0].set(
        jnp.nan))
    u, state = update(bad, state, params)
    for leaf in jax.tree.leaves(u):  # skipped step: zero updates
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    assert int(state.notfinite_count) == 1
    u, state = update(grads[0], state, params)
    want = np_sgd_steps(params, [grads[0]], [0.1], adder_keys)[0]
    for k in params:
      np.testing.assert_allclose(u[k], want[k], rtol=2e-5, atol=1e-9,
                                 err_msg=k)
    assert int(state.notfinite_count) == 0
