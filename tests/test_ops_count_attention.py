"""count_ops on attention and the zoo ViT, against hand formulas.

Every expected number below is written out from the shapes (heads ``H``,
head size ``D``, ``Lq`` queries, ``Lk`` keys, ``E`` features), following the
convention of the module docstring of adderjax.ops_count, not computed by
the library.
"""

import flax.linen as nn
import jax.numpy as jnp
import pytest

from adderjax import ops_count
from adderjax.linen import AdderDenseGeneral
from adderjax.linen import AdderMultiHeadAttention
from adderjax.models import create_model
from adderjax.ops_count import count_ops
from adderjax.ops_count import OpCounts

ADD_PJ, MUL_PJ = 0.9, 3.7  # fp32 45 nm (Horowitz 2014)


def attention_rows(report):
  return {l.path.rsplit(':', 1)[-1]: l for l in report.layers
          if l.role == 'attention'}


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize('cls,kind', [(nn.DenseGeneral, 'fp'),
                                      (AdderDenseGeneral, 'adder')])
def test_dense_general_layers(cls, kind):
  # (5, 6, 2) -> contract (6, 2) -> features (3, 4): 5*3*4 = 60 outputs of
  # 6*2 = 12 taps each, a bias of 12 (one add per output).
  report = count_ops(cls(features=(3, 4), axis=(-2, -1)), (5, 6, 2))
  (layer,) = report.layers
  assert (layer.kind, layer.role, layer.macs) == (kind, 'layer', 720)
  assert layer.output_shape == (1, 5, 3, 4)
  assert layer.params == report.params == 6 * 2 * 3 * 4 + 3 * 4
  want = (OpCounts(720, 720 + 60, 0) if kind == 'fp'
          else OpCounts(0, 2 * 720 + 60, 0))
  assert layer.ops == want
  # One contracted axis, no bias: 7 outputs x 8 taps per position, 3
  # positions.
  plain = count_ops(cls(features=7, use_bias=False), (3, 8))
  assert plain.macs == 3 * 7 * 8
  assert plain.layers[0].params == 8 * 7


# ---------------------------------------------------- one attention layer

L, E, H, F, OUT = 5, 6, 2, 8, 7   # tokens, in features, heads, qkv, out
D = F // H


def hand_projections(projection, bias, lk=L):
  """(Mul, Add) of q, k, v (E -> H x D) and out (H x D -> OUT)."""
  macs = L * F * E + 2 * lk * F * E + L * OUT * F
  bias_adds = (L * F + 2 * lk * F + L * OUT) if bias else 0
  if projection == 'adder':
    return 0, 2 * macs + bias_adds
  return macs, macs + bias_adds


def hand_core(score, identity, lk=L, scale_on='logits'):
  """(Mul, Add) of the attention core."""
  taps = H * L * lk * D
  mul, add = 0, 0
  if score == 'l1':
    add += 2 * taps            # subtraction + accumulation
  else:
    mul, add = mul + taps, add + taps
  mul += H * L * lk if scale_on == 'logits' else H * L * D   # the scale
  mul, add = mul + taps, add + taps                          # A x V
  if identity == 'output':
    mul, add = mul + 2 * H * L * D, add + H * L * D
  elif identity == 'logits':
    add += H * L
  return mul, add


@pytest.mark.parametrize('projection', ['adder', 'dense'])
@pytest.mark.parametrize('score', ['l1', 'dot'])
@pytest.mark.parametrize('identity', ['output', 'logits', None])
@pytest.mark.parametrize('bias', [True, False])
def test_adder_attention_layer(projection, score, identity, bias):
  model = AdderMultiHeadAttention(
      num_heads=H, qkv_features=F, out_features=OUT, use_bias=bias,
      projection=projection, score=score, identity=identity)
  report = count_ops(model, (L, E))
  paths = [l.path for l in report.layers]
  want_paths = ['query', 'key', 'value', 'scores', 'scale']
  want_paths += ['identity'] if identity == 'logits' else []
  want_paths += ['av'] + (['identity'] if identity == 'output' else [])
  assert paths == want_paths + ['out']
  layer_kind = 'adder' if projection == 'adder' else 'fp'
  assert [l.kind for l in report.layers if l.role == 'layer'] == [
      layer_kind] * 4
  rows = attention_rows(report)
  assert rows['scores'].kind == ('adder' if score == 'l1' else 'fp')
  assert rows['scores'].macs == rows['av'].macs == H * L * L * D == 200
  assert rows['scores'].output_shape == (1, H, L, L)
  assert rows['av'].output_shape == (1, L, H, D)
  assert all(r.params == 0 and r.kernel_shape == () for r in rows.values())
  pm, pa = hand_projections(projection, bias)
  cm, ca = hand_core(score, identity)
  assert report.total == OpCounts(pm + cm, pa + ca, 0)
  assert report.layer_macs == L * F * E * 3 + L * OUT * F
  assert report.macs == report.layer_macs + 2 * H * L * L * D
  assert report.softmax_logits == H * L * L
  assert report.model_kind == ('adder' if projection == 'adder' else 'cnn')
  # The paper convention re-attributes the layers only (no bias adds); the
  # core is as counted.
  m = report.layer_macs
  layers = OpCounts(0, 2 * m, 0) if projection == 'adder' else OpCounts(m, m, 0)
  assert report.paper_total == layers + OpCounts(cm, ca, 0)
  assert report.energy_pj() == pytest.approx(
      (pm + cm) * MUL_PJ + (pa + ca) * ADD_PJ)
  # Parameters: the projections' kernels (and biases) only.
  assert report.params == (3 * (E * F + (F if bias else 0))
                           + F * OUT + (OUT if bias else 0))


def test_cross_attention_keys_from_another_input():
  lk = 3
  model = AdderMultiHeadAttention(num_heads=H, qkv_features=F,
                                  out_features=OUT, use_bias=False,
                                  identity=None)
  report = count_ops(model, (L, E), inputs_k=jnp.ones((1, lk, E)))
  rows = attention_rows(report)
  assert rows['scores'].output_shape == (1, H, L, lk)
  assert rows['scores'].macs == H * L * lk * D
  pm, pa = hand_projections('adder', False, lk=lk)
  cm, ca = hand_core('l1', None, lk=lk)
  assert report.total == OpCounts(pm + cm, pa + ca, 0)


@pytest.mark.filterwarnings('ignore:SelfAttention will be deprecated')
def test_flax_attention_and_dense_dot_attention():
  flax_mha = nn.MultiHeadDotProductAttention(
      num_heads=H, qkv_features=F, out_features=OUT)
  ours = AdderMultiHeadAttention(
      num_heads=H, qkv_features=F, out_features=OUT, projection='dense',
      score='dot', identity=None)
  a, b = count_ops(flax_mha, (L, E)), count_ops(ours, (L, E))
  pm, pa = hand_projections('dense', True)
  # flax divides the queries by sqrt(D): H*L*D multiplications; ours scales
  # the H*L*L logits. Everything else is the same.
  cm, ca = hand_core('dot', None, scale_on='queries')
  assert a.total == OpCounts(pm + cm, pa + ca, 0)
  cm, ca = hand_core('dot', None)
  assert b.total == OpCounts(pm + cm, pa + ca, 0)
  assert [l.path for l in a.layers] == ['query', 'key', 'value', 'scale',
                                        'scores', 'av', 'out']
  assert attention_rows(a)['scale'].ops.mul == H * L * D == 40
  assert attention_rows(b)['scale'].ops.mul == H * L * L == 50
  assert a.params == b.params
  assert a.model_kind == b.model_kind == 'cnn'
  assert a.paper_total == OpCounts(a.total.mul, a.layer_macs + ca, 0)
  # nn.SelfAttention calls its parent's __call__: the core counted once.
  self_attn = count_ops(nn.SelfAttention(num_heads=H, qkv_features=F,
                                         out_features=OUT), (L, E))
  assert self_attn.total == a.total


def test_flax_attention_with_custom_attention_fn_is_reported_uncounted():
  def fn(query, key, value, **kwargs):
    return nn.dot_product_attention(query, key, value)

  report = count_ops(nn.MultiHeadDotProductAttention(
      num_heads=H, qkv_features=F, attention_fn=fn), (L, E))
  assert all(l.role == 'layer' for l in report.layers)
  assert len(report.layers) == 4
  assert report.uncounted == (
      ' (MultiHeadDotProductAttention core: a custom attention_fn)',)


def test_attention_inside_a_model_and_table():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      y = AdderMultiHeadAttention(num_heads=H, qkv_features=F,
                                  use_bias=False, name='attn')(x)
      return nn.Dense(3, name='head')(y.mean(-2))

  report = count_ops(Net(), (L, E))
  assert [l.path for l in report.layers] == [
      'attn/query', 'attn/key', 'attn/value', 'attn:scores', 'attn:scale',
      'attn:av', 'attn:identity', 'attn/out', 'head']
  text = str(report)
  for word in ('attn:scores', 'attn:av', '5 counted layers and 1 attention '
               'cores', f'softmax of {H * L * L:,} logits'):
    assert word in text, word
  assert 'not counted (other layer types)' not in text


# ------------------------------------------------------------- the ViT

T, HID, HEADS, MLP, DEPTH, CLASSES = 16, 64, 4, 128, 4, 10   # vit_tiny
HD = HID // HEADS


def hand_vit(kind, attention, identity):
  """(Mul, Add) of vit_tiny on 28x28x1 (patch 7: 16 tokens), written out."""
  stem = T * HID * 7 * 7                # 7x7x1 conv to 64, 16 positions
  stem_bias, fc, fc_bias = T * HID, HID * CLASSES, CLASSES
  proj = 4 * T * HID * HID              # q, k, v, out; no bias
  mlp = 2 * T * MLP * HID               # no bias (BatchNorm follows)
  taps = HEADS * T * T * HD
  mul = stem + fc
  add = stem + stem_bias + fc + fc_bias
  if kind == 'cnn':
    mul, add = mul + DEPTH * (proj + mlp), add + DEPTH * (proj + mlp)
  else:
    add += DEPTH * 2 * (proj + mlp)
  if attention == 'l1':
    add += DEPTH * 2 * taps
  else:
    mul, add = mul + DEPTH * taps, add + DEPTH * taps
  mul += DEPTH * HEADS * T * T          # scale
  mul, add = mul + DEPTH * taps, add + DEPTH * taps   # A x V
  if identity == 'output':
    mul, add = mul + DEPTH * 2 * T * HID, add + DEPTH * T * HID
  elif identity == 'logits':
    add += DEPTH * HEADS * T
  return mul, add


VIT_CASES = [  # kind, attention, identity (None: not used)
    ('cnn', 'dot', None),
    ('adder', 'dot', None),
    ('adder', 'l1', 'output'),
    ('adder', 'l1', 'logits'),
    ('adder', 'l1', 'none'),
]


def vit(kind, attention, identity):
  kwargs = {'attention': attention}
  if identity is not None:
    kwargs['identity'] = identity
  return count_ops(create_model('vit_tiny', kind=kind, num_classes=CLASSES,
                                **kwargs), (28, 28, 1))


@pytest.mark.parametrize('kind,attention,identity', VIT_CASES)
def test_vit_tiny_against_hand_formulas(kind, attention, identity):
  report = vit(kind, attention, identity)
  mul, add = hand_vit(kind, attention, identity)
  assert report.total == OpCounts(mul, add, 0)
  assert report.energy_pj() == pytest.approx(mul * MUL_PJ + add * ADD_PJ)
  assert report.model_kind == kind
  assert report.layer_macs == (T * HID * 49 + HID * CLASSES
                               + DEPTH * (4 * T * HID * HID
                                          + 2 * T * MLP * HID))
  # Every projection is a layer now: nothing is left uncounted.
  assert report.uncounted == ()
  assert report.softmax_logits == DEPTH * HEADS * T * T
  names = {l.path.rsplit(':', 1)[-1] for l in report.layers
           if l.role == 'attention'}
  assert names == ({'scores', 'scale', 'av'}
                   | ({'identity'} if identity in ('output', 'logits')
                      else set()))


def test_adder_vit_multiplies_only_in_stem_classifier_av_and_scale():
  report = vit('adder', 'l1', 'none')
  body = [l for l in report.layers
          if l.role == 'layer' and l.path not in ('patch_embed', 'fc')]
  assert len(body) == DEPTH * 6       # q, k, v, out, mlp1, mlp2
  assert all(l.kind == 'adder' and l.ops.mul == 0 for l in body)
  scores = [l for l in report.layers if l.path.endswith(':scores')]
  assert len(scores) == DEPTH and all(l.ops.mul == 0 for l in scores)
  taps = HEADS * T * T * HD
  stem, fc = T * HID * 49, HID * CLASSES
  assert report.total.mul == stem + fc + DEPTH * (taps + HEADS * T * T)
  mul_rows = {l.path.split(':')[-1] if ':' in l.path else l.path
              for l in report.layers if l.ops.mul}
  assert mul_rows == {'patch_embed', 'fc', 'scale', 'av'}
  # The CNN kind multiplies everywhere.
  cnn = vit('cnn', 'dot', None)
  assert all(l.ops.mul == l.macs for l in cnn.layers if l.macs)


def test_vit_paper_convention_and_table():
  cnn, adder = vit('cnn', 'dot', None), vit('adder', 'l1', 'output')
  m = cnn.layer_macs
  assert adder.layer_macs == m
  # CNN: the paper total is the per-layer total without bias adds.
  assert cnn.paper_total == OpCounts(cnn.total.mul,
                                     cnn.total.add - T * HID - CLASSES, 0)
  taps = HEADS * T * T * HD
  core_mul = DEPTH * (HEADS * T * T + taps + 2 * T * HID)
  core_add = DEPTH * (2 * taps + taps + T * HID)
  assert adder.paper_total == OpCounts(core_mul, 2 * m + core_add, 0)
  assert adder.energy_pj(paper_convention=True) == pytest.approx(
      core_mul * MUL_PJ + (2 * m + core_add) * ADD_PJ)
  text = str(adder)
  assert 'paper convention (adder)' in text
  assert '26 counted layers and 4 attention cores' in text
  assert 'block0/attn:scores' in text and 'block3/attn/out' in text


def test_vit_energy_table():
  """Per image, fp32 45 nm; the three ViTs of the report, by hand."""
  rows = []
  for kind, attention, identity in VIT_CASES[:3]:
    report = vit(kind, attention, identity)
    mul, add = hand_vit(kind, attention, identity)
    energy = mul * MUL_PJ + add * ADD_PJ
    assert report.energy_pj() == pytest.approx(energy)
    rows.append((kind, attention, mul, add, energy))
  # cnn: 2,283,136 Mul, 2,280,074 Add -> 10,499,669.8 pJ;
  # adder-dot: 185,984 Mul, 4,377,226 Add -> 4,627,644.2 pJ;
  # adder-l1 (identity 'output'): 128,640 Mul, 4,446,858 Add
  # -> 4,478,140.2 pJ.
  assert [r[2:4] for r in rows] == [(2_283_136, 2_280_074),
                                    (185_984, 4_377_226),
                                    (128_640, 4_446_858)]
  assert rows[0][4] == pytest.approx(2_283_136 * 3.7 + 2_280_074 * 0.9)
  assert rows[2][4] == pytest.approx(128_640 * 3.7 + 4_446_858 * 0.9)
  ratio = rows[0][4] / rows[2][4]
  assert ratio == pytest.approx(10_499_669.8 / 4_478_140.2)
  for kind, attention, mul, add, energy in rows:
    print(f'vit_tiny {kind:5s} {attention}: #Mul {mul:,} #Add {add:,} '
          f'{energy:,.1f} pJ ({rows[0][4] / energy:.2f}x less than cnn)')


def test_energy_models_price_attention_rows():
  report = vit('adder', 'l1', 'output')
  rows = attention_rows(report)
  assert rows['av'].ops.energy_pj(ops_count.FP32_45NM) == pytest.approx(
      HEADS * T * T * HD * (MUL_PJ + ADD_PJ))
  assert rows['scores'].ops.energy_pj(ops_count.INT8_45NM) == pytest.approx(
      2 * HEADS * T * T * HD * 0.03)
  total = sum(l.ops.energy_pj() for l in report.layers)
  assert report.energy_pj() == pytest.approx(total)
