"""Operation counts per image (#Mul, #Add, #XNOR) and an energy estimate.

:func:`~adderjax.count_ops` runs a Linen model abstractly (``jax.eval_shape``
of ``model.init``, nothing is allocated or computed) under the layer walker
of :mod:`adderjax.introspect` (``flax.linen.intercept_methods``) and records
every call of a counted layer with its input, output and kernel shapes.
Nothing is read from hand tables.

Counting convention (per image, batch of one):

* Counted layers: ``nn.Conv``, ``nn.Dense``, ``nn.DenseGeneral`` (full
  precision), :class:`adderjax.linen.AdderConv` / ``AdderDense`` /
  ``AdderDenseGeneral`` and :class:`adderjax.bnn.BinaryConv` /
  ``BinaryDense``, wherever they are in the model: the stem, the classifier,
  the 1x1 projection shortcuts and the projections of an attention included.
  A layer has ``MACs = output elements x taps per output``
  (``kh * kw * C_in / groups`` for a conv, ``C_in`` for a dense layer, the
  product of the contracted input axes for a ``DenseGeneral``).
* Full-precision layer: ``#Mul = MACs`` and ``#Add = MACs`` (one
  multiply-accumulate per tap).
* Adder layer: ``#Add = 2 x MACs`` (a subtraction and an accumulation per tap;
  the absolute value is a sign-bit operation, not counted), ``#Mul = 0``.
* Binary layer: ``#XNOR = MACs`` (the bit product; an AND for {0, 1}
  activations) and ``#Add = MACs`` (the popcount accumulation).
* A bias adds ``output elements`` to ``#Add``.
* Attention cores: a call of :class:`adderjax.linen.AdderMultiHeadAttention`
  or ``nn.MultiHeadDotProductAttention`` (its four projections are counted
  above, as layers) adds rows for the arithmetic between the projections,
  computed from the call's input shapes and the module's fields. With
  ``H`` heads of size ``D``, ``Lq`` queries and ``Lk`` keys (times the batch
  elements, one per image):

  - ``scores``: ``H Lq Lk D`` MACs; l1 scores (``score='l1'``, kind
    ``'adder'``) are a subtraction and an accumulation per tap, ``2 H Lq Lk
    D`` Add, as an adder layer (the sign is folded into the scale); dot
    scores (kind ``'fp'``) a multiply-accumulate per tap.
  - ``scale``: one Mul per scaled element: ``H Lq Lk`` (the logits, as
    :func:`adderjax.attention.attention_weights` does) or ``H Lq D`` (flax
    divides the queries by ``sqrt(D)``, a multiplication by the constant
    ``1 / sqrt(D)``).
  - ``identity`` (the rank fix of :mod:`adderjax.attention`):
    ``'output'``, ``(A v + lambda v) / (1 + lambda)``, is ``H Lq D`` x (2
    Mul + 1 Add): ``lambda v``, the sum, and the division as a
    multiplication by the constant ``1 / (1 + lambda)``; ``'logits'`` adds
    ``lambda`` to the diagonal logits, ``H Lq`` Add.
  - ``av`` (attention map times values): ``H Lq Lk D`` multiply-accumulates
    for both scores: the weighted average multiplies.

  Not counted: the softmax (the exponentials, max, sums and divisions of
  ``H Lq Lk`` logits: ``OpsReport.softmax_logits`` gives their number), masks
  and dropout, as activations are not.
* Not counted: BatchNorm (an affine map per channel; the binary layers'
  per-channel scale folds into it), LayerNorm, activations, pooling, residual
  additions, the binarisation of activations, and layers of other types
  (reported in ``OpsReport.uncounted``).

The paper's Tables 1-2 attribute the model's kind to all its layers: with
``M`` the total MACs of all counted layers, a CNN has ``M`` Mul + ``M`` Add, an
AdderNet ``2M`` Add and a BNN ``M`` XNOR + ``M`` Add, though the stem and
classifier are full precision in every kind. :attr:`OpsReport.paper_total`
gives that; :attr:`OpsReport.total` is the layer-by-layer (honest) count.
The kind is read from the weight layers only, and attributed to them only:
an attention core's rows (``LayerOps.role == 'attention'``) enter the paper
total as they are counted (its values product multiplies in every kind).

Energy: :meth:`OpsReport.energy_pj` prices the counts per operation with an
:class:`EnergyModel`; :data:`FP32_45NM` and :data:`INT8_45NM` hold the 45 nm
figures (Horowitz, ISSCC 2014) used by the AdderNet literature: fp32 add
0.9 pJ, fp32 mul 3.7 pJ, int8 add 0.03 pJ, int8 mul 0.2 pJ. Those tables
have no XNOR figure, so XNOR is unpriced unless an ``EnergyModel`` gives one.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adderjax import _checks
from adderjax import bnn
from adderjax import introspect
from adderjax import linen as adder_linen
from adderjax.models.common import ZooModel

#: Layer kinds of :class:`LayerOps`.
LAYER_KINDS = ('fp', 'adder', 'binary')
#: Roles of :class:`LayerOps` rows: a weight layer, or a part of an attention
#: core (the arithmetic between an attention's projections).
ROLES = ('layer', 'attention')
#: The parts of an attention core, each one row (module docstring).
ATTENTION_PARTS = ('scores', 'scale', 'identity', 'av')


@dataclasses.dataclass(frozen=True)
class EnergyModel:
  """Energy per operation in picojoules.

  Attributes:
    name: label for tables.
    add_pj: energy of one addition.
    mul_pj: energy of one multiplication.
    xnor_pj: energy of one XNOR (bit product), or ``None`` if unknown.
  """
  name: str
  add_pj: float
  mul_pj: float
  xnor_pj: float | None = None

  def __post_init__(self):
    for field in ('add_pj', 'mul_pj', 'xnor_pj'):
      value = getattr(self, field)
      if value is not None and not value >= 0:
        raise ValueError(f'{field} must be a non-negative energy in pJ, got '
                         f'{value!r}.')


#: 45 nm, 32-bit float (Horowitz 2014): add 0.9 pJ, mul 3.7 pJ.
FP32_45NM = EnergyModel('fp32 45nm', add_pj=0.9, mul_pj=3.7)
#: 45 nm, 8-bit integer (Horowitz 2014): add 0.03 pJ, mul 0.2 pJ.
INT8_45NM = EnergyModel('int8 45nm', add_pj=0.03, mul_pj=0.2)


@dataclasses.dataclass(frozen=True)
class OpCounts:
  """Operation counts per image.

  Attributes:
    mul: multiplications.
    add: additions (and subtractions).
    xnor: bit products (XNOR / AND).
  """
  mul: int
  add: int
  xnor: int

  def __add__(self, other: 'OpCounts') -> 'OpCounts':
    return OpCounts(self.mul + other.mul, self.add + other.add,
                    self.xnor + other.xnor)

  def energy_pj(self, energy: EnergyModel = FP32_45NM) -> float:
    """Energy in pJ: ``mul * mul_pj + add * add_pj + xnor * xnor_pj``.

    Raises:
      ValueError: XNOR operations to price and ``energy.xnor_pj`` is None.

    Examples:
      >>> OpCounts(mul=10, add=10, xnor=0).energy_pj(FP32_45NM)
      46.0
    """
    total = self.mul * energy.mul_pj + self.add * energy.add_pj
    if self.xnor:
      if energy.xnor_pj is None:
        raise ValueError(f'{self.xnor} XNOR operations to price, but '
                         f'EnergyModel {energy.name!r} has xnor_pj=None; pass '
                         'an EnergyModel with an XNOR energy.')
      total += self.xnor * energy.xnor_pj
    return float(total)


@dataclasses.dataclass(frozen=True)
class LayerOps:
  """One counted layer call, or one part of an attention core.

  Attributes:
    path: module path in the model, e.g. ``'layer2_0/conv1'``; an attention
      core's part is ``'<attention path>:<part>'`` (``'block0/attn:scores'``,
      a part of :data:`ATTENTION_PARTS`).
    layer: class name of the layer (of the attention module for its parts).
    kind: ``'fp'``, ``'adder'`` or ``'binary'``: the arithmetic (an l1
      scores row is ``'adder'``, the other attention parts ``'fp'``).
    input_shape: input shape (batch of one).
    output_shape: output shape.
    kernel_shape: kernel shape (``()`` for an attention part).
    macs: output elements x taps per output (``0`` for the elementwise
      attention parts, ``scale`` and ``identity``).
    ops: :class:`OpCounts` of this layer.
    params: parameters of this layer (kernel and bias; ``0`` for an
      attention part, whose projections are layers of their own).
    role: ``'layer'`` (a weight layer) or ``'attention'`` (a part of an
      attention core).
  """
  path: str
  layer: str
  kind: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  macs: int
  ops: OpCounts
  params: int
  role: str = 'layer'


def _is_scores(row: LayerOps) -> bool:
  """Whether ``row`` is the ``scores`` part of an attention core (one per
  attention call)."""
  return row.role == 'attention' and row.path.rsplit(':', 1)[-1] == 'scores'


def _human(n: float) -> str:
  """``1234567 -> '1.23M'``."""
  for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{suffix}'
  return f'{n:g}'


@dataclasses.dataclass(frozen=True)
class OpsReport:
  """Per-layer and total operation counts of a model, per image.

  Attributes:
    input_shape: shape of one example (no batch dim).
    layers: one :class:`LayerOps` per counted layer call, in call order.
    params: number of parameters of the model (the ``'params'`` collection).
    uncounted: ``'path (Class)'`` of layers with a ``kernel`` parameter that
      the convention does not count.
  """
  input_shape: tuple[int, ...]
  layers: tuple[LayerOps, ...]
  params: int
  uncounted: tuple[str, ...] = ()

  @property
  def macs(self) -> int:
    """Total multiply-accumulate positions of all counted rows (the layers'
    and the attention cores' scores and values products)."""
    return sum(layer.macs for layer in self.layers)

  @property
  def layer_macs(self) -> int:
    """Multiply-accumulate positions of the weight layers only (the ``M``
    of :attr:`paper_total`); :attr:`macs` for a model without attention."""
    return sum(l.macs for l in self.layers if l.role == 'layer')

  @property
  def softmax_logits(self) -> int:
    """Logits that go through an attention softmax (not counted): the
    output elements of the attention cores' ``scores`` rows."""
    return sum(_size(l.output_shape) for l in self.layers
               if _is_scores(l))

  @property
  def total(self) -> OpCounts:
    """Layer-by-layer count: each layer counted as what it is."""
    out = OpCounts(0, 0, 0)
    for layer in self.layers:
      out = out + layer.ops
    return out

  @property
  def model_kind(self) -> str:
    """``'adder'``, ``'bnn'`` or ``'cnn'`` from the body layers
    (``'mixed'`` if the model has both adder and binary layers).

    Only the weight layers tell the kind: an attention core's rows (l1
    scores are ``'adder'``) do not.
    """
    kinds = {layer.kind for layer in self.layers if layer.role == 'layer'}
    if 'adder' in kinds and 'binary' in kinds:
      return 'mixed'
    if 'adder' in kinds:
      return 'adder'
    if 'binary' in kinds:
      return 'bnn'
    return 'cnn'

  @property
  def paper_total(self) -> OpCounts | None:
    """The paper's convention: every layer counted as the model's kind.

    ``M`` = :attr:`layer_macs`: CNN ``(M, M, 0)``, AdderNet ``(0, 2M, 0)``,
    BNN ``(0, M, M)`` as (Mul, Add, XNOR), plus the attention cores' rows as
    they are counted; ``None`` for a mixed model.
    """
    m = self.layer_macs
    layers = {'cnn': OpCounts(m, m, 0), 'adder': OpCounts(0, 2 * m, 0),
              'bnn': OpCounts(0, m, m)}.get(self.model_kind)
    if layers is None:
      return None
    for l in self.layers:
      if l.role == 'attention':
        layers = layers + l.ops
    return layers

  def energy_pj(self, energy: EnergyModel = FP32_45NM, *,
                paper_convention: bool = False) -> float:
    """Energy per image in pJ of :attr:`total` (or :attr:`paper_total`).

    Every operation is priced at the energy model's precision.

    Raises:
      ValueError: XNOR operations and no XNOR energy in ``energy``, or a
        mixed model with ``paper_convention=True``.
    """
    counts = self.paper_total if paper_convention else self.total
    if counts is None:
      raise ValueError('the paper convention is undefined for a model with '
                       'both adder and binary layers.')
    return counts.energy_pj(energy)

  def __str__(self) -> str:
    head = ('layer', 'type', 'kind', 'input', 'output', 'MACs', '#Mul',
            '#Add', '#XNOR')
    rows = [head]
    for l in self.layers:
      rows.append((l.path, l.layer, l.kind,
                   'x'.join(map(str, l.input_shape[1:])),
                   'x'.join(map(str, l.output_shape[1:])), f'{l.macs:,}',
                   f'{l.ops.mul:,}', f'{l.ops.add:,}', f'{l.ops.xnor:,}'))
    t = self.total
    rows.append(('total (per layer)', '', '', '', '', f'{self.macs:,}',
                 f'{t.mul:,}', f'{t.add:,}', f'{t.xnor:,}'))
    p = self.paper_total
    if p is not None:
      rows.append((f'paper convention ({self.model_kind})', '', '', '', '',
                   '', f'{p.mul:,}', f'{p.add:,}', f'{p.xnor:,}'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
      cells = [c.ljust(w) if j < 5 else c.rjust(w)
               for j, (c, w) in enumerate(zip(r, widths))]
      lines.append('  '.join(cells).rstrip())
      if i == 0 or i == len(self.layers):
        lines.append('-' * len(lines[-1]))
    n_layers = sum(l.role == 'layer' for l in self.layers)
    n_cores = sum(_is_scores(l) for l in self.layers)
    cores = f' and {n_cores} attention cores' if n_cores else ''
    lines.append(
        f'input {"x".join(map(str, self.input_shape))}: {n_layers} '
        f'counted layers{cores}, {_human(self.macs)} MACs, #Mul '
        f'{_human(t.mul)}, #Add {_human(t.add)}, #XNOR {_human(t.xnor)}; '
        f'params {self.params:,} ({_human(self.params)})')
    if p is not None:
      lines.append(f'paper convention: #Mul {_human(p.mul)}, #Add '
                   f'{_human(p.add)}, #XNOR {_human(p.xnor)}')
    for energy in (FP32_45NM, INT8_45NM):
      e = t.mul * energy.mul_pj + t.add * energy.add_pj
      unpriced = (f' + {_human(t.xnor)} XNOR unpriced'
                  if t.xnor and energy.xnor_pj is None else '')
      if t.xnor and energy.xnor_pj is not None:
        e += t.xnor * energy.xnor_pj
      lines.append(f'energy ({energy.name}): {e / 1e6:,.3f} uJ per image'
                   f'{unpriced}')
    if n_cores:
      lines.append(f'not counted: the attention softmax of '
                   f'{self.softmax_logits:,} logits (exp, max, sum, division)')
    if self.uncounted:
      lines.append('not counted (other layer types): '
                   + ', '.join(self.uncounted))
    return '\n'.join(lines)


def _layer_kind(module: nn.Module) -> tuple[str, str] | None:
  """``(kind, 'conv' | 'dense' | 'general')`` of a counted layer, else
  ``None`` (``'general'``: a ``DenseGeneral``)."""
  if isinstance(module, bnn.BinaryConv):
    return 'binary', 'conv'
  if isinstance(module, bnn.BinaryDense):
    return 'binary', 'dense'
  if isinstance(module, adder_linen.AdderConv):
    return 'adder', 'conv'
  if isinstance(module, adder_linen.AdderDense):
    return 'adder', 'dense'
  if isinstance(module, adder_linen.AdderDenseGeneral):
    return 'adder', 'general'
  if isinstance(module, nn.Conv):
    return 'fp', 'conv'
  if isinstance(module, nn.Dense):
    return 'fp', 'dense'
  if isinstance(module, nn.DenseGeneral):
    return 'fp', 'general'
  return None


def _layer_ops(kind: str, macs: int, bias_adds: int) -> OpCounts:
  if kind == 'fp':
    return OpCounts(mul=macs, add=macs + bias_adds, xnor=0)
  if kind == 'adder':
    return OpCounts(mul=0, add=2 * macs + bias_adds, xnor=0)
  return OpCounts(mul=0, add=macs + bias_adds, xnor=macs)


def _size(shape) -> int:
  return int(math.prod(shape))


def _contracted_size(axis, input_shape: tuple[int, ...]) -> int:
  """Product of the input axes a ``DenseGeneral`` contracts."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  ndim = len(input_shape)
  return _size(input_shape[a] for a in {int(a) % ndim for a in axes})


def _attention_core(module: nn.Module) -> tuple[str, str | None, str] | None:
  """``(score, identity, scaled)`` of an attention whose core is counted.

  ``scaled`` is ``'logits'`` (the scores are scaled) or ``'queries'`` (flax
  divides the queries by ``sqrt(D)``). ``None`` for other modules.
  """
  if isinstance(module, adder_linen.AdderMultiHeadAttention):
    return module.score, module.identity, 'logits'
  if isinstance(module, nn.MultiHeadDotProductAttention):
    return 'dot', None, 'queries'
  return None


def _attention_inputs(call) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of the queries' and keys' inputs of an attention call."""
  given = dict(zip(('inputs_q', 'inputs_k', 'inputs_v'), call.inputs))
  given.update({k: v for k, v in call.kwargs.items()
                if k in ('inputs_q', 'inputs_k', 'inputs_v', 'inputs_kv')})
  q = given.get('inputs_q')
  k = given.get('inputs_k')
  if k is None:
    k = given.get('inputs_kv')
  if k is None:
    k = q
  return tuple(q.shape), tuple(k.shape)


def _attention_rows(call, core) -> list[LayerOps]:
  """The rows of one attention core (module docstring), in compute order."""
  score, identity, scaled = core
  module = call.module
  q_shape, k_shape = _attention_inputs(call)
  heads = int(module.num_heads)
  d = int(module.qkv_features or q_shape[-1]) // heads
  batch, lq, lk = q_shape[:-2], int(q_shape[-2]), int(k_shape[-2])
  nb = _size(batch)
  tokens = (*batch, lq, heads, d)       # queries, outputs
  logits = (*batch, heads, lq, lk)      # scores, map
  taps = nb * heads * lq * lk * d
  prefix = f'{call.name}:' if call.name else ''
  layer = call.type.__name__

  def row(part, kind, in_shape, out_shape, macs, ops):
    return LayerOps(path=prefix + part, layer=layer, kind=kind,
                    input_shape=in_shape, output_shape=out_shape,
                    kernel_shape=(), macs=int(macs), ops=ops, params=0,
                    role='attention')

  score_kind = 'adder' if score == 'l1' else 'fp'
  scores = row('scores', score_kind, tokens, logits, taps,
               _layer_ops(score_kind, taps, 0))
  rows = []
  if scaled == 'queries':
    rows += [row('scale', 'fp', tokens, tokens, 0,
                 OpCounts(mul=_size(tokens), add=0, xnor=0)), scores]
  else:
    rows += [scores, row('scale', 'fp', logits, logits, 0,
                         OpCounts(mul=_size(logits), add=0, xnor=0))]
  if identity == 'logits':
    rows.append(row('identity', 'fp', logits, logits, 0,
                    OpCounts(mul=0, add=nb * heads * lq, xnor=0)))
  rows.append(row('av', 'fp', logits, tokens, taps,
                  _layer_ops('fp', taps, 0)))
  if identity == 'output':
    n = _size(tokens)
    rows.append(row('identity', 'fp', tokens, tokens, 0,
                    OpCounts(mul=2 * n, add=n, xnor=0)))
  return rows


def count_params(variables: Any) -> int:
  """Number of parameters: the leaves of ``variables['params']``.

  Args:
    variables: a variables dict (``{'params': ..., 'batch_stats': ...}``),
      or a params tree; arrays or ``jax.ShapeDtypeStruct`` leaves (from
      ``jax.eval_shape``). BatchNorm statistics are not parameters.

  Returns:
    The total number of parameter entries.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> v = jax.eval_shape(nn.Dense(3).init, jax.random.key(0),
    ...                    jnp.zeros((1, 4)))
    >>> count_params(v)  # 4 * 3 kernel + 3 bias
    15
  """
  if hasattr(variables, 'keys') and 'params' in variables:
    variables = variables['params']
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in leaves:
    if not hasattr(leaf, 'shape') and (
        isinstance(leaf, (bool, np.bool_))
        or not isinstance(leaf, (int, float, np.number))):
      where = jax.tree_util.keystr(tuple(path)) or '<root>'
      raise _checks.ArgumentTypeError(
          f'`variables` must be a tree of arrays (or jax.ShapeDtypeStruct), '
          f'got {_checks.describe(leaf)} at {where}.')
  return sum(_size(jnp.shape(leaf)) for _, leaf in leaves)


def _accepts(fn, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind == p.VAR_KEYWORD
                               for p in params.values())


_ONE_EXAMPLE = 'pass the shape of one example, without the batch axis'


def _check_top_level_rank(model: nn.Module, shape: tuple[int, ...]) -> None:
  """Refuses an ``input_shape`` whose rank does not fit the model.

  A plain layer given to :func:`count_ops` declares its example's rank: a
  convolution with an n-D kernel takes ``n + 1`` axes (spatial axes and
  channels), a dense layer one (the features); a model of the zoo takes
  images ``(H, W, C)``. One more axis is a batch axis, which would multiply
  every count.
  """
  if isinstance(model, ZooModel):
    if len(shape) != 3:
      raise ValueError(
          f'`input_shape` {shape} has {len(shape)} axes, but '
          f'{type(model).__name__} takes images of 3 axes (H, W, C)'
          + ('; ' + _ONE_EXAMPLE if len(shape) > 3 else '') + '.')
    return
  kinds = _layer_kind(model)
  if kinds is None:
    return
  if kinds[1] == 'general':
    return  # contracts any axes: a batch axis cannot be told apart.
  if kinds[1] == 'conv':
    kernel_size = getattr(model, 'kernel_size', None)
    if isinstance(kernel_size, int) or kernel_size is None:
      return  # 1-D int kernel_size: the rank follows from the input.
    want = len(tuple(kernel_size)) + 1
    axes = {2: '(L, C)', 3: '(H, W, C)', 4: '(D, H, W, C)'}.get(
        want, '(spatial axes..., C)')
  else:
    want, axes = 1, '(features,)'
  if len(shape) != want:
    raise ValueError(
        f'`input_shape` {shape} has {len(shape)} axes, but '
        f'{type(model).__name__} takes examples of {want} axes {axes}'
        + ('; ' + _ONE_EXAMPLE if len(shape) > want else '') + '.')


def _check_conv_call_rank(call, kernel, shape) -> None:
  """Refuses a conv call whose input is not ``[1, spatial..., C]``."""
  want = len(kernel)  # batch + spatial axes + channels
  got = call.input_shape
  if got is None or len(got) == want:
    return
  more = len(got) > want
  raise ValueError(
      f'`input_shape` {shape} gives layer {call.name!r} '
      f'({call.type.__name__}, a {want - 2}-D convolution) inputs of shape '
      f'{got} (the batch of one included), where it takes [N, '
      f'{", ".join(["S"] * (want - 2))}, C]'
      + (f': {len(got) - want} axis too many; {_ONE_EXAMPLE}' if more else
         ': an axis is missing (the channels?)') + '.')


def count_ops(model: nn.Module, input_shape, *, dtype: Any = jnp.float32,
              **call_kwargs) -> OpsReport:
  """Counts #Mul / #Add / #XNOR per image, layer by layer.

  The model is run abstractly (``jax.eval_shape`` of ``model.init`` on a
  batch of one) under ``flax.linen.intercept_methods``; every call of a
  counted layer is recorded with its shapes. See the module docstring for the
  convention (which layers are counted, and how).

  Args:
    model: an unbound Linen module, e.g. from
      :func:`adderjax.models.create_model`.
    input_shape: shape of one example without the batch dim, e.g.
      ``(32, 32, 3)``.
    dtype: input dtype.
    **call_kwargs: extra arguments of the model call; ``train=False`` is
      passed by default when the model's ``__call__`` takes ``train``.

  Returns:
    An :class:`~adderjax.ops_count.OpsReport` (``str()`` of it is a
    readable table).

  Raises:
    ValueError: a bad ``input_shape``: not positive ints (``(28.9, 28, 1)``
      is refused, never truncated), or an extra batch axis (``(4, 16, 16,
      4)`` for a 2-D convolution, ``(1, 28, 28, 1)`` for a model of the zoo)
      or a missing axis for the model's layers. A batch axis is found from
      the ranks that the model's convolutions (and a zoo model) take; a
      model of dense layers only, which take any rank, cannot tell it from
      a sequence axis: there the shape is counted as one example.
    TypeError: ``model`` is not a Linen module.

  Examples:
    >>> import flax.linen as nn
    >>> from adderjax.linen import AdderConv
    >>> report = count_ops(AdderConv(8, (3, 3), use_bias=False), (16, 16, 4))
    >>> report.macs == 16 * 16 * 8 * (3 * 3 * 4)
    True
    >>> report.total.add == 2 * report.macs
    True
    >>> count_ops(nn.Dense(10), (84,)).total
    OpCounts(mul=840, add=850, xnor=0)

    An attention's projections are layers; its core adds rows (2 heads of
    4, 5 tokens: 2 x 5 x 5 x 4 = 200 taps in the scores and in ``av``):

    >>> from adderjax.linen import AdderMultiHeadAttention
    >>> report = count_ops(AdderMultiHeadAttention(
    ...     num_heads=2, qkv_features=8, use_bias=False), (5, 6))
    >>> [(l.path, l.macs, l.ops.mul, l.ops.add) for l in report.layers
    ...  if l.role == 'attention']  # doctest: +NORMALIZE_WHITESPACE
    [('scores', 200, 0, 400), ('scale', 0, 50, 0), ('av', 200, 200, 200),
     ('identity', 0, 80, 40)]
  """
  if not isinstance(model, nn.Module):
    raise _checks.ArgumentTypeError(
        '`model` must be an unbound flax.linen.Module (e.g. from '
        f'adderjax.models.create_model), got {_checks.describe(model)}.')
  hint = ''
  if isinstance(input_shape, (int, np.integer)) and not isinstance(
      input_shape, (bool, np.bool_)):
    hint = f'for one vector write ({int(input_shape)},)'
  shape = _checks.shape('input_shape', input_shape, hint=hint)
  _check_top_level_rank(model, shape)
  if 'train' not in call_kwargs and _accepts(type(model).__call__, 'train'):
    call_kwargs['train'] = False

  def init(x):
    return model.init(jax.random.key(0), x, **call_kwargs)

  with introspect.intercept_layers() as calls:
    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1,) + shape,
                                                          dtype))
  records: list[LayerOps] = []
  uncounted: list[str] = []
  for i, call in enumerate(calls):
    params = call.variables.get('params', {})
    kinds = _layer_kind(call.module)
    if kinds is None:
      core = _attention_core(call.module)
      if (core is not None and i and calls[i - 1].path == call.path and
          _attention_core(calls[i - 1].module) is not None):
        continue  # a subclass's __call__ around its parent's (SelfAttention)
      if (isinstance(call.module, nn.MultiHeadDotProductAttention) and
          call.module.attention_fn is not nn.dot_product_attention):
        uncounted.append(f'{call.name} ({call.type.__name__} core: a custom '
                         'attention_fn)')
      elif core is not None:
        rows = _attention_rows(call, core)
        out = f'{call.name}/out' if call.name else 'out'
        at = next((j for j in range(len(records) - 1, -1, -1)
                   if records[j].path == out), len(records))
        records[at:at] = rows
      elif 'kernel' in params:
        uncounted.append(f'{call.name} ({call.type.__name__})')
      continue
    kind, op = kinds
    kernel = call.kernel_shape
    if op == 'conv':
      _check_conv_call_rank(call, kernel, shape)
    has_bias = 'bias' in params
    out_shape = call.output_shape
    if op == 'conv':
      taps = _size(kernel[:-1])
    elif op == 'general':
      taps = _contracted_size(call.module.axis, call.input_shape)
    else:
      taps = kernel[0]
    macs = _size(out_shape) * taps
    bias_adds = _size(out_shape) if has_bias else 0
    n_params = _size(kernel) + (_size(params['bias'].shape) if has_bias
                                else 0)
    records.append(LayerOps(
        path=call.name, layer=call.type.__name__, kind=kind,
        input_shape=call.input_shape, output_shape=out_shape,
        kernel_shape=tuple(kernel), macs=int(macs),
        ops=_layer_ops(kind, int(macs), int(bias_adds)),
        params=int(n_params)))
  return OpsReport(input_shape=shape, layers=tuple(records),
                   params=count_params(variables), uncounted=tuple(uncounted))
