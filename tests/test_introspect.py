"""The layer walker (adderjax.introspect) against hand-written expectations.

Shapes are computed with the convolution output-size formula
``(n + lo + hi - (k - 1) * d - 1) // s + 1`` (``ceil(n / s)`` for 'SAME'),
not read from the model code; the rewrite hook is checked against a numpy
forward pass.
"""

import flax.linen as nn
from flax.linen import module as linen_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adderjax
from adderjax import introspect
from adderjax.introspect import intercept_layers
from adderjax.introspect import LayerCall
from adderjax.introspect import trace_layers
from adderjax.linen import AdderConv
from adderjax.linen import AdderDense
from adderjax.models import create_model


def out_size(n, k, s=1, lo=0, hi=0, d=1):
  return (n + lo + hi - (k - 1) * d - 1) // s + 1


def same_size(n, s):
  return -(-n // s)


class LeNetLike(nn.Module):
  """28x28x1 -> conv 5x5 SAME -> pool -> adder 5x5 VALID -> pool ->
  adder 3x3 stride 2 pad 1 groups 2 -> flatten -> adder fc -> fc."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (5, 5), padding='SAME', name='conv1')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = AdderConv(16, (5, 5), padding='VALID', use_bias=False,
                  name='conv2')(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = AdderConv(8, (3, 3), strides=2, padding=1, feature_group_count=2,
                  name='conv3')(x)
    x = x.reshape((x.shape[0], -1))
    x = AdderDense(32, name='fc1')(x)
    return nn.Dense(10, name='fc2')(x)


def test_lenet_like_records_match_hand_expectations():
  n = 3
  x = jax.ShapeDtypeStruct((n, 28, 28, 1), jnp.float32)
  calls = trace_layers(LeNetLike(), x)
  h1 = same_size(28, 1)                      # conv1, SAME: 28
  h2 = out_size(h1 // 2, 5)                  # conv2 on 14, VALID: 10
  h3 = out_size(h2 // 2, 3, s=2, lo=1, hi=1)  # conv3 on 5: 3
  flat = h3 * h3 * 8
  expected = [
      # path, type, input shape, output shape, kernel shape
      (('conv1',), nn.Conv, (n, 28, 28, 1), (n, h1, h1, 6), (5, 5, 1, 6)),
      (('conv2',), AdderConv, (n, 14, 14, 6), (n, h2, h2, 16),
       (5, 5, 6, 16)),
      (('conv3',), AdderConv, (n, 5, 5, 16), (n, h3, h3, 8), (3, 3, 8, 8)),
      (('fc1',), AdderDense, (n, flat), (n, 32), (flat, 32)),
      (('fc2',), nn.Dense, (n, 32), (n, 10), (32, 10)),
      ((), LeNetLike, (n, 28, 28, 1), (n, 10), None),  # returns last
  ]
  got = [(c.path, c.type, c.input_shape, c.output_shape, c.kernel_shape)
         for c in calls]
  assert got == expected
  assert (h1, h2, h3) == (28, 10, 3)
  assert all(c.method == '__call__' for c in calls)
  assert all(c.input_dtype == jnp.float32 and c.output_dtype == jnp.float32
             for c in calls)
  by_name = {c.name: c for c in calls}
  assert by_name[''].path == ()
  conv1, conv2, conv3 = by_name['conv1'], by_name['conv2'], by_name['conv3']
  assert (conv1.kernel_size, conv1.strides, conv1.padding) == (
      (5, 5), (1, 1), 'SAME')
  assert (conv2.padding, conv2.feature_group_count) == ('VALID', 1)
  assert (conv3.kernel_size, conv3.strides, conv3.padding,
          conv3.kernel_dilation, conv3.input_dilation,
          conv3.feature_group_count) == (
              (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 2)
  # Dense layers and the model have no geometry.
  for name in ('fc1', 'fc2', ''):
    c = by_name[name]
    assert (c.kernel_size, c.strides, c.padding, c.feature_group_count) == (
        None, None, None, None)
  # Own variables only (not the submodules'), abstract.
  assert set(conv1.variables['params']) == {'kernel', 'bias'}
  assert set(conv2.variables['params']) == {'kernel'}
  assert by_name[''].variables == {}
  assert conv1.variables['params']['bias'] == jax.ShapeDtypeStruct(
      (6,), jnp.float32)


@pytest.mark.parametrize('layer', [nn.Conv, AdderConv])
@pytest.mark.parametrize(
    'kernel,strides,padding,dilation,groups,pads',
    [((3, 3), 1, 'SAME', 1, 1, None),
     ((3, 3), 2, 'SAME', 1, 1, None),
     ((3, 2), (2, 1), 'VALID', 1, 1, ((0, 0), (0, 0))),
     ((3, 3), 1, ((1, 2), (0, 3)), 2, 1, ((1, 2), (0, 3))),
     ((1, 1), 2, 0, 1, 4, ((0, 0), (0, 0))),
     ((3, 3), 1, 'CIRCULAR', 1, 1, ((1, 1), (1, 1))),
     ((3, 3), 1, [(2, 0), 1], (1, 2), 2, ((2, 0), (1, 1)))])
def test_geometry_and_shapes_by_formula(layer, kernel, strides, padding,
                                        dilation, groups, pads):
  h, w, cin, cout = 11, 9, 4, 8
  module = layer(cout, kernel, strides=strides, padding=padding,
                 kernel_dilation=dilation, feature_group_count=groups)
  (call,) = trace_layers(module, jax.ShapeDtypeStruct((2, h, w, cin),
                                                      jnp.float32))
  s = (strides,) * 2 if isinstance(strides, int) else strides
  d = (dilation,) * 2 if isinstance(dilation, int) else dilation
  if padding == 'SAME':
    out = (same_size(h, s[0]), same_size(w, s[1]))
  else:
    out = (out_size(h, kernel[0], s[0], *pads[0], d[0]),
           out_size(w, kernel[1], s[1], *pads[1], d[1]))
  assert call.type is layer
  assert call.output_shape == (2, *out, cout)
  assert call.input_shape == (2, h, w, cin)
  assert call.kernel_shape == (*kernel, cin // groups, cout)
  assert call.kernel_size == kernel
  assert call.strides == s
  assert call.kernel_dilation == d
  assert call.feature_group_count == groups
  if isinstance(padding, str):
    assert call.padding == padding
  else:
    assert call.padding == pads


def test_dtypes_and_keyword_arguments_are_recorded():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Conv(4, (3, 3), dtype=jnp.bfloat16, name='c')(x)
      return nn.BatchNorm(use_running_average=not train, name='bn')(x)

  x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
  calls = trace_layers(Net(), x, train=False)
  assert [c.name for c in calls] == ['c', 'bn', '']
  c, bn, top = calls
  assert (c.input_dtype, c.output_dtype) == (jnp.float32, jnp.bfloat16)
  assert top.kwargs == {'train': False}
  assert set(bn.variables) == {'params', 'batch_stats'}
  assert bn.variables['batch_stats']['mean'].shape == (4,)


class Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='d')(x)


class WithSetup(nn.Module):
  def setup(self):
    self.proj = nn.Dense(3)
    self.inner = Inner()

  def __call__(self, x):
    return self.inner(self.proj(x))

  def encode(self, x):
    return self.proj(x)


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(Inner)(name='rem')(x)
    x = nn.remat(WithSetup)(name='rem_setup')(x)
    x = WithSetup(name='plain')(x)
    return Inner(name='last')(x)


EXPECTED_NESTED = [
    ('rem', 'd'), ('rem',),
    ('rem_setup', 'proj'), ('rem_setup', 'inner', 'd'),
    ('rem_setup', 'inner'), ('rem_setup',),
    ('plain', 'proj'), ('plain', 'inner', 'd'), ('plain', 'inner'),
    ('plain',),
    ('last', 'd'), ('last',),
    (),
]


def test_nested_setup_and_remat_modules_have_their_real_paths():
  x = jax.ShapeDtypeStruct((2, 5), jnp.float32)
  calls = trace_layers(Nested(), x)
  assert [c.path for c in calls] == EXPECTED_NESTED
  types = {c.path: c.type for c in calls}
  assert types[('rem',)] is Inner  # the lifted module as its own class
  assert types[('rem_setup',)] is WithSetup
  assert all(c.output_shape == (2, 3) for c in calls)
  dense = trace_layers(Nested(), x, select=nn.Dense)
  assert [c.path for c in dense] == [p for p in EXPECTED_NESTED
                                     if p and p[-1] in ('d', 'proj')]


def test_validation_scopes_are_skipped():
  x = jax.ShapeDtypeStruct((2, 5), jnp.float32)
  # Flax does make calls on a throw-away TestScope for the lifted modules ...
  raw = []

  def interceptor(next_fun, args, kwargs, context):
    raw.append(type(context.module.scope.root))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    introspect.abstract_init(Nested(), x)
  assert linen_module.TestScope in raw
  # ... which the walker neither records nor replaces.
  calls = trace_layers(Nested(), x, methods=None)
  assert calls
  assert not any(isinstance(c.module.scope.root, linen_module.TestScope)
                 for c in calls)
  assert all(c.path or c.type is Nested for c in calls)
  # Every method: setup is recorded too, on the real path.
  setups = [c.path for c in calls if c.method == 'setup']
  assert setups == [('rem_setup',), ('plain',)]


def test_methods_selects_user_methods():
  x = jax.ShapeDtypeStruct((2, 5), jnp.float32)
  calls = trace_layers(WithSetup(), x, method='encode', methods='encode')
  assert [(c.path, c.method, c.output_shape) for c in calls] == [
      ((), 'encode', (2, 3))]
  calls = trace_layers(WithSetup(), x, method='encode')
  assert [c.path for c in calls] == [('proj',)]


def test_zoo_remat_blocks_trace_the_same_layers():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

  def leaves(model):
    calls = trace_layers(model, x, train=False,
                         select=(nn.Conv, nn.Dense, AdderConv, nn.BatchNorm))
    return [(c.path, c.type, c.input_shape, c.output_shape, c.strides,
             c.padding) for c in calls]

  plain = leaves(create_model('resnet20', num_classes=10))
  remat = leaves(create_model('resnet20', num_classes=10, remat_blocks=True))
  assert plain == remat
  # stem conv + bn, 9 blocks x (2 convs + 2 bns), 2 shortcuts x (conv + bn),
  # fc + fc_bn.
  assert len(plain) == 2 + 9 * 4 + 2 * 2 + 2
  strided = [p for p, t, *_, s, _ in plain
             if t is AdderConv and s == (2, 2)]
  assert len(strided) == 2 * 2  # first conv of layer2_0, layer3_0 + shortcuts


def test_boxed_parameters_are_unboxed():
  module = nn.Dense(3, kernel_init=nn.with_partitioning(
      nn.initializers.lecun_normal(), (None, 'model')))
  (call,) = trace_layers(module, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  assert call.kernel_shape == (4, 3)


def _forward_np(variables, x, scale_head):
  p = variables['params']
  h = np.tanh(x @ np.asarray(p['body']['kernel']) +
              np.asarray(p['body']['bias']))
  y = h @ np.asarray(p['head']['kernel']) + np.asarray(p['head']['bias'])
  return scale_head * y


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4, name='body')(x))
    return nn.Dense(2, name='head')(x)


def test_rewrite_hook_replaces_the_selected_call():
  x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
  model = TwoDense()
  variables = model.init(jax.random.key(0), x)

  def double(next_fun, args, kwargs, context):
    return 2 * next_fun(*args, **kwargs)

  with intercept_layers(lambda m: m.name == 'head', replace=double) as calls:
    y = model.apply(variables, x)
  np.testing.assert_allclose(y, _forward_np(variables, x, 2), rtol=1e-5,
                             atol=1e-5)
  assert [c.path for c in calls] == [('head',)]
  # Outside the block, nothing is replaced.
  np.testing.assert_allclose(model.apply(variables, x),
                             _forward_np(variables, x, 1), rtol=1e-5,
                             atol=1e-5)


def test_rewrite_hook_without_calling_the_module():
  x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
  model = TwoDense()
  variables = model.init(jax.random.key(0), x)
  w = np.asarray(variables['params']['body']['kernel'])

  def l1_layer(next_fun, args, kwargs, context):
    kernel = context.module.get_variable('params', 'kernel')
    return -jnp.abs(args[0][:, :, None] - kernel[None]).sum(1)

  with intercept_layers(nn.Dense, replace=l1_layer) as calls:
    y = jax.jit(model.apply)(variables, x)
  body = np.tanh(-np.abs(x[:, :, None] - w[None]).sum(1))
  head = -np.abs(body[:, :, None] -
                 np.asarray(variables['params']['head']['kernel'])[None]
                 ).sum(1)
  np.testing.assert_allclose(y, head, rtol=1e-5, atol=1e-5)
  assert [c.name for c in calls] == ['body', 'head']  # traced once
  assert calls[0].output == jax.ShapeDtypeStruct((3, 4), jnp.float32)


def test_bad_arguments_name_the_value():
  with pytest.raises(TypeError, match='select.*3'):
    with intercept_layers(3):
      pass
  with pytest.raises(TypeError, match='methods.*5'):
    with intercept_layers(methods=5):
      pass
  with pytest.raises(TypeError, match="replace.*'x'"):
    with intercept_layers(replace='x'):
      pass


def test_public_names():
  assert adderjax.trace_layers is trace_layers
  assert adderjax.introspect.LayerCall is LayerCall
