"""The ViT experiment (issue 31): config tokens and a few training steps of
each variant through the same experiment layer as every other model."""

import jax
import numpy as np
import pytest

from adderjax import create_model
from adderjax import linen as adder_linen
from adderjax import quant
from experiments import errors
from experiments import experiment
from experiments import testing
from experiments import train
from experiments.configs import vit_mnist


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(str(tmp_path_factory.mktemp('mnist')))


@pytest.mark.parametrize('arg,kind,attention,identity', [
    ('', 'adder', 'auto', 'output'),
    ('cnn', 'cnn', 'auto', 'output'),
    ('adder,dot', 'adder', 'dot', 'output'),
    ('adder,noid', 'adder', 'auto', 'none'),
    ('idlogits', 'adder', 'auto', 'logits'),
])
def test_tokens_set_the_variant(arg, kind, attention, identity):
  c = vit_mnist.get_config(arg)
  experiment.validate_config(c)
  assert c.model.name == 'vit_tiny' and c.model.kind == kind
  assert c.model.overrides.attention == attention
  assert c.model.overrides.identity == identity
  model = experiment.Experiment.from_config(c, data=False).model
  assert model.scores() == {('cnn', 'auto'): 'dot'}.get(
      (kind, attention), 'dot' if attention == 'dot' else 'l1')
  # The paper's LeNet-5 recipe, unchanged.
  assert (c.optimizer.learning_rate, c.batch_size, c.num_epochs) == (0.1, 256,
                                                                     3)
  assert vit_mnist.get_config(arg + ',full').num_epochs == 50


def test_unknown_token_is_named():
  with pytest.raises(ValueError, match="'l2'"):
    vit_mnist.get_config('adder,l2')


def test_bnn_kind_is_refused_by_name(mnist_dir):
  c = vit_mnist.get_config('bnn,runlocal')
  c.dataset.data_dir = mnist_dir
  with pytest.raises(errors.ConfigError, match='bnn'):
    experiment.Experiment.from_config(c, data=False).model.init(
        jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))


def test_adaptive_lr_reaches_every_adder_kernel_of_the_vit():
  c = vit_mnist.get_config('adder,runlocal')
  exp = experiment.Experiment.from_config(c, data=False)
  mask = jax.tree_util.tree_flatten_with_path(exp.adder_mask())[0]
  selected = sorted(jax.tree_util.keystr(p) for p, m in mask if m)
  blocks = c.model.overrides.depth
  # q, k, v, out and both MLP layers of every block; not the stem, the
  # classifier, LayerNorm, BatchNorm or the position embedding.
  assert len(selected) == 6 * blocks
  for name in ('query', 'key', 'value', 'out', 'mlp1', 'mlp2'):
    assert sum(f"'{name}'" in s for s in selected) == blocks, name
  assert all(s.endswith("['kernel']") for s in selected)


@pytest.mark.parametrize('arg', ['cnn', 'adder', 'adder,dot', 'adder,noid'])
def test_each_variant_trains_and_evaluates(arg, mnist_dir, tmp_path):
  c = vit_mnist.get_config(arg + ',runlocal')
  c.num_epochs = 1
  c.steps_per_epoch = 2
  c.batch_size = 4
  c.eval_batch_size = 4
  c.progress_bar = False
  c.dataset.prefetch = 0
  c.dataset.max_eval_examples = 8
  c.dataset.data_dir = mnist_dir
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['steps'] == 2 and summary['eval']['count'] == 8
  assert np.isfinite(summary['eval']['loss'])
  # The trained model's attention maps are rows of a stochastic matrix.
  config = experiment.load_run_config(str(tmp_path / 'run'))
  exp, state, _ = train.restore_checkpoint(config, str(tmp_path / 'run'))
  maps = adder_linen.attention_maps(
      exp.model, {'params': state.params, 'batch_stats': state.batch_stats},
      np.zeros((2, 28, 28, 1), np.float32), train=False)
  assert len(maps) == c.model.overrides.depth
  for m in maps.values():
    np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('attention,named', [
    ('l1', 'block0/attn has l1 attention scores'),
    ('dot', 'block0/attn/query has an AdderDenseGeneral layer')])
def test_integer_inference_refuses_the_adder_vit_by_name(attention, named):
  """quant covers AdderConv / AdderDense only: an adder ViT is refused, not
  half-quantized with its attention left in float unannounced."""
  model = create_model('vit_tiny', kind='adder', num_classes=10, depth=1,
                       hidden=8, num_heads=2, mlp_dim=8, attention=attention)
  x = np.zeros((2, 28, 28, 1), np.float32)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=named):
    quant.calibrate(model, variables, [x], quant.QuantConfig(bits=8))
