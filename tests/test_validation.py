"""Bad arguments raise a named error where they are written (issue 14).

Each case was accepted silently (and run as something else) or failed late
(in the backward pass, inside XLA, with an unrelated message) before.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from adderjax import adder_conv
from adderjax import adder_dense
from adderjax import linen as adder_linen
from adderjax import nnx as adder_nnx
from adderjax import optim

X = jnp.ones((1, 5, 5, 2))
K = jnp.ones((3, 3, 2, 3))


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(strides=(1.7, 1.2)), TypeError, 'strides must hold ints, got (1.7, 1.2)'),
    (dict(strides=1.5), TypeError, 'strides must be an int'),
    (dict(strides='2'), TypeError, "got '2'"),
    (dict(kernel_dilation=(1, 2.0)), TypeError, 'kernel_dilation must hold ints'),
    (dict(padding=((1.5, 1), (1, 1))), TypeError, 'got (1.5, 1)'),
    (dict(padding=(('a', 'b'), (1, 1))), TypeError, "got ('a', 'b')"),
    (dict(padding=2.0), TypeError, 'padding must be a string, an int'),
    (dict(precision='garbage'), ValueError, "got 'garbage'"),
    (dict(grad='bogus'), ValueError, "got 'bogus'"),
])
def test_adder_conv_rejects_at_call(kwargs, error, message):
  with pytest.raises(error) as info:
    adder_conv(X, K, **kwargs)
  assert message in str(info.value)


def test_precision_names_and_pairs_are_accepted():
  for precision in (None, 'highest', jax.lax.Precision.HIGH,
                    ('highest', 'default')):
    assert adder_conv(X, K, precision=precision).shape == (1, 5, 5, 3)


def test_adder_dense_rejects_bad_precision_and_scalars():
  with pytest.raises(ValueError, match="got 'fast'"):
    adder_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), precision='fast')
  with pytest.raises(ValueError, match='at least one axis'):
    adder_dense(jnp.ones(()), jnp.ones((1, 4)))


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(features=4, kernel_size=(3, 3), strides=(1.5, 2.9)), TypeError,
     'got (1.5, 2.9)'),
    (dict(features=4, kernel_size='33'), TypeError, "got '33'"),
    (dict(features=4, kernel_size='3'), TypeError, "got '3'"),
    (dict(features=4, kernel_size=(3, 0)), ValueError, 'positive'),
    (dict(features=4, kernel_size=(3, 3), feature_group_count=0), ValueError,
     'feature_group_count must be a positive int, got 0'),
    (dict(features=-4, kernel_size=(3, 3)), ValueError,
     'features must be a positive int, got -4'),
    (dict(features=4, kernel_size=(3, 3), precision='garbage'), ValueError,
     "got 'garbage'"),
    (dict(features=4, kernel_size=(3, 3), grad='bogus'), ValueError,
     "got 'bogus'"),
    (dict(features=4, kernel_size=(3, 3), implementation='cuda'), ValueError,
     "got 'cuda'"),
    (dict(features=4, kernel_size=(3, 3), padding='WRAP'), ValueError,
     "got 'WRAP'"),
    (dict(features=4, kernel_size=(3, 3), padding=((1.0, 1), (1, 1))),
     TypeError, 'padding pairs must hold ints'),
])
def test_linen_conv_rejects_at_construction(kwargs, error, message):
  with pytest.raises(error) as info:
    adder_linen.AdderConv(**kwargs)
  assert message in str(info.value)


def test_linen_dense_rejects_bad_features_and_scalar_inputs():
  with pytest.raises(ValueError, match='features must be a positive int'):
    adder_linen.AdderDense(0)
  layer = adder_linen.AdderDense(3)
  with pytest.raises(ValueError, match='scalar'):
    layer.init(jax.random.key(0), jnp.ones(()))


@pytest.mark.parametrize('kwargs,message', [
    (dict(grad='bogus'), "got 'bogus'"),
    (dict(precision='garbage'), "got 'garbage'"),
    (dict(feature_group_count=0), 'feature_group_count'),
    (dict(strides=(1.5, 1)), 'strides'),
])
def test_nnx_conv_rejects_at_construction(kwargs, message):
  with pytest.raises((TypeError, ValueError), match=message):
    adder_nnx.AdderConv(2, 4, (3, 3), rngs=nnx.Rngs(0), **kwargs)


def test_nnx_bad_features():
  with pytest.raises(ValueError, match='out_features must be a positive int'):
    adder_nnx.AdderConv(2, -1, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='in_features must be a positive int'):
    adder_nnx.AdderDense(0, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="got 'bogus'"):
    adder_nnx.AdderDense(2, 3, grad='bogus', rngs=nnx.Rngs(0))


def test_optimizer_rejects_momentum_of_one_or_more():
  for momentum in (1.0, 1.5):
    with pytest.raises(ValueError, match=f'momentum must be in .* got '
                       f'{momentum}'):
      optim.addernet_sgd(0.1, mask={'k': True}, momentum=momentum)


def test_optimizer_rejects_negative_or_nan_schedules():
  with pytest.raises(ValueError, match='at step 0'):
    optim.addernet_sgd(lambda count: -0.1 + 0 * count, mask={'k': True})
  # Negative only later in training: found at one of the checked steps.
  with pytest.raises(ValueError, match='at step 1000'):
    optim.addernet_sgd(optax.linear_schedule(0.1, -0.1, 1000),
                       mask={'k': True})
  with pytest.raises(ValueError, match='nan'):
    optim.addernet_sgd(lambda count: jnp.nan * count, mask={'k': True})
  optim.addernet_sgd(optim.cosine_lr_schedule(0.1, 10, 5), mask={'k': True})


def test_optimizer_warns_when_the_mask_selects_nothing():
  params = {'k': jnp.ones(3), 'b': jnp.ones(2)}
  tx = optim.addernet_sgd(0.1, mask={'k': False, 'b': False})
  with pytest.warns(UserWarning, match='selects no parameter'):
    tx.init(params)
  tx = optim.addernet_sgd(0.1, mask=lambda p: {'k': True, 'b': False})
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    tx.init(params)
  # Plain SGD asked for by name: nothing to warn about.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    optim.addernet_sgd(0.1, scaling='none').init(params)
