"""Shape-polymorphic and multi-platform ``jax.export`` of the adder ops.

* A symbolic batch in every layer (conv of every geometry, dense, every grad
  mode, forward and VJP): the exported function equals the jitted one at
  several batch sizes (bit-for-bit on this CPU, asserted to float tolerance).
* A symbolic spatial size where the layer has unit strides and dilation;
  elsewhere a ``ValueError`` naming the dimension (and the constraint to add
  where an output size cannot be proved positive).
* Accelerator lowerings from this CPU host: the Pallas kernels need static
  sizes, so a symbolic layer lowers the XLA backend for cuda / tpu (with a
  warning) and a named interpret backend is refused; a static one still
  carries the kernels.
* :mod:`adderjax.export`: the safety checks a multi-platform export needs.
* Zoo models (LeNet-5-BN, ResNet-20; slow): eval and a train-mode gradient.
"""

from __future__ import annotations

import importlib.util
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import adderjax
from adderjax import export as adder_export
from adderjax import models
from adderjax.linen import AdderConv
from adderjax.linen import AdderDense
from pallas_kernels import gpu_lowering

MODES = ('full_precision', 'sign', 'unclipped')
TRITON, MOSAIC = gpu_lowering.TRITON_CUSTOM_CALL, 'tpu_custom_call'


def _spec(shape_text, dtype=jnp.float32, **kwargs):
  return jax.ShapeDtypeStruct(export.symbolic_shape(shape_text, **kwargs),
                              dtype)


def _value_and_grads(op, **kwargs):
  """``x, w -> (op(x, w), d/dx, d/dw)`` of a non-linear loss, jitted."""

  def loss(x, w):
    return jnp.sum(jnp.sin(op(x, w, **kwargs)))

  return jax.jit(lambda x, w: (op(x, w, **kwargs),
                               *jax.grad(loss, (0, 1))(x, w)))


def _assert_tree_close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def _check_export(fn, specs, concrete_args):
  """Exports ``fn`` at ``specs`` (cpu), round-trips it through bytes (when
  jax's optional flatbuffers is installed) and checks it against ``fn`` for
  each tuple of ``concrete_args``."""
  exp = _round_trip(export.export(fn, platforms=('cpu',))(*specs))
  for args in concrete_args:
    _assert_tree_close(exp.call(*args), fn(*args))
  return exp


def _round_trip(exp):
  if importlib.util.find_spec('flatbuffers') is None:
    return exp
  return export.deserialize(exp.serialize())


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


# (input shape with a symbolic batch, kernel shape, adder_conv arguments)
CONVS = {
    'strided_same': ('b, 9, 9, 3', (3, 3, 3, 4),
                     dict(strides=2, padding='SAME')),
    'grouped_padded': ('b, 9, 7, 4', (3, 3, 2, 6),
                       dict(strides=(2, 1), padding=1,
                            feature_group_count=2)),
    'one_tap_strided': ('b, 9, 9, 4', (1, 1, 4, 6),
                        dict(strides=2, padding='VALID')),
    'dilated_1d': ('b, 11, 5', (3, 5, 6),
                   dict(padding='SAME', kernel_dilation=2)),
    'conv_3d': ('b, 5, 6, 7, 2', (2, 2, 2, 2, 3),
                dict(strides=(1, 2, 3), padding=((2, 0), (1, 3), (0, 0)))),
}


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_with_a_symbolic_batch_equals_jit(name, mode):
  shape_text, kshape, kwargs = CONVS[name]
  fn = _value_and_grads(adderjax.adder_conv, grad=mode, **kwargs)
  rest = tuple(int(d) for d in shape_text.split(',')[1:])
  w = _normal(1, kshape)
  exp = _check_export(
      fn, (_spec(shape_text), jax.ShapeDtypeStruct(kshape, jnp.float32)),
      [(_normal(n, (n,) + rest), w) for n in (1, 2, 5)])
  assert str(exp.out_avals[0].shape[0]) == 'b'


@pytest.mark.parametrize('mode', MODES)
def test_dense_with_symbolic_leading_dims_equals_jit(mode):
  fn = _value_and_grads(adderjax.adder_dense, grad=mode)
  w = _normal(1, (12, 5))
  _check_export(fn, (_spec('b, t, 12'),
                     jax.ShapeDtypeStruct((12, 5), jnp.float32)),
                [(_normal(0, (1, 1, 12)), w), (_normal(2, (3, 4, 12)), w)])


# Symbolic spatial sizes: unit strides and dilation, any zero padding.
SPATIAL = {
    'same': ('b, h, w, 3', {}, dict(padding='SAME')),
    'explicit': ('b, h, w, 3', {}, dict(padding=((2, 0), (1, 3)))),
    'valid': ('b, h + 2, w + 2, 3', {}, dict(padding='VALID')),
    'mixed_strided_static_dim': ('b, h, 9, 3', {},
                                 dict(padding=1, strides=(1, 2))),
}


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', sorted(SPATIAL))
def test_conv_with_symbolic_spatial_sizes_equals_jit(name, mode):
  shape_text, spec_kwargs, kwargs = SPATIAL[name]
  fn = _value_and_grads(adderjax.adder_conv, grad=mode, **kwargs)
  w = _normal(1, (3, 3, 3, 4))
  shapes = [(2, 5, 9, 3), (1, 8, 9, 3)] if '9' in shape_text else [
      (2, 5, 7, 3), (1, 8, 3, 3)]
  _check_export(fn, (_spec(shape_text, **spec_kwargs),
                     jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)),
                [(_normal(i, s), w) for i, s in enumerate(shapes)])


def _export_conv(shape_text, kshape=(3, 3, 3, 4), platforms=('cpu',),
                 spec_kwargs=None, **kwargs):
  fn = jax.jit(lambda x, w: adderjax.adder_conv(x, w, **kwargs))
  return export.export(
      fn, platforms=platforms,
      disabled_checks=adder_export.export_safety_checks(platforms))(
          _spec(shape_text, **(spec_kwargs or {})),
          jax.ShapeDtypeStruct(kshape, jnp.float32))


@pytest.mark.parametrize('kwargs,match', [
    (dict(strides=2), r"dimension 0 is the symbolic dimension 'h'.*strides "
                      r'1 and kernel_dilation 1.*got strides \(2, 2\)'),
    (dict(kernel_dilation=(1, 2)),
     r"dimension 1 is the symbolic dimension 'w'.*kernel_dilation \(1, 2\)"),
    (dict(padding='VALID'),
     r"symbolic dimension 'h' and the output size 'h - 2'.*cannot be proved "
     r"positive.*Write that input size as 'h \+ 2'"),
    (dict(padding='VALID', spec_kwargs=dict(constraints=('h >= 3',
                                                          'w >= 3'))),
     r"symbolic dimension 'h'.*Write that input size as 'h \+ 2'"),
])
def test_symbolic_spatial_sizes_the_geometry_cannot_take_are_named(kwargs,
                                                                   match):
  with pytest.raises(ValueError, match=match):
    _export_conv('b, h, w, 3', **kwargs)


def test_a_symbolic_feature_dimension_is_named():
  with pytest.raises(ValueError, match="feature dimension.*symbolic "
                                       "dimension 'c'"):
    _export_conv('b, 8, 8, c', kshape=(3, 3, 3, 4))


@pytest.mark.parametrize('implementation',
                         ['pallas_gpu_interpret', 'pallas_tpu_interpret'])
def test_a_named_interpret_backend_refuses_a_symbolic_batch(implementation):
  with pytest.raises(ValueError,
                     match=rf"implementation='{implementation}' cannot take "
                           r"the symbolic dimension 'b'.*static sizes"):
    _export_conv('b, 8, 8, 3', implementation=implementation)
  # 'xla' takes it.
  _export_conv('b, 8, 8, 3', implementation='xla')


def test_accelerator_lowering_of_a_symbolic_batch_runs_xla():
  # From this CPU host: the kernels need static sizes, so cuda and tpu get
  # the XLA backend for a symbolic batch (with a warning) and the kernels
  # for a static one.
  platforms = ('cpu', 'cuda', 'tpu')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    text = _export_conv('b, 9, 9, 3', platforms=platforms,
                        strides=2).mlir_module()
  assert TRITON not in text and MOSAIC not in text
  messages = {str(w.message) for w in caught}
  assert any('lowered for cuda with the XLA backend' in m for m in messages)
  assert any('lowered for tpu with the XLA backend' in m for m in messages)
  fn = jax.jit(lambda x, w: adderjax.adder_conv(x, w, strides=2))
  static = export.export(
      fn, platforms=platforms,
      disabled_checks=adder_export.export_safety_checks(platforms))(
          jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)).mlir_module()
  assert TRITON in static and MOSAIC in static


def test_cpu_export_of_a_symbolic_batch_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _export_conv('b, 9, 9, 3', strides=2)


# --- the multi-platform helper ----------------------------------------------


def test_export_safety_checks():
  triton = [export.DisabledSafetyCheck.custom_call(TRITON)]
  assert adder_export.export_safety_checks(['cpu']) == []
  assert adder_export.export_safety_checks(('cpu', 'tpu')) == []
  assert adder_export.export_safety_checks(('cpu', 'cuda')) == triton
  assert adder_export.export_safety_checks('rocm') == triton
  assert adder_export.export_safety_checks(None) == triton
  for bad in (['gpu'], [], ('cpu', 3)):
    with pytest.raises(ValueError, match='platforms'):
      adder_export.export_safety_checks(bad)


def test_multi_platform_export_needs_the_helper_and_works_with_it():
  fn = jax.jit(lambda x, w: adderjax.adder_conv(x, w, padding='SAME'))
  args = (jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32))
  platforms = ('cpu', 'cuda', 'tpu')
  with pytest.raises(ValueError, match='custom call'):
    export.export(fn, platforms=platforms)(*args)
  exp = export.export(
      fn, platforms=platforms,
      disabled_checks=adder_export.export_safety_checks(platforms))(*args)
  assert exp.platforms == platforms
  text = exp.mlir_module()
  assert text.count(TRITON) == 1 and text.count(MOSAIC) == 1
  # The wrapper: same checks, jit added, and the CPU part runs here.
  exp2 = adder_export.export(lambda x, w: adderjax.adder_conv(
      x, w, padding='SAME'), platforms=('cpu', 'cuda'))(*args)
  assert exp2.platforms == ('cpu', 'cuda')
  x, w = _normal(0, (2, 8, 8, 3)), _normal(1, (3, 3, 3, 4))
  np.testing.assert_array_equal(_round_trip(exp2).call(x, w), fn(x, w))


# --- networks ----------------------------------------------------------------


class _TinyNet(nn.Module):
  """Adder conv (SAME, strided, 1x1) + BatchNorm + adder dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = AdderConv(4, (3, 3), strides=2, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(AdderConv(6, (1, 1), use_bias=False)(x))
    x = x.reshape(x.shape[0], -1)
    return AdderDense(3)(x)


def _check_network(model, image_shape, batches, train_batches):
  """Eval-mode logits and a train-mode gradient, exported with a symbolic
  batch, against jit."""
  variables = model.init(jax.random.PRNGKey(0),
                         jnp.ones((2,) + image_shape), train=False)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          variables)
  x_spec = _spec('b, ' + ', '.join(map(str, image_shape)))
  predict = jax.jit(lambda v, x: model.apply(v, x, train=False))
  _check_export(predict, (abstract, x_spec),
                [(variables, _normal(n, (n,) + image_shape))
                 for n in batches])

  def loss(params, batch_stats, x, y):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                            x, train=True, mutable=['batch_stats'])
    labels = jax.nn.one_hot(y, logits.shape[-1])
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1))

  y_spec = jax.ShapeDtypeStruct(
      export.symbolic_shape('b', scope=x_spec.shape[0].scope), jnp.int32)
  grad = jax.jit(jax.grad(loss))
  _check_export(grad, (abstract['params'], abstract['batch_stats'], x_spec,
                       y_spec),
                [(variables['params'], variables['batch_stats'],
                  _normal(n, (n,) + image_shape), jnp.arange(n) % 3)
                 for n in train_batches])


def test_a_small_network_exports_with_a_symbolic_batch():
  _check_network(_TinyNet(), (8, 8, 2), (1, 3), (2, 5))


@pytest.mark.slow
@pytest.mark.parametrize('name,image_shape', [('lenet5_bn', (28, 28, 1)),
                                              ('resnet20', (32, 32, 3))])
def test_zoo_model_exports_with_a_symbolic_batch(name, image_shape):
  # LeNet-5-BN ~35 s, ResNet-20 ~100 s on 2 shared cores.
  model = models.create_model(name, kind='adder', num_classes=10)
  _check_network(model, image_shape, (1, 3), (2, 5))
