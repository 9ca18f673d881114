"""The zoo for NNX: create_model(..., api='nnx') equals the Linen zoo.

For every model (small widths / depths where the model is big, tiny batches),
the NNX model given the Linen model's variables gives the same logits in eval
and train mode and the same updated BatchNorm statistics;
``adder_mask(nnx_model)`` selects the Linen mask's kernels, and one
``nnx.Optimizer`` step with ``addernet_sgd`` equals one Linen step. Also: a
zoo model wrapped by hand in ``nnx.bridge.ToNNX`` gets its adder mask, and the
argument checks of ``create_model``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import traversals

from adderjax import optim
from adderjax.models import create_model
from adderjax.models import INPUT_SHAPES
from adderjax.models import ZooNNX

TOL = dict(rtol=1e-5, atol=1e-5)

# name, kind, overrides, input shape (one image).
CONFIGS = [
    ('lenet5_bn', 'cnn', {}, (28, 28, 1)),
    ('lenet5_bn', 'adder', {}, (28, 28, 1)),
    ('lenet5_bn', 'bnn', {}, (28, 28, 1)),
    ('vgg_small', 'cnn', {'widths': (4, 8, 8)}, (8, 8, 3)),
    ('vgg_small', 'adder', {'widths': (4, 8, 8)}, (8, 8, 3)),
    # One block per stage: the wrapper is the same for every depth.
    ('resnet20', 'cnn', {'width': 4, 'stage_sizes': (1, 1, 1)}, (8, 8, 3)),
    ('resnet20', 'adder', {'width': 4, 'stage_sizes': (1, 1, 1)}, (8, 8, 3)),
    ('resnet32', 'cnn', {'width': 4, 'stage_sizes': (1, 2)}, (8, 8, 3)),
    ('resnet32', 'adder', {'width': 4, 'stage_sizes': (1, 2)}, (8, 8, 3)),
    ('resnet18', 'cnn', {'width': 8, 'stage_sizes': (1, 1, 1, 1)},
     (32, 32, 3)),
    ('resnet18', 'adder', {'width': 8, 'stage_sizes': (1, 1, 1, 1)},
     (32, 32, 3)),
    ('resnet50', 'cnn', {'width': 8, 'stage_sizes': (1, 1, 1, 1)},
     (32, 32, 3)),
    ('resnet50', 'adder', {'width': 8, 'stage_sizes': (1, 1, 1, 1)},
     (32, 32, 3)),
    ('vit_tiny', 'cnn', {'depth': 1, 'hidden': 16, 'mlp_dim': 16},
     (28, 28, 1)),
    ('vit_tiny', 'adder', {'depth': 1, 'hidden': 16, 'mlp_dim': 16},
     (28, 28, 1)),
]
# One optimiser step is compared on these (the others share the machinery).
STEP_CONFIGS = [c for c in CONFIGS
                if (c[0], c[1]) in {('lenet5_bn', 'adder'),
                                    ('resnet20', 'adder'),
                                    ('vit_tiny', 'adder')}]
# Long to compile on a CPU: in the full suite only (-m slow).
SLOW = {('resnet18', 'adder'), ('resnet50', 'adder')}
SLOW_STEPS = {('resnet20', 'adder')}


def _params(configs, slow):
  return [pytest.param(*c, id=f'{c[0]}-{c[1]}',
                       marks=[pytest.mark.slow] if c[:2] in slow else [])
          for c in configs]


def _random_variables(abstract, seed=1):
  """Random values of the variables' shapes (no compiled init: faster)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    values = rng.randn(*leaf.shape)
    if name == 'var':
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'scale':
      values = 1.0 + 0.1 * values
    else:
      values = 0.3 * values
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _models(name, kind, overrides, shape, batch=3):
  """(linen model, variables, NNX model holding them, input batch)."""
  linen = create_model(name, kind=kind, num_classes=10, **overrides)
  x = jnp.asarray(np.random.RandomState(0).randn(batch, *shape), jnp.float32)
  variables = _random_variables(jax.eval_shape(
      lambda: linen.init(jax.random.key(1), x[:1], train=False)))
  # Abstract NNX model (nothing computed), then the Linen variables copied.
  model = nnx.eval_shape(lambda: create_model(
      name, kind=kind, num_classes=10, api='nnx', rngs=nnx.Rngs(0),
      input_shape=shape, **overrides))
  model.load_linen_variables(variables)
  return linen, variables, model, x


def _assert_trees_close(a, b, **tol):
  fa = traversals.flatten_mapping(a)
  fb = traversals.flatten_mapping(b)
  assert sorted(fa, key=str) == sorted(fb, key=str)
  for path in fa:
    np.testing.assert_allclose(np.asarray(fa[path]), np.asarray(fb[path]),
                               err_msg='/'.join(map(str, path)), **tol)


@nnx.jit
def _nnx_forward(model, x):
  return model(x)


@pytest.mark.parametrize('name,kind,overrides,shape',
                         _params(CONFIGS, SLOW))
def test_nnx_model_equals_linen_model(name, kind, overrides, shape):
  linen, variables, model, x = _models(name, kind, overrides, shape)
  assert isinstance(model, ZooNNX)
  assert model.use_running_average is False  # a new model trains

  # Train mode: batch statistics; the running averages are updated.
  y_lin, updates = jax.jit(lambda v, x: linen.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  y_nnx = _nnx_forward(model, x)
  np.testing.assert_allclose(np.asarray(y_nnx), np.asarray(y_lin), **TOL)
  new = model.linen_variables()
  _assert_trees_close(new['batch_stats'], updates['batch_stats'], **TOL)
  _assert_trees_close(new['params'], variables['params'], rtol=0, atol=0)

  # Eval mode: running averages (the updated ones); nothing changes.
  model.eval()
  assert model.use_running_average is True
  variables = {'params': variables['params'], **updates}
  y_lin = jax.jit(lambda v, x: linen.apply(v, x, train=False))(variables, x)
  y_nnx = _nnx_forward(model, x)
  np.testing.assert_allclose(np.asarray(y_nnx), np.asarray(y_lin), **TOL)
  _assert_trees_close(model.linen_variables()['batch_stats'],
                      updates['batch_stats'], rtol=0, atol=0)
  assert y_nnx.dtype == jnp.float32 and y_nnx.shape == (3, 10)

  # The mask: the Linen mask's kernels, at the NNX paths.
  mask = optim.adder_mask(model)
  linen_mask = optim.adder_mask(linen, x[:1], train=False)
  flat = {path[1:]: m for path, m in nnx.to_flat_state(mask)}
  assert flat == traversals.flatten_mapping(linen_mask)
  assert any(flat.values()) == (kind == 'adder')


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


@pytest.mark.parametrize('name,kind,overrides,shape',
                         _params(STEP_CONFIGS, SLOW_STEPS))
def test_one_nnx_optimizer_step_equals_one_linen_step(name, kind, overrides,
                                                      shape):
  linen, variables, model, x = _models(name, kind, overrides, shape)
  labels = jnp.arange(x.shape[0]) % 10
  linen_mask = optim.adder_mask(linen, x[:1], train=False)
  tx = optim.addernet_sgd(0.1, mask=linen_mask)

  @jax.jit
  def linen_step(variables, opt_state):
    def loss_fn(params):
      logits, updates = linen.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      return _loss(logits, labels), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables['params'])
    steps, opt_state = tx.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], steps)
    return loss, {'params': params, **updates}, opt_state

  opt = nnx.Optimizer(model, optim.addernet_sgd(
      0.1, mask=optim.adder_mask(model)), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, opt):
    def loss_fn(model):
      return _loss(model(x), labels)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  opt_state = tx.init(variables['params'])
  for _ in range(2):
    loss_lin, variables, opt_state = linen_step(variables, opt_state)
    loss_nnx = nnx_step(model, opt)
    np.testing.assert_allclose(float(loss_nnx), float(loss_lin), **TOL)
  _assert_trees_close(model.linen_variables(), variables, **TOL)


def test_mask_of_a_hand_wrapped_zoo_model_and_training_with_it():
  """The issue's case: nnx.bridge.ToNNX around a zoo LeNet-5 (adder)."""
  linen = create_model('lenet5_bn', kind='adder', num_classes=10)
  x = jnp.asarray(np.random.RandomState(1).randn(4, 28, 28, 1), jnp.float32)
  wrapped = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(wrapped, x[:1], train=False)
  mask = optim.adder_mask(wrapped)  # input found by probing the zoo shapes
  selected = sorted(path for path, m in nnx.to_flat_state(mask) if m)
  assert selected == [('conv2', 'kernel'), ('fc1', 'kernel'),
                      ('fc2', 'kernel')]
  assert (jax.tree.structure(mask)
          == jax.tree.structure(nnx.as_pure(nnx.state(wrapped, nnx.Param))))
  # The example input given explicitly gives the same mask.
  assert optim.adder_mask(wrapped, x[:1], train=False) == mask

  # Plain dict of Linen variables, from the wrapper's state.
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(wrapped)):
    col = 'params' if isinstance(var, nnx.Param) else 'batch_stats'
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      flat[(col, *path)] = var.get_value()
  variables = traversals.unflatten_mapping(flat)
  linen_mask = optim.adder_mask(linen, x[:1], train=False)
  tx = optim.addernet_sgd(0.05, mask=linen_mask)
  labels = jnp.arange(4) % 10

  @jax.jit
  def linen_step(params, opt_state):
    def loss_fn(p):
      return _loss(linen.apply({'params': p, 'batch_stats':
                                variables['batch_stats']}, x, train=False),
                   labels)
    grads = jax.grad(loss_fn)(params)
    steps, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, steps), opt_state

  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no "the mask selects no parameter"
    opt = nnx.Optimizer(wrapped, optim.addernet_sgd(0.05, mask=mask),
                        wrt=nnx.Param)

  @nnx.jit
  def nnx_step(wrapped, opt):
    grads = nnx.grad(lambda m: _loss(m(x, train=False), labels))(wrapped)
    opt.update(wrapped, grads)

  params, opt_state = variables['params'], tx.init(variables['params'])
  for _ in range(3):
    params, opt_state = linen_step(params, opt_state)
    nnx_step(wrapped, opt)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(wrapped, nnx.Param)),
                      params, **TOL)


def test_mask_of_a_tonnx_inside_an_nnx_model_uses_example_input():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.example_input = jax.ShapeDtypeStruct((1, 12, 12, 3), jnp.float32)
      self.body = nnx.bridge.ToNNX(
          create_model('resnet20', kind='adder', num_classes=3, width=2),
          rngs=rngs)
      nnx.bridge.lazy_init(self.body, jnp.zeros((1, 12, 12, 3)))
      self.head = nnx.Linear(3, 2, rngs=rngs)

  net = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  mask = optim.adder_mask(net)
  selected = {path for path, m in nnx.to_flat_state(mask) if m}
  linen_mask = optim.adder_mask(
      create_model('resnet20', kind='adder', num_classes=3, width=2),
      jnp.zeros((1, 12, 12, 3)))
  expected = {('body', *p) for p, m in
              traversals.flatten_mapping(linen_mask).items() if m}
  assert selected == expected and len(selected) == 18 + 2
  assert not any(p[0] == 'head' for p in selected)


def test_mask_refuses_a_tonnx_whose_input_cannot_be_found():
  linen = create_model('lenet5_bn', kind='adder', num_classes=10)
  wrapped = nnx.eval_shape(lambda: nnx.bridge.ToNNX(
      linen, rngs=nnx.Rngs(0)).lazy_init(jnp.zeros((1, 36, 36, 1))))
  with pytest.raises(ValueError, match='example_input'):
    optim.adder_mask(wrapped)
  with pytest.raises(ValueError, match='failed to initialise'):
    optim.adder_mask(wrapped, jnp.zeros((1, 36, 36)))
  with pytest.raises(TypeError, match='no example inputs'):
    optim.adder_mask(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.zeros((1, 2)))


def test_train_eval_and_the_call_argument():
  model = create_model('lenet5_bn', kind='adder', num_classes=10, api='nnx',
                       rngs=nnx.Rngs(0))
  assert model.example_input.shape == (1, *INPUT_SHAPES['lenet5_bn'])
  x = jnp.asarray(np.random.RandomState(2).randn(3, 28, 28, 1), jnp.float32)
  before = model.linen_variables()['batch_stats']
  model.eval()
  model(x)                          # eval: nothing changes
  _assert_trees_close(model.linen_variables()['batch_stats'], before,
                      rtol=0, atol=0)
  model(x, train=True)              # one call in train mode
  after = model.linen_variables()['batch_stats']
  assert not np.allclose(after['bn1']['mean'], before['bn1']['mean'])
  assert model.use_running_average is True
  model.train()
  assert model.use_running_average is False
  with pytest.raises(TypeError, match='train'):
    model(x, train='yes')
  # The same key gives the same initial parameters.
  again = create_model('lenet5_bn', kind='adder', num_classes=10, api='nnx',
                       rngs=nnx.Rngs(0))
  _assert_trees_close(again.linen_variables()['params'],
                      model.linen_variables()['params'], rtol=0, atol=0)


def test_create_model_api_arguments():
  with pytest.raises(ValueError, match="api.*'torch'"):
    create_model('lenet5_bn', kind='cnn', num_classes=10, api='torch')
  with pytest.raises(ValueError, match='rngs'):
    create_model('lenet5_bn', kind='cnn', num_classes=10,
                 rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='input_shape'):
    create_model('lenet5_bn', kind='cnn', num_classes=10,
                 input_shape=(28, 28, 1))
  with pytest.raises(TypeError, match='rngs.*None'):
    create_model('lenet5_bn', kind='cnn', num_classes=10, api='nnx')
  with pytest.raises(TypeError, match='rngs.*int'):
    create_model('lenet5_bn', kind='cnn', num_classes=10, api='nnx', rngs=0)
  with pytest.raises(ValueError, match='input_shape'):
    create_model('lenet5_bn', kind='cnn', num_classes=10, api='nnx',
                 rngs=nnx.Rngs(0), input_shape=(28, 28))
  model = nnx.eval_shape(lambda: create_model(
      'lenet5_bn', kind='cnn', num_classes=10, api='nnx', rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='conv2/kernel'):
    bad = model.linen_variables()
    bad['params']['conv2']['kernel'] = jnp.zeros((3, 3, 6, 16))
    model.load_linen_variables(bad)
  with pytest.raises(ValueError, match='lacks'):
    bad = model.linen_variables()
    del bad['params']['conv2']
    model.load_linen_variables(bad)
