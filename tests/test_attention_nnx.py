"""NNX adder attention: the twin of the Linen module, a drop-in for flax's."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

from adderjax import linen as alinen
from adderjax import nnx as annx
from adderjax import optim

B, L, F, HEADS, QKV = 2, 4, 6, 2, 8
TOL = dict(rtol=2e-5, atol=2e-5)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _random_variables(shapes, adder):
  """Random values for abstract Linen variables (no init is compiled)."""
  flat = traverse_util.flatten_dict(shapes)
  out = {}
  for i, (path, leaf) in enumerate(sorted(flat.items())):
    noise = np.random.default_rng(i).normal(size=leaf.shape)
    name = path[-1]
    if name == 'kernel':   # standard normal (adder) or LeCun normal (dense)
      fan_in = (math.prod(leaf.shape[:-1]) if path[-2] == 'out'
                else leaf.shape[0])
      value = noise if adder else noise / math.sqrt(fan_in)
    elif name in ('scale', 'var'):
      value = 1.0 + 0.1 * np.abs(noise)
    else:                  # biases, BatchNorm means
      value = 0.1 * noise
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _nnx_with(abstract_model, variables):
  """The abstract NNX model holding the Linen ``variables`` (same names)."""
  graphdef, state = nnx.split(abstract_model)
  pure = {}
  for collection in variables.values():
    pure.update(traverse_util.flatten_dict(collection))
  expected = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  assert ({k: v.shape for k, v in pure.items()} ==
          {k: v.shape for k, v in expected.items()})
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
  return nnx.merge(graphdef, state)


def _nnx_apply(model, *inputs, **kwargs):
  """Pure call of ``model`` (state updates discarded): safe under jax.grad."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state, copy=True)(*inputs, **kwargs)


def _linen_apply(layer, variables, *inputs, **kwargs):
  mutable = [c for c in variables if c != 'params']
  out = layer.apply(variables, *inputs, mutable=mutable or False, **kwargs)
  return out[0] if mutable else out


def _pair(train=False, **kwargs):
  """A Linen module with random variables and the NNX twin holding them."""
  x = jax.ShapeDtypeStruct((B, L, F), jnp.float32)
  norm = kwargs.pop('norm', False)
  lkw = dict(kwargs)
  if norm:
    lkw['projection_norm'] = functools.partial(
        nn.BatchNorm, use_running_average=not train, use_fast_variance=False)
  layer = alinen.AdderMultiHeadAttention(num_heads=HEADS, qkv_features=QKV,
                                         **lkw)
  variables = _random_variables(
      jax.eval_shape(layer.init, jax.random.key(0), x),
      kwargs.get('projection', 'adder') == 'adder')

  def build():
    nkw = dict(kwargs)
    rngs = nnx.Rngs(1)
    if norm:
      nkw['projection_norm'] = lambda f: nnx.BatchNorm(
          f, use_running_average=not train, use_fast_variance=False,
          rngs=rngs)
    return annx.AdderMultiHeadAttention(HEADS, F, QKV, rngs=rngs, **nkw)

  return layer, variables, _nnx_with(nnx.eval_shape(build), variables)


def _assert_same(layer, variables, model, *inputs, **kwargs):
  """Same outputs and input gradients from the Linen and NNX modules."""
  y_linen, vjp_linen = jax.vjp(
      lambda *a: _linen_apply(layer, variables, *a, **kwargs), *inputs)
  y_nnx, vjp_nnx = jax.vjp(lambda *a: _nnx_apply(model, *a, **kwargs),
                           *inputs)
  np.testing.assert_allclose(y_nnx, y_linen, **TOL)
  ct = _normal(7, y_linen.shape)
  for a, b in zip(vjp_nnx(ct), vjp_linen(ct)):
    np.testing.assert_allclose(a, b, **TOL)
    assert float(jnp.abs(b).max()) > 0


@pytest.mark.parametrize(
    'projection,score,identity',
    list(itertools.product(('adder', 'dense'), ('l1', 'dot'),
                           (None, 'output', 'logits'))))
def test_nnx_matches_linen(projection, score, identity):
  layer, variables, model = _pair(projection=projection, score=score,
                                  identity=identity)
  _assert_same(layer, variables, model, _normal(0, (B, L, F)))


@pytest.mark.parametrize('projection,score,identity',
                         [('adder', 'l1', 'output'), ('dense', 'dot', None)])
def test_nnx_matches_linen_normalize_qk(projection, score, identity):
  layer, variables, model = _pair(projection=projection, score=score,
                                  identity=identity, normalize_qk=True)
  assert model.query_ln.scale.shape == (QKV // HEADS,)
  _assert_same(layer, variables, model, _normal(0, (B, L, F)))


def test_nnx_matches_linen_with_mask():
  layer, variables, model = _pair(identity='logits')
  mask = np.random.default_rng(3).random((B, 1, L, L)) > 0.5
  mask = jnp.asarray(mask | np.eye(L, dtype=bool))
  _assert_same(layer, variables, model, _normal(0, (B, L, F)), mask=mask)


def test_nnx_matches_linen_cross_attention():
  layer, variables, model = _pair(identity=None)
  _assert_same(layer, variables, model, _normal(0, (B, L, F)),
               _normal(1, (B, L, F)), _normal(2, (B, L, F)))


def test_nnx_matches_linen_batchnorm_projection_norm_train():
  layer, variables, model = _pair(train=True, norm=True)
  assert model.query_norm.scale.shape == (QKV,)
  assert model.out_norm.scale.shape == (F,)
  x = _normal(0, (B, L, F))
  _assert_same(layer, variables, model, x)
  # The batch statistics are updated alike.
  _, updates = layer.apply(variables, x, mutable=['batch_stats'])
  model(x)
  for name in ('query_norm', 'key_norm', 'value_norm', 'out_norm'):
    stats = updates['batch_stats'][name]
    np.testing.assert_allclose(getattr(model, name).mean[...],
                               stats['mean'], **TOL)
    np.testing.assert_allclose(getattr(model, name).var[...],
                               stats['var'], rtol=1e-4)


def test_nnx_batchnorm_projection_norm_eval_mode():
  layer, variables, model = _pair(train=False, norm=True)
  _assert_same(layer, variables, model, _normal(0, (B, L, F)))


def test_sow_weights_match_linen():
  layer, variables, model = _pair(identity='output')
  x = _normal(0, (B, L, F))
  _, inter = layer.apply(variables, x, sow_weights=True,
                         mutable=['intermediates'])
  _, inter_nnx = nnx.capture(model, nnx.Intermediate)(x, sow_weights=True)
  (w,) = inter_nnx['attention_weights'].get_value()
  np.testing.assert_allclose(w, inter['intermediates']['attention_weights'][0],
                             **TOL)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('normalize_qk', [False, True])
def test_dense_dot_no_identity_is_flax_multi_head_attention(normalize_qk):
  kw = dict(qkv_features=QKV, normalize_qk=normalize_qk)
  model = annx.AdderMultiHeadAttention(
      HEADS, F, projection='dense', score='dot', identity=None,
      rngs=nnx.Rngs(0), **kw)
  ref = nnx.MultiHeadAttention(HEADS, F, decode=False, rngs=nnx.Rngs(0),
                               **kw)
  ours, theirs = nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param)
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(ours)) ==
          jax.tree.map(jnp.shape, nnx.to_pure_dict(theirs)))
  # Built in flax's order: the same rngs draw the same parameters.
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(ours),
               nnx.to_pure_dict(theirs))
  nnx.update(ref, jax.tree.map(lambda v: v + 0.1 * _normal(v.size, v.shape),
                               theirs))
  nnx.update(model, nnx.state(ref, nnx.Param))
  x, kv = _normal(0, (B, L, F)), _normal(1, (B, L, F))
  mask = jnp.asarray(np.random.default_rng(3).random((B, 1, L, L)) > 0.3)
  np.testing.assert_allclose(model(x, kv, mask=mask), ref(x, kv, mask=mask),
                             **TOL)
  ct = _normal(7, (B, L, F))
  g_ours = jax.grad(lambda a: jnp.vdot(_nnx_apply(model, a, kv), ct))(x)
  g_ref = jax.grad(lambda a: jnp.vdot(_nnx_apply(ref, a, kv), ct))(x)
  np.testing.assert_allclose(g_ours, g_ref, **TOL)


def test_grouped_query_and_kv_features_dense_dot_is_flax():
  # num_kv_heads < num_heads (grouped-query attention) and keys / values
  # with their own feature count: flax's own module is the reference.
  kw = dict(qkv_features=QKV, num_kv_heads=2, in_kv_features=5)
  model = annx.AdderMultiHeadAttention(
      4, F, projection='dense', score='dot', identity=None,
      rngs=nnx.Rngs(0), **kw)
  ref = nnx.MultiHeadAttention(4, F, decode=False, rngs=nnx.Rngs(0), **kw)
  ours, theirs = nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(ours),
               nnx.to_pure_dict(theirs))
  assert model.key.kernel.shape == (5, 2, 2)
  nnx.update(ref, jax.tree.map(lambda v: v + 0.1 * _normal(v.size, v.shape),
                               theirs))
  nnx.update(model, nnx.state(ref, nnx.Param))
  x, kv = _normal(0, (B, L, F)), _normal(1, (B, 3, 5))
  mask = jnp.asarray(np.random.default_rng(3).random((B, 1, L, 3)) > 0.3)
  np.testing.assert_allclose(model(x, kv, mask=mask), ref(x, kv, mask=mask),
                             **TOL)


@pytest.mark.parametrize('score', ['l1', 'dot'])
def test_grouped_query_is_repeated_kv_heads(score):
  # Grouped-query attention is full multi-head attention whose key / value
  # kernels repeat each kv head for its group of query heads (head h uses
  # kv head h // group), adder projections and l1 scores included.
  gqa = annx.AdderMultiHeadAttention(4, F, QKV, num_kv_heads=2, score=score,
                                     identity=None, rngs=nnx.Rngs(0))
  full = annx.AdderMultiHeadAttention(4, F, QKV, score=score, identity=None,
                                      rngs=nnx.Rngs(1))
  for name in ('query', 'out'):
    getattr(full, name).kernel[...] = getattr(gqa, name).kernel[...]
    getattr(full, name).bias[...] = getattr(gqa, name).bias[...]
  for name in ('key', 'value'):
    src, dst = getattr(gqa, name), getattr(full, name)
    dst.kernel[...] = jnp.repeat(src.kernel[...], 2, axis=1)
    dst.bias[...] = jnp.repeat(src.bias[...], 2, axis=0)
  x = _normal(0, (B, L, F))
  np.testing.assert_allclose(gqa(x), full(x), **TOL)
  ct = _normal(7, (B, L, F))
  g_gqa = jax.grad(lambda a: jnp.vdot(_nnx_apply(gqa, a), ct))(x)
  g_full = jax.grad(lambda a: jnp.vdot(_nnx_apply(full, a), ct))(x)
  np.testing.assert_allclose(g_gqa, g_full, **TOL)


class _Block(nnx.Module):

  def __init__(self, projection, rngs):
    self.attn = annx.AdderMultiHeadAttention(
        HEADS, F, QKV, projection=projection, normalize_qk=True,
        projection_norm=lambda f: nnx.BatchNorm(f, use_fast_variance=False,
                                                rngs=rngs),
        rngs=rngs)
    self.head = nnx.Linear(F, 3, rngs=rngs)


def test_adder_mask_selects_the_four_adder_kernels():
  model = nnx.eval_shape(lambda: _Block('adder', nnx.Rngs(0)))
  selected = sorted(path for path, m in
                    nnx.to_flat_state(optim.adder_mask(model)) if m)
  assert selected == [('attn', name, 'kernel')
                      for name in ('key', 'out', 'query', 'value')]
  dense = nnx.eval_shape(lambda: _Block('dense', nnx.Rngs(0)))
  assert not any(jax.tree.leaves(optim.adder_mask(dense)))


def test_adder_linear_general_mask():
  layer = annx.AdderLinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))
  mask = optim.adder_mask(layer)
  assert mask['kernel'] is True and mask['bias'] is False


def test_jit_equals_eager():
  _, _, model = _pair(identity='logits', normalize_qk=True)
  x = _normal(0, (B, L, F))
  eager = model(x)
  jitted = nnx.jit(lambda m, a: m(a))(model, x)
  np.testing.assert_allclose(jitted, eager, **TOL)
  g_eager = nnx.grad(lambda m: m(x).sum())(model)
  g_jit = nnx.jit(nnx.grad(lambda m: m(x).sum()))(model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               nnx.to_pure_dict(g_jit), nnx.to_pure_dict(g_eager))


def test_dropout():
  model = annx.AdderMultiHeadAttention(HEADS, F, QKV, dropout_rate=0.5,
                                       rngs=nnx.Rngs(0))
  x = _normal(0, (B, L, F))
  with pytest.raises(ValueError, match='deterministic'):
    model(x)
  clean = model(x, deterministic=True)
  dropped = model(x, deterministic=False)
  assert not np.allclose(clean, dropped)
  assert not np.allclose(dropped, model(x, deterministic=False))  # new key
  np.testing.assert_allclose(
      model(x, deterministic=False, rngs=nnx.Rngs(dropout=5)),
      model(x, deterministic=False, rngs=nnx.Rngs(dropout=5)))
  model.eval()
  np.testing.assert_allclose(model(x), clean)


@pytest.mark.parametrize('kwargs', [
    dict(in_features=6, out_features=(2, 4)),
    dict(in_features=(2, 3), out_features=(4, 5), axis=(1, -1)),
    dict(in_features=(2, 3), out_features=5, axis=(-2, -1), use_bias=False),
])
def test_adder_linear_general_matches_linen_and_flax_shapes(kwargs):
  shape = (3, 2, 3) if kwargs.get('axis') else (3, 6)
  x = _normal(0, shape)
  layer = annx.AdderLinearGeneral(**kwargs, rngs=nnx.Rngs(0))
  ref = nnx.LinearGeneral(**kwargs, rngs=nnx.Rngs(0))
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer))) ==
          jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(ref))))
  y = layer(x)
  assert y.shape == ref(x).shape
  twin = alinen.AdderDenseGeneral(
      features=kwargs['out_features'], axis=kwargs.get('axis', -1),
      use_bias=kwargs.get('use_bias', True))
  params = {'kernel': layer.kernel[...]}
  if layer.bias is not None:
    layer.bias[...] = _normal(1, layer.bias.shape)
    params['bias'] = layer.bias[...]
  np.testing.assert_allclose(layer(x), twin.apply({'params': params}, x),
                             **TOL)


def test_adder_linear_general_kernel_is_standard_normal():
  kernel = annx.AdderLinearGeneral(64, (4, 16), rngs=nnx.Rngs(0)).kernel[...]
  assert abs(float(kernel.std()) - 1.0) < 0.05


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_features=0, out_features=3), r'`in_features` .*got 0'),
    (dict(in_features=(2, -1), out_features=3, axis=(0, 1)),
     r'in_features\[1\].*-1'),
    (dict(in_features=(), out_features=3), r'in_features.*\(\)'),
    (dict(in_features=4, out_features='3'), "out_features.*'3'"),
    (dict(in_features=(2, 3), out_features=3), r'axis=-1'),
    (dict(in_features=4, out_features=3, axis=1.0), 'axis.*1.0'),
    (dict(in_features=4, out_features=3, grad='exact'), 'exact'),
    (dict(in_features=4, out_features=3, implementation='cuda'), 'cuda'),
])
def test_adder_linear_general_bad_arguments(kwargs, match):
  with pytest.raises((TypeError, ValueError), match=match):
    annx.AdderLinearGeneral(**kwargs, rngs=nnx.Rngs(0))


def test_adder_linear_general_bad_inputs():
  layer = annx.AdderLinearGeneral(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'in_features=\(4,\).*\(2, 5\)'):
    layer(jnp.ones((2, 5)))
  with pytest.raises(ValueError, match='scalar'):
    layer(jnp.ones(()))
  wide = annx.AdderLinearGeneral((2, 4), 3, axis=(-3, -1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'axis=\(-3, -1\).*\(2, 4\)'):
    wide(jnp.ones((2, 4)))
  with pytest.raises(TypeError, match='rngs'):
    annx.AdderLinearGeneral(4, 3, rngs=0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_heads=0), 'num_heads.*0'),
    (dict(in_features=-1), 'in_features.*-1'),
    (dict(qkv_features=7), 'qkv_features=7.*num_heads=2'),
    (dict(out_features=0), 'out_features.*0'),
    (dict(num_kv_heads=3), 'num_kv_heads=3 does not divide num_heads=2'),
    (dict(num_kv_heads=0), 'num_kv_heads.*0'),
    (dict(in_kv_features=0), 'in_kv_features.*0'),
    (dict(projection='conv'), "projection.*'conv'"),
    (dict(score='cos'), "score.*'cos'"),
    (dict(identity='diag'), "identity.*'diag'"),
    (dict(identity_weight=-1.0), 'identity_weight.*-1.0'),
    (dict(dropout_rate=1.0), 'dropout_rate.*1.0'),
    (dict(score_scale=0.0), 'score_scale.*0.0'),
    (dict(projection_norm='batch'), "projection_norm.*'batch'"),
    (dict(grad='exact'), 'exact'),
    (dict(implementation='cuda'), 'cuda'),
    (dict(rngs=0), 'rngs'),
])
def test_attention_bad_arguments(kwargs, match):
  args = dict(num_heads=HEADS, in_features=F, rngs=nnx.Rngs(0))
  args.update(kwargs)
  with pytest.raises((TypeError, ValueError), match=match):
    annx.AdderMultiHeadAttention(**args)


def test_attention_bad_inputs():
  model = annx.AdderMultiHeadAttention(HEADS, F, QKV, rngs=nnx.Rngs(0))
  call = lambda *a, **k: jax.eval_shape(lambda: model(*a, **k))  # no compile
  x = jnp.ones((B, L, F))
  with pytest.raises(ValueError, match=r'inputs_q.*in_features=6.*\(2, 4, 5\)'):
    call(jnp.ones((B, L, 5)))
  with pytest.raises(ValueError, match=r'inputs_k.*\(2, 3, 5\)'):
    call(x, jnp.ones((B, 3, 5)))
  with pytest.raises(ValueError, match=r'inputs_k.*in_kv_features=6'):
    call(x, jnp.ones((B, 3, 5)))
  with pytest.raises(ValueError, match='inputs_v given without inputs_k'):
    call(x, inputs_v=x)
  with pytest.raises(ValueError, match='self-attention'):   # the identity
    call(x, jnp.ones((B, 3, F)))
