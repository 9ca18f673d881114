"""Every bad input at a public boundary is refused, named and explained.

Issue 32: each table row is a wrong input, the exception type and the words
the message must contain; the ``accepts`` tables hold legitimate NumPy / JAX
scalar values that must give the same answer as Python numbers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adderjax
from adderjax import _checks
from adderjax import count_ops
from adderjax import official
from adderjax import nnx as adder_nnx
from adderjax import optim
from adderjax import quant
from adderjax.linen import AdderConv
from adderjax.linen import AdderDense
from adderjax.models import create_model
from adderjax.models import ResNet20


def _raises(fn, error, words):
  with pytest.raises(error) as info:
    fn()
  message = str(info.value)
  for word in words:
    assert word in message, f'{word!r} not in {message!r}'
  return message


# ---------------------------------------------------------------------------
# The helper itself.

CHECK_CASES = [
    (lambda: _checks.finite_number('eta', '0.2', low=0, low_open=True),
     TypeError, ['`eta`', "'0.2' (str)", '> 0']),
    (lambda: _checks.finite_number('eta', float('nan'), low=0, low_open=True),
     ValueError, ['`eta`', 'nan', 'finite']),
    (lambda: _checks.finite_number('x', True), TypeError, ['`x`', 'bool']),
    (lambda: _checks.finite_number('x', np.ones(2)), TypeError,
     ['`x`', 'shape (2,)']),
    (lambda: _checks.finite_number('m', 1.0, low=0, high=1, high_open=True),
     ValueError, ['`m`', '[0, 1)', '1.0']),
    (lambda: _checks.positive_int('n', 2.0), TypeError,
     ['`n`', 'positive int', '2.0 (float)']),
    (lambda: _checks.positive_int('n', np.int64(0)), ValueError, ['`n`', '0']),
    (lambda: _checks.positive_int('n', np.True_), TypeError, ['`n`', 'bool']),
    (lambda: _checks.choice('kind', 'shift', ('cnn', 'adder')), ValueError,
     ['`kind`', "'cnn', 'adder'", "'shift'"]),
    (lambda: _checks.shape('s', (2, -1)), ValueError, ['`s`', 'item 1', '-1']),
    (lambda: _checks.shape('s', '28'), TypeError, ['`s`', "'28' (str)"]),
    (lambda: _checks.bool_mask('mask', {'a': {'kernel': 'yes'}}), TypeError,
     ['`mask`', "'yes' (str)", "['a']['kernel']"]),
    (lambda: _checks.structure_prefix('mask', {'a': True}, {'b': 1.0}),
     ValueError, ['`mask`', "'a'", "'b'"]),
]


@pytest.mark.parametrize('fn,error,words', CHECK_CASES)
def test_checks_refuse(fn, error, words):
  _raises(fn, error, words)


def test_argument_type_error_is_both():
  assert issubclass(_checks.ArgumentTypeError, TypeError)
  assert issubclass(_checks.ArgumentTypeError, ValueError)


@pytest.mark.parametrize('value', [3, np.int8(3), np.int64(3), np.uint16(3),
                                   jnp.int32(3), np.asarray(3)])
def test_checks_accept_integer_scalars(value):
  assert _checks.positive_int('n', value) == 3


@pytest.mark.parametrize('value', [0.5, np.float32(0.5), np.float64(0.5),
                                   jnp.float32(0.5), jnp.bfloat16(0.5), 1,
                                   np.int64(1)])
def test_checks_accept_real_scalars(value):
  assert _checks.finite_number('x', value, low=0, high=1) == float(value)


# ---------------------------------------------------------------------------
# count_ops.

COUNT_OPS_CASES = [
    (AdderConv(8, (3, 3)), (4, 16, 16, 4), ValueError,
     ['input_shape', '(4, 16, 16, 4)', 'without the batch axis']),
    (nn.Conv(8, (3, 3)), (2, 16, 16, 4), ValueError,
     ['input_shape', 'without the batch axis']),
    (AdderConv(8, (3, 3)), (16, 16), ValueError,
     ['input_shape', '(16, 16)', '3 axes']),
    (AdderConv(8, (3, 3)), (28.9, 28, 1), TypeError,
     ['input_shape', '28.9 (float)', 'item 0']),
    (AdderConv(8, (3, 3)), (28.0, 28, 1), TypeError, ['input_shape', '28.0']),
    (AdderConv(8, (3, 3)), (True, 28, 1), TypeError, ['input_shape', 'True']),
    (nn.Dense(3), (4, 84), ValueError,
     ['input_shape', '(4, 84)', 'without the batch axis']),
    (nn.Dense(3), 84, TypeError, ['input_shape', '(84,)']),
    (AdderDense(3), (0, 3), ValueError, ['input_shape', 'item 0']),
    (create_model('lenet5_bn', num_classes=10), (1, 28, 28, 1), ValueError,
     ['`input_shape`', '(1, 28, 28, 1)', 'LeNet5BN', 'without the batch axis']),
    (create_model('resnet20', num_classes=10), (32, 32), ValueError,
     ['`input_shape`', '(32, 32)', '3 axes (H, W, C)']),
    (lambda x: x, (28, 28, 1), TypeError, ['`model`', 'flax.linen.Module',
                                           '(function)']),
]


@pytest.mark.parametrize('model,shape,error,words', COUNT_OPS_CASES)
def test_count_ops_refuses(model, shape, error, words):
  _raises(lambda: count_ops(model, shape), error, words)


class _TwoConvs(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(AdderConv(4, (3, 3))(x))
    return AdderConv(4, (3, 3), name='second')(x)


def test_count_params_refuses_leaves_that_are_not_arrays():
  _raises(lambda: adderjax.count_params({'params': {'d': {'kernel': 'w'}}}),
          TypeError, ['`variables`', "'w' (str)", "['d']['kernel']"])


def test_count_ops_refuses_batch_axis_inside_a_model():
  _raises(lambda: count_ops(_TwoConvs(), (2, 8, 8, 3)), ValueError,
          ['input_shape', 'AdderConv', 'without the batch axis'])


@pytest.mark.parametrize('shape', [(np.int64(16), 16, 4),
                                   np.asarray([16, 16, 4]),
                                   [jnp.int32(16), 16, np.uint8(4)]])
def test_count_ops_accepts_numpy_ints(shape):
  want = count_ops(AdderConv(8, (3, 3)), (16, 16, 4))
  got = count_ops(AdderConv(8, (3, 3)), shape)
  assert got.total == want.total and got.input_shape == (16, 16, 4)


# ---------------------------------------------------------------------------
# The model zoo.

MODEL_CASES = [
    (dict(bn_epsilon=-1.0), ValueError, ['bn_epsilon', '-1.0', '> 0']),
    (dict(bn_epsilon=0.0), ValueError, ['bn_epsilon', '> 0']),
    (dict(bn_epsilon='1e-5'), TypeError, ['bn_epsilon', "'1e-5' (str)"]),
    (dict(bn_epsilon=float('nan')), ValueError, ['bn_epsilon', 'nan']),
    (dict(bn_momentum=1.0), ValueError, ['bn_momentum', '[0, 1)', '1.0']),
    (dict(bn_momentum=-0.1), ValueError, ['bn_momentum', '-0.1']),
    (dict(num_classes=0), ValueError, ['num_classes', 'positive int', '0']),
    (dict(num_classes=np.int64(-3)), ValueError, ['num_classes', '-3']),
    (dict(num_classes=10.0), TypeError, ['num_classes', '10.0 (float)']),
    (dict(num_classes='10'), TypeError, ['num_classes', "'10' (str)"]),
    (dict(width=0), ValueError, ['width', 'positive int', '0']),
    (dict(width=16.5), TypeError, ['width', '16.5']),
    (dict(stage_sizes=(3, 0, 3)), ValueError, ['stage_sizes', 'item 1']),
    (dict(stage_sizes=()), ValueError, ['stage_sizes', 'non-empty']),
    (dict(stem='tiny'), ValueError, ['stem', "'tiny'", "'cifar'"]),
    (dict(remat_blocks='yes'), TypeError, ['remat_blocks', 'bool']),
    (dict(name='resnet110'), ValueError, ['name', "'resnet110'", 'resnet20']),
    (dict(kind='shift'), ValueError, ['kind', "'shift'", "'adder'"]),
    (dict(name='vgg_small', widths=(8, 8)), ValueError, ['widths', '3']),
    (dict(name='vgg_small', widths=(8, 0, 8)), ValueError, ['widths', '0']),
    (dict(name='lenet5_bn', pool='sum'), ValueError, ['pool', "'sum'"]),
    (dict(dtype=jnp.int8), TypeError, ['`dtype`', 'floating-point', 'int8']),
    (dict(dtype='float33'), TypeError, ['`dtype`', "'float33' (str)"]),
    (dict(grad='bogus'), ValueError, ['`grad`', "'bogus'", 'sign']),
    (dict(implementation='bogus'), ValueError,
     ['`implementation`', "'bogus'", 'xla']),
]


@pytest.mark.parametrize('overrides,error,words', MODEL_CASES)
def test_create_model_refuses(overrides, error, words):
  kwargs = dict(name='resnet20', num_classes=10)
  kwargs.update(overrides)
  _raises(lambda: create_model(kwargs.pop('name'), **kwargs), error, words)


@pytest.mark.parametrize('key,value', [('grad', 'sign'),
                                       ('implementation', 'xla')])
def test_adder_options_of_a_cnn_refused_when_built(key, value):
  model = create_model('resnet20', kind='cnn', num_classes=10, **{key: value})
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  _raises(lambda: jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x),
          ValueError, [f'`{key}`', 'only meaningful for adder layers',
                       'body layer Conv'])


def test_zoo_model_refuses_at_call_when_built_directly():
  model = ResNet20(num_classes=10, bn_epsilon=-1.0)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  _raises(lambda: jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x),
          ValueError, ['bn_epsilon', '-1.0'])


@pytest.mark.parametrize('overrides', [
    dict(num_classes=np.int64(10)), dict(num_classes=jnp.int32(10)),
    dict(bn_epsilon=np.float32(1e-5), bn_momentum=np.float64(0.9)),
    dict(width=np.int64(4), stage_sizes=(np.int64(1), 1, 1)),
])
def test_create_model_accepts_numpy_scalars(overrides):
  plain = {k: (v.item() if hasattr(v, 'item') else
               tuple(int(i) for i in v) if isinstance(v, tuple) else v)
           for k, v in overrides.items()}
  base = dict(num_classes=10, stage_sizes=(1, 1, 1), width=4)
  x = jnp.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)

  def logits(kwargs):
    model = create_model('resnet20', kind='adder', **{**base, **kwargs})
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=False)

  np.testing.assert_array_equal(logits(overrides), logits(plain))


# ---------------------------------------------------------------------------
# The official-checkpoint loader.


def _official_sd():
  shapes = official.expected_state_dict_shapes('resnet20', num_classes=10)
  return {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}


def _with(key, value):
  def make():
    sd = _official_sd()
    sd[key] = np.full(sd[key].shape, value, np.float32) if np.isscalar(
        value) else value(sd[key])
    return sd
  return make


def _set_first(value):
  def edit(a):
    a = a.copy()
    a.reshape(-1)[0] = value
    return a
  return edit


CONVERT_CASES = [
    (_with('bn1.running_var', -1.0), ['bn1.running_var', 'negative',
                                       'variance']),
    (_with('layer1.0.bn2.running_var', _set_first(-1e-3)),
     ['layer1.0.bn2.running_var', 'negative']),
    (_with('conv1.weight', np.nan), ['conv1.weight', 'NaN or infinite']),
    (_with('layer2.0.conv1.adder', _set_first(np.inf)),
     ['layer2.0.conv1.adder', '1 of']),
    (_with('fc.weight', _set_first(-np.inf)), ['fc.weight']),
    (_with('bn2.running_mean', np.nan), ['bn2.running_mean']),
]


@pytest.mark.parametrize('make,words', CONVERT_CASES)
def test_convert_state_dict_refuses_bad_values(make, words):
  _raises(lambda: official.convert_state_dict(make(), 'resnet20'),
          official.ConversionError, words)


def _write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _zip_bytes(tmp_path):
  path = str(tmp_path / 'good.npz')
  np.savez(path, a=np.ones(3, np.float32))
  return open(path, 'rb').read()


LOAD_CASES = [
    ('empty.pth', lambda t: b'', 'auto', ['empty.pth', 'not a valid',
                                          'empty']),
    ('empty.npz', lambda t: b'', 'auto', ['empty.npz', 'not a valid']),
    ('empty.safetensors', lambda t: b'', 'auto',
     ['empty.safetensors', 'not a valid']),
    ('rand.npz', lambda t: bytes(range(256)) * 2, 'auto',
     ['rand.npz', 'not a valid', 'never loaded']),
    ('cut.npz', lambda t: _zip_bytes(t)[:60], 'auto',
     ['cut.npz', 'not a valid']),
    ('rand.pth', lambda t: bytes(range(256)) * 2, 'zip',
     ['rand.pth', 'not a valid']),
    ('cut.pth', lambda t: _zip_bytes(t)[:60], 'zip',
     ['cut.pth', 'not a valid']),
]


@pytest.mark.parametrize('name,data,reader,words', LOAD_CASES)
def test_load_official_refuses_bad_files(tmp_path, name, data, reader, words):
  path = _write(tmp_path, name, data(tmp_path))
  message = _raises(lambda: official.load_official(path, reader=reader),
                    ValueError, words)
  assert 'allow_pickle' not in message
  assert 'weights_only=False will' not in message


@pytest.mark.parametrize('data', [lambda t: bytes(range(256)) * 2,
                                  lambda t: _torch_bytes(t)[:200]])
def test_load_official_with_torch_never_advises_unsafe_loading(tmp_path,
                                                                data):
  pytest.importorskip('torch')
  path = _write(tmp_path, 'bad.pth', data(tmp_path))
  message = _raises(lambda: official.load_official(path, reader='torch'),
                    ValueError, ['bad.pth', 'not a valid'])
  assert 'will likely succeed' not in message


def _torch_bytes(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'good.pth')
  torch.save({'w': torch.ones(64, 64)}, path)
  return open(path, 'rb').read()


# ---------------------------------------------------------------------------
# The optimizer.

_PARAMS = {'adder': {'kernel': jnp.ones((3, 3, 2, 2))},
           'bn': {'scale': jnp.ones(2)}}
_MASK = {'adder': {'kernel': True}, 'bn': {'scale': False}}

OPTIM_BUILD_CASES = [
    (lambda: optim.scale_by_adaptive_lr(eta='0.2'), TypeError,
     ['`eta`', "'0.2' (str)", '> 0']),
    (lambda: optim.scale_by_adaptive_lr(eps=True), TypeError, ['`eps`']),
    (lambda: optim.increased_lr('10'), TypeError, ['`factor`', "'10'"]),
    (lambda: optim.addernet_sgd('0.1', mask=_MASK), TypeError,
     ['`learning_rate`', "'0.1' (str)"]),
    (lambda: optim.addernet_sgd(0.1, momentum='0.9', mask=_MASK), TypeError,
     ['`momentum`', "'0.9'"]),
    (lambda: optim.addernet_sgd(0.1, weight_decay='5e-4', mask=_MASK),
     TypeError, ['`weight_decay`', "'5e-4'"]),
    (lambda: optim.addernet_sgd(0.1, weight_decay=float('inf'), mask=_MASK),
     ValueError, ['`weight_decay`', 'inf']),
    (lambda: optim.addernet_sgd(0.1, eta='0.2', mask=_MASK), TypeError,
     ['`eta`']),
    (lambda: optim.addernet_sgd(0.1, eta=-1.0, scaling='none'), ValueError,
     ['`eta`', '-1.0', '> 0']),
    (lambda: optim.addernet_sgd(0.1, eps=0.0, scaling='ilr', mask=_MASK,
                                ilr_factor=2.0), ValueError, ['`eps`', '0.0']),
    (lambda: optim.addernet_sgd(0.1, mask=_MASK, scaling='ilr',
                                ilr_factor='2'), TypeError,
     ['`ilr_factor`', "'2' (str)"]),
    (lambda: optim.addernet_sgd(0.1, mask=_MASK, scaling='ilr',
                                ilr_factor=-2.0), ValueError,
     ['`ilr_factor`', '-2.0']),
    (lambda: optim.addernet_sgd(0.1, mask={'adder': 'yes', 'bn': 'no'}),
     TypeError, ['`mask`', 'bools', "'yes' (str)", "['adder']"]),
    (lambda: optim.addernet_sgd(0.1, mask={'adder': 1, 'bn': 0}), TypeError,
     ['`mask`', '1 (int)']),
    (lambda: optim.addernet_sgd(0.1, mask=_MASK, weight_decay_mask={
        'adder': None, 'bn': 'x'}), TypeError, ['`weight_decay_mask`']),
    (lambda: optim.addernet_sgd(0.1, mask=_MASK, scaling='lars'), ValueError,
     ['`scaling`', "'lars'", "'adaptive'"]),
    (lambda: optim.addernet_sgd(0.1, mask=_MASK, nesterov='no'), TypeError,
     ['`nesterov`', "'no'"]),
    (lambda: optim.cosine_lr_schedule('0.1', 10), TypeError, ['`base_lr`']),
]


@pytest.mark.parametrize('fn,error,words', OPTIM_BUILD_CASES)
def test_optimizer_refuses_at_construction(fn, error, words):
  _raises(fn, error, words)


OPTIM_INIT_CASES = [
    (dict(mask={'adder': True, 'other': False}), _PARAMS,
     ['`mask`', "'other'", "'bn'"]),
    (dict(mask=_MASK), {'params': _PARAMS, 'batch_stats': {}},
     ['`mask`', "variables['params']"]),
    (dict(mask={'adder': {'kernel': True, 'bias': False}, 'bn': False}),
     _PARAMS, ['`mask`', "['adder']", "'bias'"]),
    (dict(mask=_MASK, weight_decay_mask={'adder': True}), _PARAMS,
     ['`weight_decay_mask`', "'bn'"]),
    (dict(mask=lambda p: jax.tree.map(lambda _: 'x', p)), _PARAMS,
     ['`mask`', "'x' (str)"]),
]


@pytest.mark.parametrize('kwargs,params,words', OPTIM_INIT_CASES)
def test_optimizer_refuses_mismatched_mask_at_init(kwargs, params, words):
  tx = optim.addernet_sgd(0.1, **kwargs)
  _raises(lambda: tx.init(params), ValueError, words)


def test_optimizer_mask_prefix_and_numpy_scalars_accepted():
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), _PARAMS)

  def step(tx):
    state = jax.jit(tx.init)(_PARAMS)
    return jax.jit(tx.update)(grads, state, _PARAMS)[0]

  want = step(optim.addernet_sgd(0.1, mask=_MASK, momentum=0.9,
                                 weight_decay=5e-4, eta=0.2))
  prefix = {'adder': True, 'bn': np.False_}  # a prefix of the parameters
  got = step(optim.addernet_sgd(np.float32(0.1), mask=prefix,
                                momentum=np.float64(0.9),
                                weight_decay=np.float32(5e-4),
                                eta=jnp.float32(0.2)))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  tx = optim.scale_by_adaptive_lr(eta=np.float32(0.2))
  g = {'k': jnp.array([3.0, 4.0])}
  np.testing.assert_array_equal(
      tx.update(g, tx.init(g))[0]['k'],
      optim.scale_by_adaptive_lr(eta=0.2).update(g, tx.init(g))[0]['k'])


# ---------------------------------------------------------------------------
# NNX layers.

NNX_CASES = [
    (lambda: adder_nnx.AdderConv(2, 4, 3, rngs=None), ['`rngs`', 'AdderConv',
                                                       'None (NoneType)']),
    (lambda: adder_nnx.AdderDense(2, 4, rngs=0), ['`rngs`', 'AdderDense',
                                                  'nnx.Rngs(0)']),
    (lambda: adder_nnx.AdderDense(2, 4, rngs=jax.random.key(0)),
     ['`rngs`', 'flax.nnx.Rngs']),
]


@pytest.mark.parametrize('fn,words', NNX_CASES)
def test_nnx_layers_refuse_bad_rngs(fn, words):
  _raises(fn, TypeError, words)


def test_nnx_layers_accept_numpy_feature_counts():
  a = adder_nnx.AdderDense(np.int64(3), np.int32(2), rngs=nnx.Rngs(0))
  b = adder_nnx.AdderDense(3, 2, rngs=nnx.Rngs(0))
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(a(x), b(x))


# --- the op: array inputs and a non-empty reduction --------------------------

_X4 = np.ones((1, 4, 4, 2), np.float32)
_K4 = np.ones((3, 3, 2, 5), np.float32)

OP_CASES = [
    (lambda: adderjax.adder_conv([[[[1.0]]]], _K4), TypeError,
     ['x must be an array', 'got list', 'jnp.asarray']),
    (lambda: adderjax.adder_conv(None, _K4), TypeError,
     ['x must be an array', 'got None']),
    (lambda: adderjax.adder_conv(_X4, None), TypeError,
     ['kernel must be an array', 'got None']),
    (lambda: adderjax.adder_conv(_X4, (1.0, 2.0)), TypeError,
     ['kernel must be an array', 'got tuple']),
    (lambda: adderjax.adder_dense([[1.0, 2.0]], np.ones((2, 3), np.float32)),
     TypeError, ['x must be an array', 'got list']),
    (lambda: adderjax.adder_dense(np.ones((2, 0), np.float32),
                                  np.ones((0, 3), np.float32)),
     ValueError, ['kernel has shape (0, 3)', 'empty reduction']),
    (lambda: adderjax.adder_conv(np.ones((1, 4, 4, 0), np.float32),
                                 np.ones((3, 3, 0, 5), np.float32)),
     ValueError, ['kernel has shape (3, 3, 0, 5)', 'empty reduction']),
]


@pytest.mark.parametrize('fn,error,words', OP_CASES)
def test_op_refuses(fn, error, words):
  with pytest.raises(error) as info:
    fn()
  for w in words:
    assert w in str(info.value), (w, str(info.value))


def test_op_takes_numpy_arrays_like_jax_arrays():
  # Oracle: the l1 distance written in numpy.
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)
  expected = -np.abs(x[:, :, None] - w[None]).sum(1)
  np.testing.assert_allclose(np.asarray(adderjax.adder_dense(x, w)), expected,
                             rtol=1e-6, atol=1e-6)


# --- quantization: calibrate's arguments, QuantConfig's bools ----------------

_LENET = create_model('lenet5_bn', kind='adder', num_classes=10)


def _lenet_variables():
  return jax.eval_shape(lambda x: _LENET.init(jax.random.key(0), x,
                                              train=False),
                        jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))


QUANT_CASES = [
    (lambda: quant.calibrate(_LENET, _lenet_variables(), []), ValueError,
     ['`batches`', 'empty']),
    (lambda: quant.calibrate(_LENET, _lenet_variables()['params'],
                             [jnp.ones((2, 28, 28, 1))]), TypeError,
     ['`variables`', "'params'", 'keys']),
    (lambda: quant.calibrate(_LENET, None, [jnp.ones((2, 28, 28, 1))]),
     TypeError, ['`variables`', 'None (NoneType)']),
    (lambda: quant.calibrate(lambda x: x, {'params': {}}, []), TypeError,
     ['`model`', 'flax.linen.Module']),
    (lambda: quant.QuantConfig(fold_bn='yes'), TypeError,
     ['`fold_bn`', "'yes' (str)"]),
    (lambda: quant.QuantConfig(clip_kernel=1), TypeError,
     ['`clip_kernel`', '1 (int)']),
]


@pytest.mark.parametrize('fn,error,words', QUANT_CASES)
def test_quant_refuses(fn, error, words):
  _raises(fn, error, words)


def test_quant_config_accepts_numpy_bools():
  config = quant.QuantConfig(fold_bn=np.False_, clip_kernel=np.True_)
  assert config.fold_bn is False and config.clip_kernel is True


# --- layers: the Linen and NNX modules' arguments -----------------------------


def _init_linen(layer, shape):
  return jax.eval_shape(lambda x: layer.init(jax.random.key(0), x),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


LAYER_CASES = [
    (lambda: _init_linen(AdderConv(0, (3, 3)), (1, 4, 4, 2)), ValueError,
     ['features', 'positive int', '0']),
    (lambda: _init_linen(AdderConv(2.5, (3, 3)), (1, 4, 4, 2)), ValueError,
     ['features', '2.5']),
    (lambda: _init_linen(AdderConv(2, (0, 3)), (1, 4, 4, 2)), ValueError,
     ['kernel_size', '(0, 3)']),
    (lambda: _init_linen(AdderConv(2, '3'), (1, 4, 4, 2)), TypeError,
     ['kernel_size', "'3'"]),
    (lambda: _init_linen(AdderConv(2, (3, 3), grad='x'), (1, 4, 4, 2)),
     ValueError, ['grad', "'x'", 'full_precision']),
    (lambda: _init_linen(AdderConv(2, (3, 3), implementation='x'),
                         (1, 4, 4, 2)), ValueError,
     ['implementation', "'x'", 'xla']),
    (lambda: _init_linen(AdderConv(2, (3, 3), strides=0), (1, 4, 4, 2)),
     ValueError, ['strides', '0']),
    (lambda: _init_linen(AdderConv(2, (3, 3), padding='HALF'), (1, 4, 4, 2)),
     ValueError, ['padding', "'HALF'"]),
    (lambda: _init_linen(AdderDense(-1), (1, 3)), ValueError,
     ['features', '-1']),
    (lambda: adder_nnx.AdderDense(0, 4, rngs=nnx.Rngs(0)), ValueError,
     ['in_features', '0']),
    (lambda: adder_nnx.AdderDense(3, '4', rngs=nnx.Rngs(0)), ValueError,
     ['out_features', "'4'"]),
    (lambda: adder_nnx.AdderConv(2, 4, 0, rngs=nnx.Rngs(0)), ValueError,
     ['kernel_size', '0']),
]


@pytest.mark.parametrize('fn,error,words', LAYER_CASES)
def test_layers_refuse(fn, error, words):
  _raises(fn, error, words)
