"""adder_mask warns where a known-bad BatchNorm is built with adder layers
(issue 28: flax's default momentum 0.99 wrecks evaluation, its one-pass
variance cancels on adder outputs)."""

import warnings

import flax.linen as nn
import jax.numpy as jnp
import pytest
from flax import nnx

from adderjax import create_model
from adderjax import optim
from adderjax.linen import AdderConv
from adderjax.nnx import AdderConv as NnxAdderConv


class _Net(nn.Module):
  momentum: float = 0.99
  fast: bool = True
  adder: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    conv = AdderConv if self.adder else nn.Conv
    x = conv(4, (3, 3), name='body')(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        use_fast_variance=self.fast, name='bn')(x)


def _messages(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fn()
  return [str(w.message) for w in caught if 'adder_mask' in str(w.message)]


X = jnp.zeros((1, 8, 8, 1))


def test_flax_defaults_after_an_adder_layer_warn_naming_both():
  (msg,) = _messages(lambda: optim.adder_mask(_Net(), X))
  assert "BatchNorm momentum above 0.95 at ['bn']" in msg
  assert "use_fast_variance=True at ['bn']" in msg
  assert 'momentum=0.9' in msg and 'use_fast_variance=False' in msg


@pytest.mark.parametrize('momentum,fast,want', [
    (0.99, False, 'momentum above'), (0.9, True, 'use_fast_variance=True')])
def test_each_setting_alone(momentum, fast, want):
  (msg,) = _messages(lambda: optim.adder_mask(_Net(momentum, fast), X))
  assert want in msg


def test_good_settings_and_models_without_adder_layers_are_quiet():
  assert not _messages(lambda: optim.adder_mask(_Net(0.9, False), X))
  assert not _messages(lambda: optim.adder_mask(_Net(adder=False), X))
  for name in ('lenet5_bn', 'vit_tiny'):
    model = create_model(name, kind='adder', num_classes=10)
    assert not _messages(lambda: optim.adder_mask(
        model, jnp.zeros((1, 28, 28, 1)), train=False))


def test_nnx_model_warns_too():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body = NnxAdderConv(1, 4, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)   # flax defaults

  model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  (msg,) = _messages(lambda: optim.adder_mask(model))
  assert "at ['bn']" in msg and 'momentum above' in msg
  model.bn.momentum = 0.9
  model.bn.use_fast_variance = False
  assert not _messages(lambda: optim.adder_mask(model))
