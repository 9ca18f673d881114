"""count_ops / count_params against hand derivations, layer by layer.

The expected layer lists below are written from the topologies of the paper's
official code (PyTorch output-size formula ``(n + 2p - k) // s + 1``), not from
the model code, and compared with what count_ops finds by tracing the models.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from adderjax import ops_count
from adderjax.linen import AdderConv
from adderjax.models import create_model
from adderjax.models import INPUT_SHAPES
from adderjax.ops_count import count_ops
from adderjax.ops_count import count_params

KIND_OF_LAYER = {'cnn': 'fp', 'adder': 'adder', 'bnn': 'binary'}


def out_size(n, k, s=1, p=0):
  return (n + 2 * p - k) // s + 1


class Hand:
  """Accumulates (path, is_body, macs, params, has_bias) rows by hand."""

  def __init__(self):
    self.rows = []
    self.bn_params = 0

  def conv(self, path, h, w, cin, cout, k, s=1, p=0, body=True):
    ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
    self.rows.append((path, body, ho * wo * cout * k * k * cin,
                      k * k * cin * cout, False))
    return ho, wo

  def dense(self, path, cin, cout, body=True, bias=False):
    self.rows.append((path, body, cin * cout,
                      cin * cout + (cout if bias else 0), bias))

  def bn(self, channels):
    self.bn_params += 2 * channels

  @property
  def macs(self):
    return sum(r[2] for r in self.rows)

  @property
  def params(self):
    return sum(r[3] for r in self.rows) + self.bn_params


def hand_lenet(num_classes=10):
  h = Hand()
  s = h.conv('conv1', 28, 28, 1, 6, 5, p=2, body=False)[0]
  h.bn(6)
  s = s // 2
  s = h.conv('conv2', s, s, 6, 16, 5)[0]
  h.bn(16)
  s = s // 2
  h.dense('fc1', s * s * 16, 120)
  h.bn(120)
  h.dense('fc2', 120, 84)
  h.bn(84)
  h.dense('fc3', 84, num_classes, body=False, bias=True)
  return h


def hand_vgg_small(num_classes=10, size=32):
  h = Hand()
  h.conv('conv1', size, size, 3, 128, 3, p=1, body=False)
  h.bn(128)
  cin, index = 128, 2
  for width, n in ((128, 1), (256, 2), (512, 2)):
    for _ in range(n):
      h.conv(f'conv{index}', size, size, cin, width, 3, p=1)
      h.bn(width)
      cin, index = width, index + 1
    size //= 2
  h.dense('fc', size * size * 512, num_classes, body=False, bias=True)
  return h


def hand_resnet(stages, bottleneck, width, stem, num_classes,
                stride_in_1x1=False, size=None):
  """The official resnet20.py / resnet50.py structure (BasicBlock or
  Bottleneck, 1x1 projection shortcut + BN when the shape changes, 1x1
  classifier + BN on the logits)."""
  h = Hand()
  if stem == 'cifar':
    size = size or 32
    size = h.conv('conv1', size, size, 3, width, 3, p=1, body=False)[0]
  else:
    size = size or 224
    size = h.conv('conv1', size, size, 3, width, 7, s=2, p=3, body=False)[0]
    size = out_size(size, 3, 2, 1)  # max pool
  h.bn(width)
  inplanes = width
  expansion = 4 if bottleneck else 1
  for i, n in enumerate(stages):
    planes = width * 2**i
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      name = f'layer{i + 1}_{j}'
      if bottleneck:
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        o = h.conv(f'{name}/conv1', size, size, inplanes, planes, 1, s=s1)[0]
        h.bn(planes)
        o = h.conv(f'{name}/conv2', o, o, planes, planes, 3, s=s3, p=1)[0]
        h.bn(planes)
        o = h.conv(f'{name}/conv3', o, o, planes, planes * 4, 1)[0]
        h.bn(planes * 4)
      else:
        o = h.conv(f'{name}/conv1', size, size, inplanes, planes, 3, s=stride,
                   p=1)[0]
        h.bn(planes)
        o = h.conv(f'{name}/conv2', o, o, planes, planes, 3, p=1)[0]
        h.bn(planes)
      if stride != 1 or inplanes != planes * expansion:
        h.conv(f'{name}/downsample_conv', size, size, inplanes,
               planes * expansion, 1, s=stride)
        h.bn(planes * expansion)
      inplanes, size = planes * expansion, o
  h.dense('fc', inplanes, num_classes, body=False)
  h.bn(num_classes)
  return h


HAND = {
    'lenet5_bn': lambda c: hand_lenet(c),
    'vgg_small': lambda c: hand_vgg_small(c),
    'resnet20': lambda c: hand_resnet((3, 3, 3), False, 16, 'cifar', c),
    'resnet32': lambda c: hand_resnet((5, 5, 5), False, 16, 'cifar', c),
    'resnet18': lambda c: hand_resnet((2, 2, 2, 2), False, 64, 'imagenet', c),
    'resnet50': lambda c: hand_resnet((3, 4, 6, 3), True, 64, 'imagenet', c),
}
CLASSES = {'lenet5_bn': 10, 'vgg_small': 10, 'resnet20': 10, 'resnet32': 100,
           'resnet18': 1000, 'resnet50': 1000}


def expected_ops(kind, macs, outputs_bias):
  if kind == 'fp':
    return ops_count.OpCounts(macs, macs + outputs_bias, 0)
  if kind == 'adder':
    return ops_count.OpCounts(0, 2 * macs + outputs_bias, 0)
  return ops_count.OpCounts(0, macs + outputs_bias, macs)


@pytest.mark.parametrize('kind', ['cnn', 'adder', 'bnn'])
@pytest.mark.parametrize('name', list(HAND))
def test_layers_macs_kinds_and_params_match_hand_derivation(name, kind):
  classes = CLASSES[name]
  hand = HAND[name](classes)
  report = count_ops(create_model(name, kind=kind, num_classes=classes),
                     INPUT_SHAPES[name])
  got = [(l.path, l.kind, l.macs, l.params) for l in report.layers]
  want = [(path, KIND_OF_LAYER[kind] if body else 'fp', macs, params)
          for path, body, macs, params, _ in hand.rows]
  assert got == want
  for layer, row in zip(report.layers, hand.rows):
    bias_adds = math.prod(layer.output_shape) if row[4] else 0
    assert layer.ops == expected_ops(layer.kind, row[2], bias_adds)
  assert report.macs == hand.macs
  assert report.params == hand.params
  assert report.model_kind == kind


# The per-image numbers, derived by hand above, set beside the paper.
def test_totals_against_paper_tables():
  # LeNet-5-BN: 117,600 + 240,000 + 48,000 + 10,080 + 840 (paper: ~435K).
  assert hand_lenet().macs == 416_520
  # VGG-small: 3.54M + 3 x 151.0M + 2 x 75.5M + 81,920 = 0.61G (paper 0.65G).
  assert hand_vgg_small().macs == 607_600_640
  # ResNet-32: exactly the paper's 69.12M (CNN), 138.24M (AddNN).
  r32 = hand_resnet((5, 5, 5), False, 16, 'cifar', 10).macs
  assert r32 == 69_124_736 and round(r32 / 1e6, 2) == 69.12
  assert abs(2 * r32 / 1e6 - 138.24) < 0.01
  # ResNet-20 by the same convention: 40.81M (paper 41.17M). The paper's two
  # CIFAR ResNets differ by 27.95M, but ResNet-32 has exactly 12 more 3x3
  # layers of 2,359,296 MACs each (16->16 at 32x32, 32->32 at 16x16, 64->64
  # at 8x8): no per-layer convention reproduces both of the paper's numbers.
  r20 = hand_resnet((3, 3, 3), False, 16, 'cifar', 10).macs
  assert r20 == 40_813_184
  assert r32 - r20 == 12 * (3 * 3 * 16 * 16 * 32 * 32) == 28_311_552
  # ImageNet: ResNet-18 1.8G (paper 1.8G, AddNN 3.6G).
  r18 = hand_resnet((2, 2, 2, 2), False, 64, 'imagenet', 1000).macs
  assert r18 == 1_814_073_344
  assert round(r18 / 1e9, 1) == 1.8 and round(2 * r18 / 1e9, 1) == 3.6
  # ResNet-50: official code (stride in the 3x3) 4.09G; original ResNet
  # (stride in the first 1x1) 3.86G = the paper's 3.9G (AddNN 7.7G).
  r50 = hand_resnet((3, 4, 6, 3), True, 64, 'imagenet', 1000).macs
  r50v1 = hand_resnet((3, 4, 6, 3), True, 64, 'imagenet', 1000,
                      stride_in_1x1=True).macs
  assert r50 == 4_089_184_256 and r50v1 == 3_857_973_248
  assert round(r50v1 / 1e9, 1) == 3.9 and round(2 * r50v1 / 1e9, 1) == 7.7


def test_resnet50_stride_in_1x1_variant_counts():
  report = count_ops(create_model('resnet50', kind='adder', num_classes=1000,
                                  stride_in_1x1=True), (224, 224, 3))
  assert report.macs == hand_resnet((3, 4, 6, 3), True, 64, 'imagenet', 1000,
                                    stride_in_1x1=True).macs


@pytest.mark.parametrize('kind,paper', [
    ('cnn', (607_600_640, 607_600_640, 0)),
    ('adder', (0, 2 * 607_600_640, 0)),
    ('bnn', (0, 607_600_640, 607_600_640)),
])
def test_paper_convention_vgg_small(kind, paper):
  report = count_ops(create_model('vgg_small', kind=kind, num_classes=10),
                     (32, 32, 3))
  assert report.paper_total == ops_count.OpCounts(*paper)
  # Layer by layer, the stem and classifier are full precision in every kind.
  stem_fc = 3 * 3 * 3 * 128 * 32 * 32 + 4 * 4 * 512 * 10
  if kind != 'cnn':
    assert report.total.mul == stem_fc


def test_parameter_counts_usual_values():
  def params(name, classes):
    model = create_model(name, kind='cnn', num_classes=classes)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1,) + INPUT_SHAPES[name], jnp.float32))
    return count_params(shapes)
  # torchvision ResNet-18/50 (11,689,512 / 25,557,032) have a biased fc; the
  # official head has no fc bias (-1000) and a BatchNorm on the logits (+2000).
  assert params('resnet18', 1000) == 11_689_512 - 1000 + 2000
  assert params('resnet50', 1000) == 25_557_032 - 1000 + 2000
  assert params('resnet20', 10) == HAND['resnet20'](10).params == 272_484
  assert params('resnet32', 10) == HAND['resnet32'](10).params == 466_916
  assert round(params('resnet20', 10) / 1e6, 2) == 0.27
  # 0.467M: the usual 0.46M is the option-A ResNet-32 (zero-padded identity
  # shortcuts, 464,154); the official projections + logit BN add 2,762.
  assert round(params('resnet32', 10) / 1e6, 2) == 0.47


def test_count_params_real_variables_and_plain_tree():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  assert count_params(variables) == 15
  assert count_params(variables['params']) == 15
  bn = nn.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), jnp.ones((2, 5)))
  assert count_params(v) == 10  # scale + bias; mean/var are not params


def test_energy_estimate():
  report = count_ops(create_model('resnet20', kind='cnn', num_classes=10),
                     (32, 32, 3))
  m = 40_813_184
  assert report.energy_pj() == pytest.approx(m * 3.7 + m * 0.9)
  assert report.energy_pj(ops_count.INT8_45NM) == pytest.approx(
      m * 0.2 + m * 0.03)
  adder = count_ops(create_model('resnet20', kind='adder', num_classes=10),
                    (32, 32, 3))
  fp = 3 * 3 * 3 * 16 * 32 * 32 + 64 * 10
  body = m - fp
  assert adder.energy_pj() == pytest.approx(fp * 4.6 + 2 * body * 0.9)
  assert adder.energy_pj(paper_convention=True) == pytest.approx(2 * m * 0.9)
  binary = count_ops(create_model('resnet20', kind='bnn', num_classes=10),
                     (32, 32, 3))
  with pytest.raises(ValueError, match='xnor_pj'):
    binary.energy_pj()
  priced = ops_count.EnergyModel('test', add_pj=1.0, mul_pj=2.0, xnor_pj=0.5)
  assert binary.energy_pj(priced) == pytest.approx(
      fp * 3.0 + body * 1.5)
  with pytest.raises(ValueError, match='add_pj'):
    ops_count.EnergyModel('bad', add_pj=-1.0, mul_pj=1.0)


def test_str_table():
  report = count_ops(create_model('lenet5_bn', kind='adder', num_classes=10),
                     (28, 28, 1))
  text = str(report)
  for path in ('conv1', 'conv2', 'fc1', 'fc2', 'fc3'):
    assert path in text
  assert '416,520' in text
  assert 'paper convention (adder)' in text
  assert 'fp32 45nm' in text and 'int8 45nm' in text
  binary = str(count_ops(create_model('lenet5_bn', kind='bnn',
                                      num_classes=10), (28, 28, 1)))
  assert 'XNOR unpriced' in binary


def test_generic_modules_and_uncounted_layers():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), strides=2, name='c')(x)
      x = nn.ConvTranspose(4, (3, 3), name='up')(x)
      x = AdderConv(2, (1, 1), use_bias=False, name='a')(x)
      return nn.Dense(3, name='d')(x.reshape(x.shape[0], -1))

  report = count_ops(Net(), (8, 8, 2))
  assert [l.path for l in report.layers] == ['c', 'a', 'd']
  assert report.layers[0].macs == 4 * 4 * 4 * (3 * 3 * 2)
  assert report.layers[0].ops.add == report.layers[0].macs + 4 * 4 * 4
  assert report.layers[1].macs == 4 * 4 * 2 * 4
  assert report.layers[2].macs == 32 * 3
  assert report.uncounted == ('up (ConvTranspose)',)
  assert report.model_kind == 'adder'
  assert 'not counted' in str(report)


@pytest.mark.parametrize('bad', [(), (0, 3), 'abc', None])
def test_bad_input_shape(bad):
  with pytest.raises(ValueError, match='input_shape'):
    count_ops(nn.Dense(3), bad)


# A batched shape where one example's shape is expected (issue 28 item 7):
# a named error, for the zoo models, a plain layer, and a model of one's own
# whose convolutions take the input.


@pytest.mark.parametrize('name', ['lenet5_bn', 'resnet20', 'vgg_small'])
def test_batched_shape_refused_for_zoo_models(name):
  model = create_model(name, kind='adder', num_classes=10)
  image = INPUT_SHAPES[name]
  for batched in ((1,) + image, (8,) + image):
    with pytest.raises(ValueError) as info:
      count_ops(model, batched)
    message = str(info.value)
    for word in ('`input_shape`', str(batched), '4 axes',
                 'without the batch axis'):
      assert word in message, (word, message)
  # The shape of one example is counted as before.
  assert count_ops(model, image).input_shape == image


def test_batched_shape_refused_for_layers_and_own_models():
  with pytest.raises(ValueError, match=r'\(4, 16, 16, 4\).*without the batch'):
    count_ops(AdderConv(8, (3, 3)), (4, 16, 16, 4))

  class Own(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(AdderConv(4, (3, 3))(x))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  with pytest.raises(ValueError, match='without the batch axis'):
    count_ops(Own(), (1, 28, 28, 1))
  one = count_ops(Own(), (28, 28, 1))
  assert one.layers[0].macs == 28 * 28 * 4 * 3 * 3 * 1


def test_model_must_be_a_linen_module_and_params_arrays():
  with pytest.raises(TypeError, match='`model`'):
    count_ops(lambda x: x, (28, 28, 1))
  with pytest.raises(TypeError, match="`variables`.*'abc'"):
    count_params({'params': {'w': 'abc'}})
  assert count_params({'w': jnp.ones((2, 3)), 'b': 1.0}) == 7
