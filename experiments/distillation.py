"""Kernel-based progressive distillation (PKKD) as a training method.

Xu et al., "Kernel Based Progressive Distillation for Adder Neural Networks"
(NeurIPS 2020) close the AdderNet's accuracy gap by distilling a CNN of the
same architecture into it. ``config.method = 'pkkd'`` (the config token
``:pkkd`` on any model config, e.g. ``lenet5_mnist.py:pkkd``) trains:

* the **teacher**, the model's CNN twin (the same zoo model with
  multiplication layers), from its own initialisation and on the labels, in
  the same step as the student (``teacher='joint'``: "progressive", the
  teacher is not a fixed pre-trained network), or read from a finished CNN
  run and held fixed in eval mode (``teacher='workdir'`` with
  ``teacher_workdir``);
* the **student**, the AdderNet, on the labels (the config's objective:
  cross-entropy plus ``config.loss_terms``), plus
  ``feature_weight * sum_l feature_loss(A_l(k_a(Y_l)), k_c(Z_l))`` over the
  chosen adder layers ``l`` and ``kd_weight * kd_loss(student, teacher, T)``.
  ``Y_l`` is the adder layer's output ``-||x - f||_1`` and ``k_a`` its
  Laplace kernel; ``Z_l`` is the teacher's layer at the same path, mapped by
  the Gaussian kernel ``k_c`` of ``||x - f||^2`` computed from the conv
  output and two norms (:mod:`adderjax.distill`); ``A_l`` is a learned
  linear transform over the channels (a 1x1 convolution, identity at
  initialisation; ``align``), trained with the student.

Choices the published text leaves open (``[not fixed]`` in
``experiments/configs/default.py``, all options of ``config.method_options``):

=================  ========  =================================================
option             default   meaning
=================  ========  =================================================
``teacher``        'joint'   'joint' (trained together) or 'workdir' (fixed)
``teacher_workdir`` ''       a finished CNN run of the same architecture
``kernel``         True      kernel maps; False: the raw outputs, each over
                             its batch mean magnitude
``layers``         'all'     'all' adder layers, 'last', or indices '0,2'
``feature_weight`` 1.0       weight of the summed feature losses
``kd_weight``      1.0       weight of the output distillation
``temperature``    4.0       the output distillation's temperature
``align``          True      the learned linear transform ``A_l``
=================  ========  =================================================

The kernels' bandwidths are the batch's mean distances
(:func:`adderjax.distill.laplace_kernel` with ``sigma=None``).

The state (:class:`PKKDState`) carries both networks' parameters, batch
statistics and optimizer states and the transforms', so checkpoints, resume,
preemption and the NaN stop work as for any run; evaluation reports the
student as the run's ``eval`` figures and the teacher as ``teacher/...``
(``summary.json``: ``teacher_eval``).

Examples:
  >>> from experiments import methods
  >>> methods.get_method('pkkd').defaults['teacher']
  'joint'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adderjax import distill
from adderjax import introspect
from adderjax import linen as adder_linen
from adderjax import models
from adderjax import optim
from experiments import checkpointing
from experiments import errors
from experiments import losses
from experiments import methods
from experiments import parallel
from experiments import steps

PyTree = Any

TEACHERS = ('joint', 'workdir')


class PKKDState(steps.TrainState):
  """A PKKD run's state: the student's (inherited fields) and the rest.

  Attributes:
    teacher_params: the CNN teacher's parameters.
    teacher_batch_stats: its BatchNorm running statistics.
    teacher_opt_state: its optimizer state (``()`` for a fixed teacher).
    align_params: ``{layer: {'kernel', 'bias'}}``, the linear transforms.
    align_opt_state: their optimizer state.
  """
  teacher_params: PyTree
  teacher_batch_stats: PyTree
  teacher_opt_state: PyTree
  align_params: PyTree
  align_opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A distilled layer: its path and whether it is a convolution."""
  path: tuple[str, ...]
  conv: bool
  features: int

  @property
  def name(self) -> str:
    return '/'.join(self.path)


def _is_adder(module: nn.Module) -> bool:
  return isinstance(module, (adder_linen.AdderConv, adder_linen.AdderDense))


def _teacher_model(model: nn.Module) -> nn.Module:
  """The CNN twin of a zoo model (same fields, multiplication layers)."""
  if not isinstance(model, models.ZooModel):
    raise errors.ConfigError(
        f'method pkkd needs a zoo model (adderjax.models) to build its CNN '
        f'twin, got {type(model).__name__}.')
  conv, dense = models.layers_for_kind('cnn')
  return model.clone(conv=conv, dense=dense, grad=None, implementation=None)


def _parse_layers(spec: str, count: int) -> list[int]:
  if spec == 'all':
    return list(range(count))
  if spec == 'last':
    return [count - 1]
  try:
    picked = [int(t) for t in spec.split(',') if t.strip()]
  except ValueError:
    picked = []
  if not picked or any(i < 0 or i >= count for i in picked):
    raise errors.ConfigError(
        f"method_options.layers {spec!r}: use 'all', 'last' or indices "
        f'0..{count - 1} of the model\'s adder layers, e.g. \'0,1\'.')
  return sorted(set(picked))


def _bias_free(module: nn.Module, out: jax.Array) -> jax.Array:
  """A layer's output without its bias (the distance or inner product)."""
  if getattr(module, 'use_bias', False):
    return out - module.variables['params']['bias']
  return out


def _scaled(y: jax.Array) -> jax.Array:
  """A raw layer output over its batch mean magnitude (``kernel=False``).

  The kernels' bandwidths put both networks' features on one scale; the
  raw outputs are not (an adder output is a distance in the hundreds): a
  run comparing them unscaled with ``feature_weight=1`` diverged (NaN loss
  by step 50, LeNet-5-BN on MNIST). Dividing each by its batch mean
  magnitude (no gradient through the divisor) keeps the ablation to the
  one thing it removes, the kernel's non-linearity.
  """
  y = y.astype(jnp.float32)
  return y / jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(y)), 1e-12))


def _align(params: PyTree, features: jax.Array) -> jax.Array:
  return features @ params['kernel'] + params['bias']


class PKKD(methods.Method):
  """The PKKD method (see the module docstring)."""

  name = 'pkkd'
  defaults = {'teacher': 'joint', 'teacher_workdir': '', 'kernel': True,
              'layers': 'all', 'feature_weight': 1.0, 'kd_weight': 1.0,
              'temperature': 4.0, 'align': True}

  def check_options(self, options: dict[str, Any]) -> None:
    if options['teacher'] not in TEACHERS:
      raise errors.ConfigError(f'method_options.teacher '
                               f'{options["teacher"]!r}: use one of '
                               f'{TEACHERS}.')
    if (options['teacher'] == 'workdir') != bool(options['teacher_workdir']):
      raise errors.ConfigError(
          "method_options.teacher_workdir must name a finished CNN run "
          "exactly when method_options.teacher is 'workdir' (got teacher="
          f"{options['teacher']!r}, teacher_workdir="
          f"{options['teacher_workdir']!r}).")
    for key in ('kernel', 'align'):
      if not isinstance(options[key], bool):
        raise errors.ConfigError(f'method_options.{key} must be True or '
                                 f'False, got {options[key]!r}.')
    for key in ('feature_weight', 'kd_weight', 'temperature'):
      v = options[key]
      ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and
            np.isfinite(v) and (v > 0 if key == 'temperature' else v >= 0))
      if not ok:
        raise errors.ConfigError(
            f'method_options.{key} must be a finite number '
            f'{"> 0" if key == "temperature" else ">= 0"}, got {v!r}.')
    if not isinstance(options['layers'], str):
      raise errors.ConfigError(f"method_options.layers must be 'all', 'last' "
                               f"or indices like '0,1', got "
                               f"{options['layers']!r}.")

  # -- the pieces of one experiment ----------------------------------------

  def _parts(self, exp) -> dict[str, Any]:
    options = self.options(exp.config)
    example = jnp.zeros((1,) + tuple(exp.image_shape))
    calls = introspect.trace_layers(exp.model, example, train=False)
    adder = [c for c in calls if _is_adder(c.module)]
    if not adder:
      raise errors.ConfigError(
          'method pkkd distils into adder layers, and the model has none '
          f"(model.kind={exp.config.model.kind!r}; use 'adder').")
    picked = _parse_layers(options['layers'], len(adder))
    layers = tuple(
        _Layer(c.path, c.kernel_size is not None, c.output_shape[-1])
        for c in (adder[i] for i in picked))
    teacher = _teacher_model(exp.model)
    o = exp.config.optimizer
    teacher_tx = optim.addernet_sgd(
        exp.schedule, mask=optim.adder_mask(teacher, example, train=False),
        momentum=o.momentum, weight_decay=o.weight_decay,
        nesterov=o.nesterov, scaling='none')
    align_tx = optax.sgd(exp.schedule, momentum=o.momentum,
                         nesterov=o.nesterov)
    return dict(options=options, layers=layers, teacher=teacher,
                teacher_tx=teacher_tx, align_tx=align_tx, example=example)

  def init_fn(self, exp) -> Callable[[jax.Array], PKKDState]:
    parts = self._parts(exp)
    base = steps.make_init(exp.model, exp.tx, exp.image_shape)
    teacher, joint = parts['teacher'], parts['options']['teacher'] == 'joint'

    def init(key):
      # The student is initialised as a plain run with this seed is.
      s = base(key)
      t_vars = teacher.init(jax.random.fold_in(key, 1), parts['example'],
                            train=False)
      align = {layer.name: {'kernel': jnp.eye(layer.features),
                            'bias': jnp.zeros((layer.features,))}
               for layer in parts['layers']}
      return PKKDState(
          teacher_params=t_vars['params'],
          teacher_batch_stats=t_vars.get('batch_stats', {}),
          teacher_opt_state=(parts['teacher_tx'].init(t_vars['params'])
                             if joint else ()),
          align_params=align, align_opt_state=parts['align_tx'].init(align),
          **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
    return init

  def prepare_host_state(self, exp, host_state: PKKDState) -> PKKDState:
    """Reads a fixed teacher (``teacher='workdir'``) into the state."""
    options = self.options(exp.config)
    if options['teacher'] != 'workdir':
      return host_state
    workdir = options['teacher_workdir']
    with checkpointing.Checkpointer(workdir, primary=False) as ckpt:
      stored = ckpt.stored_config()
      if stored is None or not ckpt.has_checkpoint():
        raise checkpointing.NoRunError(
            f'method_options.teacher_workdir {workdir!r} holds no finished '
            'run (no config.json or no checkpoint).')
      if stored.get('model', {}).get('kind') != 'cnn':
        raise errors.ConfigError(
            f'method_options.teacher_workdir {workdir!r} holds a '
            f"{stored.get('model', {}).get('kind')!r} run; the teacher must "
            "be a 'cnn' run of the student's architecture.")
      saved, _ = ckpt.restore_saved()
    target = {'params': host_state.teacher_params,
              'batch_stats': host_state.teacher_batch_stats}
    source = {'params': saved['params'],
              'batch_stats': saved.get('batch_stats', {})}
    t_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in
               jax.tree_util.tree_leaves_with_path(target)}
    s_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in
               jax.tree_util.tree_leaves_with_path(source)}
    if t_paths != s_paths:
      bad = sorted(set(t_paths.items()) ^ set(s_paths.items()))[:6]
      raise errors.ConfigError(
          f'method_options.teacher_workdir {workdir!r}: its weights do not '
          f'fit the CNN twin of this run\'s model (first differences: '
          f'{bad}).')
    merged = jax.tree.map(lambda t, v: np.asarray(v, t.dtype), target,
                          source)
    return host_state.replace(teacher_params=merged['params'],
                              teacher_batch_stats=merged['batch_stats'])

  # -- the step -------------------------------------------------------------

  def train_step_fn(self, exp, remat: str) -> Callable:
    parts = self._parts(exp)
    options, layers = parts['options'], parts['layers']
    teacher, teacher_tx = parts['teacher'], parts['teacher_tx']
    align_tx = parts['align_tx']
    joint = options['teacher'] == 'joint'
    paths = {layer.path for layer in layers}
    policy = steps.REMAT_POLICIES[remat]
    objective = exp.objective
    axis_name = exp.runner.axis_name
    mutable = ['batch_stats'] + (
        ['intermediates'] if objective.collect_intermediates else [])

    def selected(module):
      return tuple(module.path) in paths

    def run_recording(apply, variables, images, train, mutable_):
      """Runs a model; returns its output and the selected layers' calls."""
      seen = {}

      def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        seen[tuple(context.module.path)] = (context.module, args[0], out)
        return out

      with introspect.intercept_layers(selected, replace=record) as calls:
        result = apply(variables, images, train=train, mutable=mutable_)
      geometry = {c.path: c for c in calls}
      return result, seen, geometry

    def teacher_features(seen, geometry):
      feats = {}
      for layer in layers:
        module, x, out = seen[layer.path]
        kernel = module.variables['params']['kernel']
        z = _bias_free(module, out)
        if not options['kernel']:
          feats[layer.name] = _scaled(z)
          continue
        if layer.conv:
          g = geometry[layer.path]
          d2 = distill.squared_distance_conv(
              x, kernel, z, strides=g.strides, padding=g.padding,
              input_dilation=g.input_dilation,
              kernel_dilation=g.kernel_dilation,
              feature_group_count=g.feature_group_count)
        else:
          d2 = distill.squared_distance_dense(x, kernel, z)
        feats[layer.name] = distill.gaussian_kernel(d2)
      return jax.lax.stop_gradient(feats)

    def student_features(seen, align_params):
      feats = {}
      for layer in layers:
        module, _, out = seen[layer.path]
        y = _bias_free(module, out)
        f = distill.laplace_kernel(y) if options['kernel'] else _scaled(y)
        feats[layer.name] = (_align(align_params[layer.name], f)
                             if options['align'] else f)
      return feats

    def step(state: PKKDState, batch: dict) -> tuple[PKKDState, dict]:
      images = steps.normalize(batch['image'], exp.mean, exp.std, exp.dtype)
      labels = batch['label']
      key = jax.random.fold_in(
          jax.random.wrap_key_data(state.rng, impl=steps.PRNG_IMPL),
          state.step)
      t_variables = {'batch_stats': state.teacher_batch_stats}

      # The teacher: on the labels (joint), or fixed in eval mode.
      if joint:
        def teacher_loss(t_params):
          (logits, updates), seen, geometry = run_recording(
              teacher.apply, {'params': t_params, **t_variables}, images,
              True, ['batch_stats'])
          return (losses.cross_entropy(logits, labels),
                  (logits, updates, teacher_features(seen, geometry)))
        if policy is not None:
          teacher_loss = jax.checkpoint(teacher_loss, policy=policy)
        (_, (t_logits, t_updates, t_feats)), t_grads = jax.value_and_grad(
            teacher_loss, has_aux=True)(state.teacher_params)
        t_grads = parallel.axis_mean(t_grads, axis_name)
        t_stats = parallel.axis_mean(t_updates['batch_stats'], axis_name)
        t_step, t_opt = teacher_tx.update(t_grads, state.teacher_opt_state,
                                          state.teacher_params)
        t_params = optax.apply_updates(state.teacher_params, t_step)
      else:
        t_logits, seen, geometry = run_recording(
            teacher.apply, {'params': state.teacher_params, **t_variables},
            images, False, False)
        t_feats = teacher_features(seen, geometry)
        t_params, t_stats = state.teacher_params, state.teacher_batch_stats
        t_opt = state.teacher_opt_state
      t_logits = jax.lax.stop_gradient(t_logits)

      # The student: the config's objective plus the distillation terms.
      def student_loss(trainable):
        params, align_params = trainable
        (logits, updates), seen, _ = run_recording(
            exp.model.apply,
            {'params': params, 'batch_stats': state.batch_stats}, images,
            True, mutable)
        s_feats = student_features(seen, align_params)
        terms = objective.terms + (
            losses.LossTerm('pkkd_feature', float(options['feature_weight']),
                            lambda out: sum(
                                distill.feature_loss(s_feats[k], t_feats[k])
                                for k in sorted(s_feats))),
            losses.LossTerm('pkkd_kd', float(options['kd_weight']),
                            lambda out: distill.kd_loss(
                                out.logits, t_logits,
                                options['temperature'])))
        loss, extra = dataclasses.replace(objective, terms=terms)(
            losses.StepOutputs(
                logits=logits, labels=labels, images=images,
                intermediates=updates.get('intermediates', {}), key=key))
        return loss, (logits, updates, extra)

      if policy is not None:
        student_loss = jax.checkpoint(student_loss, policy=policy)
      (_, (logits, updates, extra)), (grads, a_grads) = jax.value_and_grad(
          student_loss, has_aux=True)((state.params, state.align_params))
      grads, a_grads = parallel.axis_mean((grads, a_grads), axis_name)
      batch_stats = parallel.axis_mean(
          updates.get('batch_stats', state.batch_stats), axis_name)
      updates_, opt_state = exp.tx.update(grads, state.opt_state,
                                          state.params)
      params = optax.apply_updates(state.params, updates_)
      a_updates, a_opt = align_tx.update(a_grads, state.align_opt_state,
                                         state.align_params)
      align_params = optax.apply_updates(state.align_params, a_updates)

      metrics = losses.classification_metrics(logits, labels)
      count = jnp.asarray(labels.shape[0], jnp.float32)
      metrics.update({k: v * count for k, v in extra.items()})
      t_metrics = losses.classification_metrics(t_logits, labels)
      metrics.update({f'teacher/{k}': v for k, v in t_metrics.items()
                      if k != 'count'})
      metrics = parallel.axis_sum(metrics, axis_name)
      return state.replace(
          step=state.step + 1, params=params, batch_stats=batch_stats,
          opt_state=opt_state, teacher_params=t_params,
          teacher_batch_stats=t_stats, teacher_opt_state=t_opt,
          align_params=align_params, align_opt_state=a_opt), metrics
    return step

  def eval_step_fn(self, exp) -> Callable:
    """The student's metrics, and the teacher's as ``teacher/...``."""
    student = super().eval_step_fn(exp)
    teacher = _teacher_model(exp.model)
    axis_name = exp.runner.axis_name

    def step(state: PKKDState, batch: dict) -> dict:
      metrics = student(state, batch)
      images = steps.normalize(batch['image'], exp.mean, exp.std, exp.dtype)
      t_logits = teacher.apply({'params': state.teacher_params,
                                'batch_stats': state.teacher_batch_stats},
                               images, train=False, mutable=False)
      t_metrics = parallel.axis_sum(losses.classification_metrics(
          t_logits, batch['label'], batch['mask']), axis_name)
      metrics.update({f'teacher/{k}': v for k, v in t_metrics.items()
                      if k != 'count'})
      return metrics
    return step


methods.register_method(PKKD())
