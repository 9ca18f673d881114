"""adderjax.layer_outputs_saveable: what it keeps, and unchanged gradients.

The policy is checked against the rule it states (which primitives it keeps),
by the residuals ``jax.vjp`` holds (exactly the layers' outputs and the
network input, counted from the architecture), and by whole-network
gradients under ``jit`` and eagerly against the same network without
``jax.checkpoint``, on the XLA backend and on the interpret-mode Pallas TPU
kernels.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adderjax
from adderjax import models
from adderjax.remat import ADDER_OUTPUT
from adderjax.remat import LayerOutputsSaveable
from jax.ad_checkpoint import checkpoint_name

POLICY = adderjax.layer_outputs_saveable


def _decisions(fn, *args):
  """(primitive name, policy decision) for every equation of ``fn``."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [(e.primitive.name,
           POLICY(e.primitive, *[v.aval for v in e.invars], **e.params))
          for e in jaxpr.eqns]


class PolicyTest(parameterized.TestCase):

  def test_keeps_adder_outputs_and_not_other_names(self):
    x = jnp.ones((2, 6, 6, 3))
    w = jnp.ones((3, 3, 3, 4))

    def f(x, w):
      y = adderjax.adder_conv(x, w, padding='VALID')
      return checkpoint_name(jnp.tanh(y), 'something_else')

    names = [(e.primitive.name, e.params.get('name'),
              POLICY(e.primitive, *[v.aval for v in e.invars], **e.params))
             for e in jax.make_jaxpr(f)(x, w).jaxpr.eqns
             if e.primitive.name == 'name']
    self.assertEqual(names, [('name', ADDER_OUTPUT, True),
                             ('name', 'something_else', False)])

  def test_keeps_convolutions_and_matmuls(self):
    x = jnp.ones((2, 6, 6, 3))
    w = jnp.ones((3, 3, 3, 4))
    conv = _decisions(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
                      x, w)
    self.assertIn(('conv_general_dilated', True), conv)
    dot = _decisions(lambda a, b: a @ b, jnp.ones((4, 5)), jnp.ones((5, 2)))
    self.assertIn(('dot_general', True), dot)

  def test_recomputes_elementwise_ops(self):
    got = _decisions(lambda a: jnp.maximum(jnp.exp(a) * 2.0 + 1.0, 0.0),
                     jnp.ones((8, 4, 4, 16)))
    self.assertTrue(got)
    self.assertEqual([d for _, d in got], [False] * len(got), got)

  @parameterized.parameters(
      # BatchNorm statistics: 8 * 4 * 4 = 128 values per kept one.
      ((8, 4, 4, 16), (0, 1, 2), True),
      # A sum over 16 channels shrinks 16x < 64x: recomputed.
      ((8, 4, 4, 16), (3,), False),
      ((64, 16), (0,), True),
      ((64, 16), (1,), False))
  def test_reductions_by_how_much_they_shrink(self, shape, axes, want):
    got = _decisions(lambda a: jnp.sum(a, axis=axes), jnp.ones(shape))
    self.assertEqual(got, [('reduce_sum', want)])

  def test_shrink_threshold_is_configurable(self):
    policy = LayerOutputsSaveable(min_reduction=8)
    jaxpr = jax.make_jaxpr(lambda a: jnp.sum(a, axis=3))(
        jnp.ones((8, 4, 4, 16))).jaxpr
    eqn = jaxpr.eqns[0]
    self.assertTrue(policy(eqn.primitive, *[v.aval for v in eqn.invars],
                           **eqn.params))

  @parameterized.parameters(0, -3, 2.5, True, '64')
  def test_bad_min_reduction(self, value):
    with self.assertRaisesRegex(ValueError, f'min_reduction.*{value!r}'):
      LayerOutputsSaveable(min_reduction=value)


def _loss(model, variables, x, labels):
  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  return loss


def _setup(name, batch, size, channels, impl=None, **overrides):
  model = models.create_model(name, kind='adder', num_classes=10,
                              implementation=impl, **overrides)
  kx, ky = jax.random.split(jax.random.key(batch + size))
  x = jax.random.normal(kx, (batch, size, size, channels))
  labels = jax.random.randint(ky, (batch,), 0, 10)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), x)
  return _loss(model, variables, x, labels), variables['params'], x


def _max_rel_diff(got, want):
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))
  return max(float(jnp.max(jnp.abs(a - b))) / scale
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


class ResidualsTest(absltest.TestCase):

  def test_resnet_keeps_only_layer_outputs_and_input(self):
    # One basic block per stage, widths 8/16/32 at 16/8/4 px: 1 stem conv,
    # 2 adder layers per block and a 1x1 adder projection in stages 2 and 3.
    loss, params, x = _setup('resnet20', 4, 16, 3, stage_sizes=(1, 1, 1),
                             width=8)
    # Shapes only (``eval_shape``): the residuals ``jax.vjp`` holds are the
    # leaves of the function it returns.
    residuals = lambda f: jax.tree.leaves(jax.eval_shape(
        lambda p: jax.vjp(f, p)[1], params))
    kept = residuals(jax.checkpoint(loss, policy=POLICY))
    shapes = sorted(l.shape for l in kept
                    if len(l.shape) == 4 and l.shape[0] == 4)
    want = sorted([(4, 16, 16, 3)]            # the input (stem's grad)
                  + [(4, 16, 16, 8)] * 3      # stem, conv1, conv2
                  + [(4, 8, 8, 16)] * 3       # conv1, conv2, downsample
                  + [(4, 4, 4, 32)] * 3)
    self.assertEqual(shapes, want)
    # Without the policy the same network keeps more (the ReLU outputs that
    # feed adder layers, normalised activations).
    count = lambda leaves: sum(l.size for l in leaves)
    self.assertLess(count(kept), count(residuals(loss)))


class NetworkGradientTest(parameterized.TestCase):
  """Gradients with the policy equal the gradients without it."""

  @parameterized.named_parameters(
      ('resnet20_jit', 'resnet20', 4, 16, 3, True,
       {'stage_sizes': (2, 1, 1), 'width': 8}),
      ('lenet5_bn_jit', 'lenet5_bn', 8, 28, 1, True, {}),
      ('vgg_small_jit', 'vgg_small', 2, 32, 3, True,
       {'widths': (16, 32, 64)}),
  )
  def test_zoo(self, name, batch, size, ch, jit, overrides):
    self._check(name, batch, size, ch, jit, overrides)

  @pytest.mark.slow
  def test_eager(self):
    self._check('lenet5_bn', 4, 28, 1, False, {})

  @pytest.mark.slow
  def test_resnet50_bottlenecks(self):
    self._check('resnet50', 2, 64, 3, True,
                {'stage_sizes': (1, 1, 1, 1), 'width': 8})

  def _check(self, name, batch, size, ch, jit, overrides):
    loss, params, _ = _setup(name, batch, size, ch, **overrides)
    wrap = jax.jit if jit else (lambda f: f)
    want = wrap(jax.grad(loss))(params)
    got = wrap(jax.grad(jax.checkpoint(loss, policy=POLICY)))(params)
    self.assertLessEqual(_max_rel_diff(got, want), 1e-5)

  def test_pallas_tpu_interpret(self):
    # The accelerator path: the kernels' residuals are recomputed inputs.
    loss, params, _ = _setup('resnet20', 8, 8, 3, impl='pallas_tpu_interpret',
                             stage_sizes=(1, 1), width=8)
    want_loss, params_xla, _ = _setup('resnet20', 8, 8, 3, impl='xla',
                                      stage_sizes=(1, 1), width=8)
    want = jax.jit(jax.grad(want_loss))(params_xla)
    got = jax.jit(jax.grad(jax.checkpoint(loss, policy=POLICY)))(params)
    self.assertLessEqual(_max_rel_diff(got, want), 1e-4)


if __name__ == '__main__':
  absltest.main()


class RematBlocksTest(parameterized.TestCase):
  """ResNet(remat_blocks=True): same variables, updates and gradients."""

  def _both(self, name, batch, size, remats=(False, True), **overrides):
    out = []
    for remat in remats:
      model = models.create_model(name, kind='adder', num_classes=10,
                                  remat_blocks=remat, **overrides)
      kx, ky = jax.random.split(jax.random.key(size))
      x = jax.random.normal(kx, (batch, size, size, 3))
      labels = jax.random.randint(ky, (batch,), 0, 10)
      variables = jax.jit(functools.partial(model.init, train=False))(
          jax.random.key(0), x)

      def loss(params, model=model, variables=variables, x=x, labels=labels):
        logits, updates = model.apply({**variables, 'params': params}, x,
                                      train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean(), updates

      out.append((model, variables, loss, x))
    return out

  def test_resnet20(self):
    self._check('resnet20', 4, 16, stage_sizes=(1, 1, 1), width=8)

  def test_resnet20_first_stage_only(self):
    self._check('resnet20', 4, 16, remats=(False, (1,)),
                stage_sizes=(1, 1, 1), width=8)

  @pytest.mark.slow
  def test_resnet50(self):
    self._check('resnet50', 2, 64, stage_sizes=(1, 1, 1, 1), width=8)

  def _check(self, name, batch, size, remats=(False, True), **overrides):
    (_, v0, loss0, _), (_, v1, loss1, _) = self._both(name, batch, size,
                                                      remats, **overrides)
    self.assertEqual(jax.tree.structure(v0), jax.tree.structure(v1))
    for a, b in zip(jax.tree.leaves(v0), jax.tree.leaves(v1)):
      np.testing.assert_array_equal(a, b)  # same init, same names
    (_, up0), g0 = jax.jit(jax.value_and_grad(loss0, has_aux=True))(
        v0['params'])
    (_, up1), g1 = jax.jit(jax.value_and_grad(loss1, has_aux=True))(
        v1['params'])
    self.assertLessEqual(_max_rel_diff(g1, g0), 1e-5)
    self.assertLessEqual(_max_rel_diff(up1, up0), 1e-6)

  def test_keeps_block_inputs_only(self):
    # Blocks at 16 (8 ch), 8 (16 ch) and 4 px (32 ch): inside a block
    # nothing is kept, so the last stage's tensors are not residuals and
    # the middle stage's only one, the last block's input.
    [(_, variables, loss, _)] = self._both(
        'resnet20', 4, 16, remats=(True,), stage_sizes=(1, 1, 1), width=8)
    res = jax.tree.leaves(jax.eval_shape(
        lambda p: jax.vjp(lambda q: loss(q)[0], p)[1], variables['params']))
    shapes = [l.shape for l in res if len(l.shape) == 4 and l.shape[0] == 4]
    self.assertEqual(shapes.count((4, 4, 4, 32)), 0, shapes)
    self.assertEqual(shapes.count((4, 8, 8, 16)), 1, shapes)

  def _residual_shapes(self, remat):
    [(_, variables, loss, _)] = self._both(
        'resnet20', 4, 16, remats=(remat,), stage_sizes=(1, 1, 1), width=8)
    res = jax.tree.leaves(jax.eval_shape(
        lambda p: jax.vjp(lambda q: loss(q)[0], p)[1], variables['params']))
    return [l.shape for l in res if len(l.shape) == 4 and l.shape[0] == 4]

  def test_stages_recompute_only_their_blocks(self):
    # A stage's tensors are kept as with every block recomputed when the
    # stage is chosen (stage 1: the stem's, and its block's input) and as
    # without recompute when it is not.
    none, every = self._residual_shapes(False), self._residual_shapes(True)
    first, last = self._residual_shapes((1,)), self._residual_shapes((3,))
    stage1, stage3 = (4, 16, 16, 8), (4, 4, 4, 32)
    self.assertLess(every.count(stage1), none.count(stage1))
    self.assertEqual(first.count(stage1), every.count(stage1), first)
    self.assertEqual(first.count(stage3), none.count(stage3), first)
    self.assertEqual(last.count(stage3), every.count(stage3), last)
    self.assertEqual(last.count(stage3), 0, last)
    self.assertEqual(last.count(stage1), none.count(stage1), last)

  def test_bad_value(self):
    # Refused when the model is built (create_model checks the fields) and,
    # for a model built directly, when it is called.
    with self.assertRaisesRegex(ValueError, "remat_blocks.*'yes'"):
      models.create_model('resnet20', kind='adder', num_classes=10,
                          remat_blocks='yes')
    model = models.ResNet20(num_classes=10, remat_blocks='yes')
    with self.assertRaisesRegex(ValueError, "remat_blocks.*'yes'"):
      jax.eval_shape(functools.partial(model.init, train=False),
                     jax.random.key(0), jnp.zeros((1, 8, 8, 3)))

  @parameterized.parameters(
      ((0,), r"remat_blocks` \(0,\): stage\(s\) \[0\] out of range.*1\.\.3"),
      ((1, 4), r"stage\(s\) \[4\] out of range"),
      ((1.0,), r"remat_blocks` must be a bool or a tuple.*\(1\.0,\)"),
  )
  def test_bad_stages(self, value, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      models.create_model('resnet20', kind='adder', num_classes=10,
                          remat_blocks=value)
