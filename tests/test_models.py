"""Model zoo: interface, topology, BatchNorm modes, one optimiser step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax import bnn
from adderjax import optim
from adderjax.linen import AdderConv
from adderjax.linen import AdderDense
from adderjax.models import create_model
from adderjax.models import INPUT_SHAPES
from adderjax.models import KINDS
from adderjax.models import layers_for_kind
from adderjax.models import MODEL_NAMES
from adderjax.models import resnet
from adderjax.ops_count import count_ops

IMAGENET = ('resnet18', 'resnet50')


def randn(*shape, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def init_key():
  # XLA's RngBitGenerator: compiling a model's init with it takes a fraction
  # of the time threefry takes on CPU (about 2.5 s vs 11 s for ResNet-20).
  return jax.random.key(0, impl='unsafe_rbg')


def _classes(name):
  return 1000 if name in IMAGENET else 10


def _abstract_init(model, shape):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(shape, jnp.float32))


#: The convolutional zoo (the ViT has its own tests in test_attention.py).
CONV_NAMES = tuple(n for n in MODEL_NAMES if n != 'vit_tiny')


def test_model_names():
  assert MODEL_NAMES == ('lenet5_bn', 'vgg_small', 'resnet20', 'resnet32',
                         'resnet18', 'resnet50', 'vit_tiny')
  assert KINDS == ('cnn', 'adder', 'bnn')


@pytest.mark.parametrize('name,kind', [(n, k) for n in MODEL_NAMES
                                       for k in KINDS
                                       if (n, k) != ('vit_tiny', 'bnn')])
def test_output_shapes_train_and_eval(name, kind):
  classes = _classes(name) + 3
  model = create_model(name, kind=kind, num_classes=classes)
  shape = (2,) + INPUT_SHAPES[name]
  variables = _abstract_init(model, shape)
  assert sorted(variables) == ['batch_stats', 'params']
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  logits = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (2, classes) and logits.dtype == jnp.float32
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
      variables, x)
  assert logits.shape == (2, classes)
  assert (jax.tree.structure(updates['batch_stats'])
          == jax.tree.structure(variables['batch_stats']))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = create_model('resnet20', kind='adder', num_classes=10,
                       dtype=jnp.bfloat16)
  variables = _abstract_init(model, (2, 32, 32, 3))
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(variables['params']))
  logits = jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((2, 32, 32, 3)), train=False), variables)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('name', CONV_NAMES)
def test_layer_kinds_and_batchnorm_after_every_layer(name, kind):
  """First conv and classifier full precision, the rest of the model's kind,
  and one BatchNorm per hidden layer (+ one on the ResNet logits)."""
  model = create_model(name, kind=kind, num_classes=10)
  report = count_ops(model, INPUT_SHAPES[name])
  body_type = {'cnn': nn.Conv, 'adder': AdderConv, 'bnn': bnn.BinaryConv}
  layers = report.layers
  assert layers[0].path == 'conv1' and layers[0].kind == 'fp'
  assert layers[-1].path in ('fc', 'fc3') and layers[-1].kind == 'fp'
  want = {'cnn': 'fp', 'adder': 'adder', 'bnn': 'binary'}[kind]
  assert all(l.kind == want for l in layers[1:-1])
  assert all(l.layer in (body_type[kind].__name__,
                         {'cnn': 'Dense', 'adder': 'AdderDense',
                          'bnn': 'BinaryDense'}[kind])
             for l in layers[1:-1])
  variables = _abstract_init(model, (1,) + INPUT_SHAPES[name])
  num_bn = len(jax.tree.leaves(variables['batch_stats'])) // 2
  hidden = len(layers) - 1
  assert num_bn == hidden + (1 if name.startswith('resnet') else 0)
  # Body layers have no bias (BatchNorm follows).
  params = variables['params']
  for l in layers[1:-1]:
    node = params
    for part in l.path.split('/'):
      node = node[part]
    assert set(node) == {'kernel'}, l.path


def test_projection_shortcuts_only_where_shape_changes():
  variables = _abstract_init(create_model('resnet20', kind='adder',
                                          num_classes=10), (1, 32, 32, 3))
  params = variables['params']
  with_proj = sorted(k for k, v in params.items() if 'downsample_conv' in v)
  assert with_proj == ['layer2_0', 'layer3_0']
  assert params['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 16,
                                                                    32)
  v50 = _abstract_init(create_model('resnet50', kind='cnn', num_classes=10),
                       (1, 64, 64, 3))['params']
  with_proj = sorted(k for k, v in v50.items()
                     if isinstance(v, dict) and 'downsample_conv' in v)
  assert with_proj == ['layer1_0', 'layer2_0', 'layer3_0', 'layer4_0']


def test_create_model_errors():
  with pytest.raises(ValueError, match="'resnet110'"):
    create_model('resnet110', num_classes=10)
  with pytest.raises(ValueError, match="'shift'"):
    create_model('resnet20', kind='shift', num_classes=10)
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match='num_classes'):
      create_model('resnet20', num_classes=bad)
  with pytest.raises(ValueError, match='depth'):
    create_model('resnet20', num_classes=10, depth=20)
  model = create_model('resnet20', kind='cnn', num_classes=10, grad='sign')
  with pytest.raises(ValueError, match='grad'):
    _abstract_init(model, (1, 32, 32, 3))
  model = create_model('lenet5_bn', num_classes=10)
  with pytest.raises(ValueError, match=r'\(28, 28\)'):
    _abstract_init(model, (28, 28))
  with pytest.raises(ValueError, match='bn_momentum'):  # at construction
    create_model('resnet20', num_classes=10, bn_momentum=1.5)
  model = resnet.ResNet20(num_classes=10, bn_momentum=1.5)
  with pytest.raises(ValueError, match='bn_momentum'):  # or at the call
    _abstract_init(model, (1, 32, 32, 3))


def test_grad_and_implementation_reach_the_adder_layers():
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, (AdderConv, AdderDense)):
      seen.append((context.module.grad, context.module.implementation))
    return next_fun(*args, **kwargs)

  for name in ('lenet5_bn', 'resnet20'):
    model = create_model(name, num_classes=10, grad='sign',
                         implementation='xla')
    seen.clear()
    with nn.intercept_methods(interceptor):
      _abstract_init(model, (1,) + INPUT_SHAPES[name])
    assert seen and set(seen) == {('sign', 'xla')}


def test_injected_layer_class_is_used_for_every_body_layer():
  class TaggedConv(nn.Conv):
    pass

  model = create_model('resnet20', kind='cnn', num_classes=10,
                       conv=TaggedConv)
  report = count_ops(model, (32, 32, 3))
  assert {l.layer for l in report.layers[1:-1]} == {'TaggedConv'}
  assert report.layers[0].layer == 'Conv'


def _stem_output(params, x):
  """conv1 of the CIFAR ResNet, independently: 3x3, stride 1, padding 1."""
  k = np.asarray(params['conv1']['kernel'], np.float64)
  xp = np.pad(np.asarray(x, np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
  n, h, w, _ = x.shape
  out = np.zeros((n, h, w, k.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum('nhwc,co->nhwo', xp[:, i:i + h, j:j + w], k[i, j])
  return out


@pytest.mark.parametrize('momentum', [0.9, 0.5])
def test_batchnorm_train_mode_updates_running_stats(momentum):
  model = resnet._ResNet1(num_classes=10, bn_momentum=momentum)
  x = randn(4, 8, 8, 3) * 2 + 1
  variables = jax.jit(lambda x: model.init(init_key(), x))(x)
  _, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  stem = _stem_output(variables['params'], x)
  mean = stem.mean(axis=(0, 1, 2))
  var = stem.var(axis=(0, 1, 2))
  got = updates['batch_stats']['bn1']
  # Flax convention: running = momentum * running + (1 - momentum) * batch.
  np.testing.assert_allclose(got['mean'], (1 - momentum) * mean, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(got['var'], momentum + (1 - momentum) * var,
                             rtol=1e-4)


@pytest.mark.parametrize('name', ['lenet5_bn', 'resnet20'])
def test_batchnorm_is_exact_for_adder_outputs_with_a_large_mean(name):
  """Adder outputs -sum|x - w| sit hundreds of standard deviations below 0.

  The zoo's BatchNorm must normalise them as the two-pass formula does
  (float64 numpy oracle); E[y^2] - E[y]^2 in float32 cancels to noise here.
  """
  model = create_model(name, kind='adder', num_classes=10)
  bn = model.norm(train=True)()
  rng = np.random.default_rng(0)
  y = (-3e4 + rng.standard_normal((256, 16)) *
       np.linspace(0.5, 4.0, 16)).astype(np.float32)
  variables = bn.init(init_key(), y)
  out, _ = bn.apply(variables, y, mutable=['batch_stats'])
  y64 = y.astype(np.float64)
  expected = (y64 - y64.mean(0)) / np.sqrt(y64.var(0) + 1e-5)
  # float32 holds y to 2e-3 (0.004 standard deviations at worst); the
  # one-pass formula is off by thousands here.
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-2)


def test_batchnorm_eval_mode_is_per_example_and_train_mode_is_not():
  model = resnet._ResNet1(num_classes=10)
  x = randn(4, 8, 8, 3)
  variables = jax.jit(lambda x: model.init(init_key(), x))(x)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                           mutable=['batch_stats'])[0])
  x2 = x.at[1:].set(x[1:] * 3 + 1)
  np.testing.assert_allclose(evaluate(variables, x)[0],
                             evaluate(variables, x2)[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(train(variables, x)[0], train(variables, x2)[0],
                         atol=1e-3)
  # Eval mode uses the running statistics: after init (mean 0, var 1) the
  # BN layers are affine identities up to epsilon.
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      variables['batch_stats']):
    expect = 0.0 if path[-1].key == 'mean' else 1.0
    np.testing.assert_array_equal(leaf, expect)


def test_bn_axis_name_averages_statistics_across_devices():
  """Per-device batches of 1 under a named axis give the global statistics."""
  conv, dense = layers_for_kind('cnn')
  x = randn(4, 8, 8, 3)
  plain = resnet._ResNet1(num_classes=10, conv=conv, dense=dense)
  named = resnet._ResNet1(num_classes=10, conv=conv, dense=dense,
                          bn_axis_name='devices')
  variables = jax.jit(lambda x: plain.init(init_key(), x))(x)
  want, want_stats = jax.jit(lambda v, x: plain.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  got, got_stats = jax.jit(jax.vmap(
      lambda x: named.apply(variables, x[None], train=True,
                            mutable=['batch_stats']),
      axis_name='devices'))(x)
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-5)
  jax.tree.map(lambda g, w: close(g[0], w), got_stats, want_stats)


# ----------------------------------------------------------------------------
# One optimiser step lowers the loss on a small fixed batch.

STEP_SHAPES = {
    'lenet5_bn': (4, 28, 28, 1),
    'vgg_small': (4, 16, 16, 3),
    'resnet20': (4, 8, 8, 3),
    'resnet32': (4, 8, 8, 3),
    # Batch 4 at 64x64: with two examples the BatchNorm on the logits maps
    # every logit to +-1 (the loss is then piecewise constant in everything
    # before it), and at 32x32 the last stage is 1x1, so its BatchNorms see 4
    # values per channel: ResNet-50's loss then moves by ~1 over a step of
    # length 1e-3.
    'resnet18': (4, 64, 64, 3),
    'resnet50': (4, 64, 64, 3),
    '_resnet1': (4, 8, 8, 3),
}
# Compile time dominates on CPU (about 1 s per adder layer): the deep ones
# are marked slow.
SLOW_STEPS = {('resnet20', 'adder'), ('resnet32', 'cnn'),
              ('resnet32', 'adder'), ('resnet32', 'bnn')} | {
                  (n, k) for n in IMAGENET for k in KINDS}


def _step_cases():
  for name in STEP_SHAPES:
    for kind in KINDS:
      marks = [pytest.mark.slow] if (name, kind) in SLOW_STEPS else []
      yield pytest.param(name, kind, marks=marks, id=f'{name}-{kind}')


def _make(name, kind):
  if name == '_resnet1':
    conv, dense = layers_for_kind(kind)
    return resnet._ResNet1(num_classes=10, conv=conv, dense=dense)
  return create_model(name, kind=kind, num_classes=10)


def _subtree(tree, path):
  for part in path.split('/'):
    tree = tree[part]
  return tree


@pytest.mark.parametrize('name,kind', list(_step_cases()))
def test_one_optimiser_step_lowers_the_loss(name, kind):
  """CNN / AdderNet: one SGD step (AdderNet: the paper's optimizer with the
  adaptive learning rate) on all parameters lowers the training loss.

  The gradient is clipped to global norm 1 first: on random-noise inputs with
  BatchNorm over a few examples the stem gradient is large (ResNet-18 at
  64x64: |g| = 184, checked against finite differences in float64), and a
  plain lr=1e-3 step would leave the region where the loss is near-linear.

  BNN: the loss is piecewise constant in every parameter upstream of the last
  binarisation, and on a batch of 4 a step of any size flips binary
  activations and moves the loss at random (the STE gradient is a surrogate,
  not a descent direction there; measured: with lr 1e-4 the ResNet-20 BNN
  loss moves by up to +-1). So for BNNs the test checks that the STE
  gradient reaches every binary layer's latent kernel, and that the step
  lowers the loss on the parameters it depends on smoothly (the classifier
  and its BatchNorm).
  """
  shape = STEP_SHAPES[name]
  model = _make(name, kind)
  x = randn(*shape)
  labels = jnp.arange(shape[0]) % 10
  variables = jax.jit(lambda x: model.init(init_key(), x, train=False))(x)
  params, stats = variables['params'], variables['batch_stats']

  def loss_fn(params):
    logits, _ = model.apply({'params': params, 'batch_stats': stats}, x,
                            train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  # ResNet-50 (54 layers, BatchNorm over 4 examples) curves more: with the
  # paper's optimizer a 1e-3 step raised the loss for 1 of 3 batches tried,
  # a 1e-4 step lowered it for all.
  lr = 1e-4 if name == 'resnet50' else 1e-3
  if kind == 'adder':
    mask = optim.adder_mask(model, x, train=False)
    assert any(jax.tree.leaves(mask))
    tx = optim.addernet_sgd(lr, mask=mask, momentum=0.0, weight_decay=0.0)
  else:
    tx = optax.sgd(lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss0, grads = value_and_grad(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  if kind == 'bnn':
    report = count_ops(model, shape[1:])
    binary = [l.path for l in report.layers if l.kind == 'binary']
    assert binary
    for path in binary:
      assert float(jnp.abs(_subtree(grads, path)['kernel']).max()) > 0, path
    head = {'fc', 'fc_bn', 'fc3'}
    grads = {k: v if k in head else jax.tree.map(jnp.zeros_like, v)
             for k, v in grads.items()}
    tx = optax.sgd(1e-4)
  updates, _ = tx.update(grads, tx.init(params), params)
  loss1, _ = value_and_grad(optax.apply_updates(params, updates))
  assert float(loss1) < float(loss0)
