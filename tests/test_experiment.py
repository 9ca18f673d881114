"""The experiment layer's extension points: loss terms and methods from the
config, trained by the unchanged loop (experiments.train)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpointing
from experiments import errors
from experiments import experiment
from experiments import losses
from experiments import methods
from experiments import steps
from experiments import testing
from experiments import train
from test_train import tiny_mnist_config


def tiny_config(data_dir, **updates):
  return tiny_mnist_config(data_dir, kind='adder', steps_per_epoch=2,
                           tensorboard=False, **updates)


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return testing.write_synthetic_mnist(
      str(tmp_path_factory.mktemp('mnist')), 64, 40, 0)


def test_loss_term_from_config_matches_hand_written_objective(mnist_dir):
  exp = experiment.Experiment.from_config(
      tiny_config(mnist_dir, loss_terms='logit_l2=0.5'))
  assert [(t.name, t.weight) for t in exp.objective.terms] == [
      ('logit_l2', 0.5)]
  state = jax.tree.map(jnp.asarray, exp.init_host_state())
  batch = exp.datasets.train.batch(0)
  step = jax.jit(exp.train_step_fn())
  new_state, metrics = step(state, batch)

  # Oracle: the objective written out by hand, its gradient by jax.grad,
  # and one optimizer update.
  x = (batch['image'].astype(np.float32) / 255 - np.float32(exp.mean)) / (
      np.float32(exp.std))
  labels = jnp.asarray(batch['label'])

  def total(params):
    logits, _ = exp.model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(logp[jnp.arange(16), labels])
    return ce + 0.5 * jnp.mean(logits ** 2), jnp.mean(logits ** 2)

  (_, l2), grads = jax.value_and_grad(total, has_aux=True)(state.params)
  updates, _ = exp.tx.update(grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  for a, b in zip(jax.tree.leaves(new_state.params),
                  jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
  # The term's value, summed over the batch like the other metrics.
  np.testing.assert_allclose(float(metrics['loss/logit_l2']) / 16,
                             float(l2), rtol=1e-5)


@pytest.mark.parametrize('key,value,needle', [
    ('method', 'bogus', "method 'bogus'"),
    ('loss_terms', 'nope=1', "unknown term 'nope'"),
    ('loss_terms', 'logit_l2', 'use name=weight'),
    ('loss_terms', 'logit_l2=inf', 'finite number'),
])
def test_bad_method_or_terms_are_config_errors(mnist_dir, key, value, needle):
  with pytest.raises(errors.ConfigError, match=needle):
    experiment.validate_config(tiny_config(mnist_dir, **{key: value}))


class TeacherState(steps.TrainState):
  """The supervised state plus a frozen teacher's parameters."""
  teacher_params: dict


class FrozenTeacher(methods.Method):
  """Supervised learning plus a KL term towards a frozen copy of the
  initial network (a stand-in for distillation from a teacher)."""

  name = 'test_frozen_teacher'

  def init_fn(self, exp):
    base = steps.make_init(exp.model, exp.tx, exp.image_shape)

    def init(key):
      s = base(key)
      return TeacherState(teacher_params=jax.tree.map(lambda p: p + 0.01,
                                                      s.params),
                          **{f.name: getattr(s, f.name) for f in
                             dataclasses.fields(s)})
    return init

  def train_step_fn(self, exp, remat):
    def step(state, batch):
      images = steps.normalize(batch['image'], exp.mean, exp.std)
      teacher = exp.model.apply(
          {'params': state.teacher_params, 'batch_stats': state.batch_stats},
          images, train=False)

      def kl(out):
        p = jax.nn.softmax(teacher)
        return jnp.mean(jnp.sum(
            p * (jax.nn.log_softmax(teacher) -
                 jax.nn.log_softmax(out.logits)), -1))
      objective = losses.Objective(terms=(losses.LossTerm('kl', 1.0, kl),))
      inner = steps.make_train_step(exp.model.apply, exp.tx, exp.mean,
                                    exp.std, objective=objective)
      return inner(state, batch)
    return step


def test_a_registered_method_trains_and_resumes_without_loop_edits(
    mnist_dir, tmp_path):
  method = methods.register_method(FrozenTeacher())
  try:
    config = tiny_config(mnist_dir, method=method.name)
    workdir = str(tmp_path / 'run')
    first = config.copy_and_resolve_references()
    first.num_train_steps = 2
    # The first segment stops at step 2; the full run resumes from it.
    train.train_and_evaluate(first, workdir)
    summary = train.train_and_evaluate(config, workdir)
    assert summary['steps'] == 4 and summary['resumed_from'] == 2
    records = [json.loads(l) for l in
               open(os.path.join(workdir, 'metrics.jsonl'))]
    kl = [r['train/loss/kl'] for r in records if 'train/loss/kl' in r]
    assert len(kl) == 2 and all(np.isfinite(kl))
    # The teacher stays frozen: its parameters in the last checkpoint are
    # the initial ones (params + 0.01) of a fresh state.
    exp = experiment.Experiment.from_config(config)
    init = exp.init_host_state()
    ckpt = checkpointing.Checkpointer(workdir, primary=False)
    saved, _ = ckpt.restore(ckpt.latest_step(), init)
    ckpt.close()
    assert int(saved.step) == 4
    for a, b in zip(jax.tree.leaves(saved.teacher_params),
                    jax.tree.leaves(init.teacher_params)):
      np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(saved.params), jax.tree.leaves(init.params))]
    assert any(moved)
  finally:
    del methods.METHODS[method.name]


def test_a_config_dtype_that_is_no_dtype_is_named(mnist_dir):
  config = tiny_config(mnist_dir)
  config.model.dtype = 'float33'
  with pytest.raises(errors.ConfigError,
                     match="model.dtype 'float33' is not a dtype"):
    experiment.Experiment.from_config(config)
