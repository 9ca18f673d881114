"""One experiment, built once from a config: :class:`Experiment`.

Every entry point (train, evaluate, quantize, aot, convert_official,
reproduce, the model benchmarks) asks :meth:`Experiment.from_config` for the
chain config -> runner (mesh, devices) -> data -> model -> optimizer ->
objective -> initial state -> compiled steps; none types it out again.

* ``Experiment.from_config(config)`` reads the data (``config.dataset``).
* ``Experiment.from_config(config, data=False)`` needs no data on disk: the
  image shape, class count and normalisation come from the config and the
  known datasets (:func:`experiments.data.dataset_spec`). That is what the
  ahead-of-time compile (:mod:`experiments.aot`) and the model benchmarks use.

The optimizer is the paper's recipe (:func:`adderjax.optim.addernet_sgd`:
adaptive learning rate on the adder kernels, weight decay, SGD momentum) with
the official cosine schedule over ``config.num_epochs``.

Examples:
  >>> from experiments.configs import lenet5_mnist
  >>> c = lenet5_mnist.get_config('runlocal')
  >>> exp = Experiment.from_config(c, data=False)
  >>> exp.image_shape, exp.num_classes
  ((28, 28, 1), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adderjax import models
from adderjax import optim
from experiments import adversarial  # registers the 'adversarial' method
from experiments import checkpointing
from experiments import data as data_lib
from experiments import distillation  # registers the pkkd method
from experiments import errors
from experiments import losses
from experiments import lr_scales
from experiments import methods
from experiments import parallel
from experiments import steps
from experiments.configs import default as default_config

PyTree = Any


# ----------------------------------------------------------------------------
# Config.


def _flat_keys(config: ml_collections.ConfigDict, prefix='') -> set[str]:
  keys = set()
  for k, v in config.items():
    key = prefix + k
    # model.overrides go to the model, method_options to the method: each
    # checks its own keys.
    if isinstance(v, ml_collections.ConfigDict) and key not in (
        'model.overrides', 'method_options'):
      keys |= _flat_keys(v, key + '.')
    else:
      keys.add(key)
  return keys


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming unknown keys or out-of-range values.

  Keys are checked against ``experiments/configs/default.py`` (everything
  under ``model.overrides`` is passed to the model, which checks it).

  Raises:
    experiments.errors.ConfigError: the first problem found.
  """
  known = _flat_keys(default_config.get_config())
  unknown = sorted(_flat_keys(config) - known)
  if unknown:
    raise errors.ConfigError(
        f'unknown config key(s) {unknown}; valid keys are in '
        'experiments/configs/default.py (python -m experiments.main --help '
        'lists them).')
  missing = sorted(known - _flat_keys(config))
  if missing:
    raise errors.ConfigError(f'config lacks key(s) {missing}; derive configs '
                             'from experiments/configs/default.py.')
  if config.model.kind not in ('cnn', 'adder', 'bnn'):
    raise errors.ConfigError(f"model.kind {config.model.kind!r}: use 'cnn', "
                             "'adder' or 'bnn'.")
  if config.remat not in steps.REMAT_CHOICES:
    raise errors.ConfigError(f'remat {config.remat!r}: use one of '
                             f'{steps.REMAT_CHOICES}.')
  try:
    blocks = steps.parse_remat_blocks(config.remat_blocks)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if blocks not in ('auto', False):
    if 'remat_blocks' in config.model.overrides:
      raise errors.ConfigError(
          f'remat_blocks {config.remat_blocks!r} and '
          f'model.overrides.remat_blocks '
          f'{config.model.overrides.remat_blocks!r} both set; keep one.')
    if 'stage_sizes' not in config.model.overrides:
      raise errors.ConfigError(
          f'remat_blocks {config.remat_blocks!r}: model '
          f'{config.model.name!r} has no residual stages to recompute '
          "(ResNets only); use 'auto' or 'none'.")
  if config.parallelism not in ('jit', 'pmap'):
    raise errors.ConfigError(f"parallelism {config.parallelism!r}: use 'jit' "
                             "or 'pmap'.")
  if config.optimizer.schedule not in ('cosine_epoch', 'cosine_step'):
    raise errors.ConfigError(
        f'optimizer.schedule {config.optimizer.schedule!r}: use '
        "'cosine_epoch' (official) or 'cosine_step'.")
  for key in ('num_epochs', 'batch_size', 'eval_batch_size',
              'log_every_steps', 'eval_every_epochs', 'max_to_keep'):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise errors.ConfigError(f'{key} must be a positive int, got '
                               f'{value!r}.')
  if config.bn_recalibration_batches < 0:
    raise errors.ConfigError('bn_recalibration_batches must be >= 0, got '
                             f'{config.bn_recalibration_batches}.')
  lr = config.optimizer.learning_rate
  if not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
    raise errors.ConfigError('optimizer.learning_rate must be a finite '
                             f'number > 0, got {lr!r}.')
  methods.get_method(config.method).options(config)
  try:
    lr_scales.parse_lr_scales(config.optimizer.lr_scales)
  except ValueError as e:
    raise errors.ConfigError(f'optimizer.{e}') from e
  try:
    terms = losses.parse_terms(config.loss_terms)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  slac_terms = [name for name, _ in terms if name.startswith('slac_')]
  if (slac_terms and ':' not in config.model.name
      and config.model.overrides.get('head', 'dense') != 'slac'):
    raise errors.ConfigError(
        f'loss_terms {slac_terms} read the SLAC head, but the model has '
        f"head={config.model.overrides.get('head', 'dense')!r}: set "
        "--config.model.overrides.head=slac (or use the :slac config "
        'argument).')


def to_python(value):
  """ConfigDicts and lists of a config as plain dicts and tuples."""
  if isinstance(value, list):
    return tuple(to_python(v) for v in value)
  if isinstance(value, ml_collections.ConfigDict):
    return {k: to_python(v) for k, v in value.items()}
  return value


class UntrustedCodeError(errors.UserError, PermissionError):
  """A workdir's config names code to import, and it is not trusted."""


def load_run_config(workdir: str,
                trust_code: bool = False) -> ml_collections.ConfigDict:
  """The config a run stored in ``workdir/config.json``.

  Args:
    workdir: the run directory.
    trust_code: allow ``model.name='module:factory'``, which imports that
      module and calls the factory when the model is built. A workdir may
      come from someone else: by default only the model zoo is allowed.

  Raises:
    experiments.errors.UserError: no run in ``workdir``, an unreadable
      config.json, or a ``module:factory`` model without ``trust_code``.
  """
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not os.path.exists(path):
    raise checkpointing.NoRunError(f'{path} not found: {workdir} holds no '
                                   'run.')
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError('not a JSON object')
  except ValueError as e:
    raise checkpointing.WorkdirMismatchError(
        f'{path} is not a valid config ({e}).') from e
  name = stored.get('model', {}).get('name', '')
  if isinstance(name, str) and ':' in name and not trust_code:
    raise UntrustedCodeError(
        f"{path} sets model.name={name!r}, which would import module "
        f"{name.split(':')[0]!r} and run its code; a workdir's config may "
        'only name a model of the zoo. Pass --trust_workdir_code if you '
        'trust this workdir.')
  config = default_config.get_config()
  overrides = stored.get('model', {}).pop('overrides', {})
  flat = checkpointing.flatten(stored)
  with config.unlocked():
    for key, value in flat.items():
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = to_python(value) if isinstance(value, list) else value
    config.model.overrides = ml_collections.ConfigDict(
        {k: to_python(v) for k, v in overrides.items()})
  return config


# ----------------------------------------------------------------------------
# The parts.


def make_runner(config: ml_collections.ConfigDict, devices=None):
  """The config's runner (``parallelism``, ``mesh_shape``, ``mesh_axes``).

  Raises:
    experiments.errors.ConfigError: the mesh does not fit the devices.
  """
  try:
    return parallel.make_runner(
        config.parallelism, devices=devices,
        mesh_shape=tuple(config.mesh_shape),
        mesh_axes=tuple(config.mesh_axes))
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e


def _config_error(section: str, values: ml_collections.ConfigDict,
                  error: Exception) -> errors.ConfigError:
  """``error`` of the library as a ConfigError naming ``section.KEY``.

  Examples:
    >>> c = ml_collections.ConfigDict({'momentum': 1.5})
    >>> str(_config_error('optimizer', c, ValueError('momentum must be < 1')))
    'optimizer.momentum must be < 1'
    >>> str(_config_error('optimizer', c, ValueError('bad schedule')))
    'optimizer: bad schedule'
  """
  text = ' '.join(str(error).split())
  word = re.match(r'\w+', text)
  if word and word.group() in values:
    return errors.ConfigError(f'{section}.{text}')
  return errors.ConfigError(f'{section}: {text}')


def create_model(model_config, num_classes: int) -> nn.Module:
  """Builds ``config.model``: a zoo name, or ``'package.module:factory'``.

  The factory is called as ``factory(name?, kind=, num_classes=, dtype=,
  bn_momentum=, **overrides)`` (zoo: :func:`adderjax.models.create_model`).
  A config read from a workdir (:func:`load_run_config`) may only name the zoo
  unless the user trusts it.

  Raises:
    experiments.errors.ConfigError: the model rejects the config's fields.
  """
  try:
    dtype = jnp.dtype(model_config.dtype)
  except TypeError as e:
    raise errors.ConfigError(
        f'model.dtype {model_config.dtype!r} is not a dtype; use '
        "'float32', 'bfloat16' or 'float16'.") from e
  kwargs = dict(kind=model_config.kind, num_classes=num_classes,
                dtype=dtype, bn_momentum=model_config.bn_momentum)
  if model_config.grad is not None:
    kwargs['grad'] = model_config.grad
  if model_config.implementation is not None:
    kwargs['implementation'] = model_config.implementation
  kwargs.update(to_python(model_config.overrides))
  name = model_config.name
  if ':' in name:
    module_name, attr = name.split(':', 1)
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)
  try:
    return models.create_model(name, **kwargs)
  except (TypeError, ValueError, KeyError) as e:
    raise errors.ConfigError(
        f'model {name!r} ({model_config.kind}): '
        f'{" ".join(str(e).split())}') from e


def create_optimizer(config, model: nn.Module, example: jax.Array,
                     steps_per_epoch: int):
  """The paper's optimizer and its learning-rate schedule.

  ``config.optimizer.lr_scales`` (``'name=factor,...'``) scales the updates
  of the parameters with a path component ``name``
  (:func:`experiments.lr_scales.scale_updates`, chained last); empty, the
  optimizer is the paper's chain alone.

  Raises:
    ValueError: a value the optimizer refuses, or an ``lr_scales`` name
      that matches no parameter of ``model``.
  """
  o = config.optimizer
  schedule = optim.cosine_lr_schedule(
      o.learning_rate, num_epochs=config.num_epochs,
      steps_per_epoch=steps_per_epoch,
      per_epoch=o.schedule == 'cosine_epoch')
  mask = optim.adder_mask(model, example, train=False)
  scaling, ilr_factor = o.scaling, o.ilr_factor
  if not any(jax.tree_util.tree_leaves(mask)):
    # A CNN or BNN: no adder kernel for the scaling to act on, so the same
    # SGD without it (addernet_sgd warns about an empty mask otherwise).
    scaling, ilr_factor = 'none', None
  tx = optim.addernet_sgd(
      schedule, mask=mask, momentum=o.momentum,
      weight_decay=o.weight_decay, eta=o.eta, nesterov=o.nesterov,
      scaling=scaling, ilr_factor=ilr_factor)
  if o.lr_scales:
    # Per-parameter learning-rate factors (experiments.lr_scales): the
    # updates of the matched parameters scaled after the whole chain.
    params = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        example)['params']
    tx = optax.chain(tx, lr_scales.scale_updates(params, o.lr_scales))
  return tx, schedule


def tree_mismatches(target: Any, source: Any) -> list[str]:
  """Paths where ``source`` lacks, adds or reshapes a leaf of ``target``.

  Examples:
    >>> tree_mismatches({'a': np.zeros(2), 'b': np.zeros(1)},
    ...                 {'a': np.zeros(3), 'c': np.zeros(1)})
    ["['b']: missing", "['c']: unexpected", "['a']: shape (3,), expected (2,)"]
  """
  def flat(tree):
    return {jax.tree_util.keystr(p): np.shape(v) for p, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}
  t, s = flat(target), flat(source)
  out = [f'{k}: missing' for k in t if k not in s]
  out += [f'{k}: unexpected' for k in s if k not in t]
  out += [f'{k}: shape {s[k]}, expected {t[k]}' for k in t
          if k in s and tuple(s[k]) != tuple(t[k])]
  return out


def numpy_tree(tree: Any) -> Any:
  """Every leaf as a numpy array on the host."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def init_state_from_workdir(workdir: str, host_state: Any, tx) -> Any:
  """``host_state`` with the parameters and BatchNorm statistics of a run.

  Starts training (fine-tuning) from a converted workdir (or any run's
  newest checkpoint): step 0, fresh optimizer state ``tx.init(params)``, the
  run's own RNG key; only ``params`` and ``batch_stats`` are taken.

  Args:
    workdir: the run to read (its newest checkpoint).
    host_state: the new run's initial :class:`experiments.steps.TrainState`
      (numpy arrays, or ``jax.ShapeDtypeStruct`` leaves), whose trees the
      weights must match.
    tx: the new run's optimizer.

  Returns:
    The new initial state.

  Raises:
    FileNotFoundError: ``workdir`` has no checkpoint.
    ValueError: the weights do not fit the new run's model (names the
      missing, unexpected and misshaped variables).
  """
  ckpt = checkpointing.Checkpointer(workdir, primary=False)
  try:
    saved, _ = ckpt.restore_saved()
  finally:
    ckpt.close()
  source = {'params': saved['params'], 'batch_stats': saved['batch_stats']}
  target = {'params': host_state.params,
            'batch_stats': host_state.batch_stats}
  bad = tree_mismatches(target, source)
  if bad:
    raise ValueError(f'the weights of {workdir} do not fit this run\'s '
                     f'model ({len(bad)} mismatches): {bad[:12]}.')
  merged = jax.tree.map(lambda t, s: np.asarray(s, t.dtype), target, source)
  return host_state.replace(params=merged['params'],
                            batch_stats=merged['batch_stats'],
                            opt_state=numpy_tree(tx.init(merged['params'])))


def resolve_config(config: ml_collections.ConfigDict,
                   datasets: data_lib.Datasets) -> ml_collections.ConfigDict:
  """The config as run: the dataset's name and normalisation filled in."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.dataset.name = datasets.name or config.dataset.name
    resolved.dataset.mean = tuple(datasets.mean)
    resolved.dataset.std = tuple(datasets.std)
  return resolved


# ----------------------------------------------------------------------------
# The experiment.


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built from one config.

  Attributes:
    config: the config as run (dataset name and normalisation resolved when
      data was read).
    runner: places state and batches on the devices and compiles the steps
      (:mod:`experiments.parallel`).
    datasets: the train and eval streams (``None`` with ``data=False``).
    model: the Linen model.
    tx: the optimizer.
    schedule: the learning-rate schedule (``step -> rate``).
    objective: what the train step minimises (``config.loss_terms``).
    method: the training method (``config.method``): the state and steps.
    image_shape: ``(H, W, C)`` of one image.
    num_classes: the class count.
    mean: per-channel normalisation mean.
    std: per-channel normalisation standard deviation.
    steps_per_epoch: optimizer steps per epoch.
    stop_step: the step the run trains to.
  """
  config: ml_collections.ConfigDict
  runner: Any
  datasets: data_lib.Datasets | None
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[int], Any]
  objective: losses.Objective
  method: methods.Method
  image_shape: tuple[int, ...]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  steps_per_epoch: int
  stop_step: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, devices=None,
                  data: bool = True,
                  steps_per_epoch: int | None = None) -> 'Experiment':
    """Builds the experiment ``config`` describes (compiles nothing).

    Args:
      config: an experiments config (validated here).
      devices: the devices to run on (default: all; e.g. a TPU topology's
        for an ahead-of-time compile).
      data: read the datasets; ``False`` takes the shapes and the
        normalisation from the config (no files needed).
      steps_per_epoch: without data, the steps per epoch the schedule is
        built for (default: ``config.steps_per_epoch`` if set, else 100).

    Raises:
      experiments.errors.UserError: a bad config, a mesh that does not fit
        the devices, missing or corrupt data.
    """
    validate_config(config)
    runner = make_runner(config, devices)
    try:
      rows = runner.local_rows(config.batch_size)
      eval_rows = runner.local_rows(config.eval_batch_size)
    except ValueError as e:  # the devices do not divide a batch size
      raise errors.ConfigError(str(e)) from e
    if data:
      datasets = data_lib.build_datasets(
          config.dataset, seed=config.seed,
          global_batch_size=config.batch_size,
          eval_batch_size=config.eval_batch_size, rows=rows,
          eval_rows=eval_rows)
      config = resolve_config(config, datasets)
      if config.steps_per_epoch > 0:
        datasets.train.steps_per_epoch = min(config.steps_per_epoch,
                                             datasets.train.steps_per_epoch)
      spe = datasets.train.steps_per_epoch
      image_shape, num_classes = datasets.image_shape, datasets.num_classes
      mean, std = datasets.mean, datasets.std
    else:
      datasets = None
      spec = data_lib.dataset_spec(config.dataset)
      image_shape, num_classes = spec.image_shape, spec.num_classes
      mean, std = spec.mean, spec.std
      spe = steps_per_epoch or (config.steps_per_epoch
                                if config.steps_per_epoch > 0 else 100)
    total_steps = config.num_epochs * spe
    stop_step = (min(total_steps, config.num_train_steps)
                 if config.num_train_steps > 0 else total_steps)
    model_config = config.model
    remat_blocks = steps.resolve_remat_blocks(config, runner.platform)
    if (remat_blocks is not None and 'stage_sizes' in model_config.overrides
        and 'remat_blocks' not in model_config.overrides):
      # e.g. remat_blocks='auto' on TPU (an override in a Python config wins)
      model_config = ml_collections.ConfigDict(model_config.to_dict())
      model_config.overrides.remat_blocks = remat_blocks
    model = create_model(model_config, num_classes)
    example = jnp.zeros((1,) + tuple(image_shape))
    try:
      tx, schedule = create_optimizer(config, model, example, spe)
    except ValueError as e:  # the library rejects a config.optimizer value
      if isinstance(e, errors.UserError):
        raise
      raise _config_error('optimizer', config.optimizer, e) from e
    return cls(config=config, runner=runner, datasets=datasets, model=model,
               tx=tx, schedule=schedule,
               objective=losses.objective_from_spec(config.loss_terms),
               method=methods.get_method(config.method),
               image_shape=tuple(image_shape), num_classes=num_classes,
               mean=tuple(mean), std=tuple(std), steps_per_epoch=spe,
               stop_step=stop_step)

  # -- state ----------------------------------------------------------------

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.config.model.dtype)

  @property
  def data_state(self) -> dict[str, Any]:
    """What fixes the data stream; a resumed run must match it."""
    return {'seed': self.config.seed,
            'steps_per_epoch': self.steps_per_epoch,
            'global_batch_size': self.config.batch_size,
            'num_train_examples': len(self.datasets.train.source)}

  def init_fn(self) -> Callable[[jax.Array], steps.TrainState]:
    """``key -> state`` (the method's; a :class:`steps.TrainState`)."""
    return self.method.init_fn(self)

  def init_key(self) -> jax.Array:
    return jax.random.key(self.config.seed, impl=steps.PRNG_IMPL)

  def init_host_state(self) -> steps.TrainState:
    """The initial state, as numpy arrays (the same on every process)."""
    state = numpy_tree(jax.jit(self.init_fn())(self.init_key()))
    return self.method.prepare_host_state(self, state)

  def abstract_state(self) -> steps.TrainState:
    """The initial state's shapes, placed as the runner places them."""
    return self.runner.abstract_state(
        jax.eval_shape(self.init_fn(), self.init_key()))

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch's shapes, placed as the runner places it."""
    return self.runner.abstract_batch({
        'image': ((self.config.batch_size,) + self.image_shape, jnp.uint8),
        'label': ((self.config.batch_size,), jnp.int32)})

  def adder_mask(self) -> PyTree:
    """True at the adder kernels (:func:`adderjax.optim.adder_mask`)."""
    return optim.adder_mask(self.model, jnp.zeros((1,) + self.image_shape),
                            train=False)

  # -- steps ----------------------------------------------------------------

  def train_step_fn(self, remat: str | None = None) -> Callable:
    """The uncompiled train step (``remat``: default the config's)."""
    remat = steps.resolve_remat(
        self.config.remat if remat is None else remat, self.runner.platform,
        (self.config.model.name, self.config.model.kind))
    return self.method.train_step_fn(self, remat)

  @functools.cached_property
  def train_step(self) -> Callable:
    """The compiled train step ``(state, batch) -> (state, metric sums)``."""
    return self.runner.compile_train(self.train_step_fn())

  @functools.cached_property
  def eval_step(self) -> Callable:
    """The compiled eval step ``(state, batch) -> metric sums``."""
    return self.runner.compile_eval(self.method.eval_step_fn(self))

  @functools.cached_property
  def bn_stats_step(self) -> Callable:
    """The compiled batch-statistics step (BN recalibration)."""
    return self.runner.compile_eval(self.method.bn_stats_step_fn(self))

  # -- running --------------------------------------------------------------

  def put_batch(self, batch: dict[str, np.ndarray],
                global_size: int | None = None) -> Any:
    """This process's rows of a batch, placed on the devices."""
    return self.runner.put_batch(
        batch, self.config.batch_size if global_size is None else global_size)

  def train_batches(self, start: int, stop: int):
    """The training batches of steps ``start`` to ``stop - 1``."""
    return self.datasets.train.iterate(start, stop)

  def evaluate(self, state) -> dict[str, float]:
    """Top-1 / top-5 accuracy and loss over the whole evaluation split."""
    totals = None
    for batch in self.datasets.eval:
      m = self.eval_step(state, self.put_batch(batch,
                                               self.config.eval_batch_size))
      totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    host = self.runner.get_metrics(totals)
    count = float(host['count'])
    out = {'loss': float(host['loss']) / count,
           'top1': float(host['top1']) / count,
           'top5': float(host['top5']) / count}
    # A method's extra figures (e.g. a teacher's 'teacher/top1'): also sums.
    out.update({k: float(v) / count for k, v in sorted(host.items())
                if k not in out and k != 'count'})
    out['count'] = count
    return out

  def recalibrate_batch_stats(self, state, num_batches: int | None = None):
    """Replaces the running statistics by their mean over training batches.

    Uses the first ``num_batches`` (default
    ``config.bn_recalibration_batches``) batches of epoch 0's order (a fixed
    sample, so the result is deterministic). For each batch the model is run
    in training mode from zero running statistics, giving
    ``(1 - m) * stat``.
    """
    if num_batches is None:
      num_batches = self.config.bn_recalibration_batches
    momentum = self.config.model.bn_momentum
    total = None
    for i in range(num_batches):
      batch = self.datasets.train.batch(i % self.datasets.train.steps_per_epoch)
      stats = self.bn_stats_step(state, self.put_batch(batch))
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    scale = 1.0 / (num_batches * (1.0 - momentum))
    return state.replace(
        batch_stats=jax.tree.map(lambda t: t * scale, total))

  def evaluate_state(self, state) -> tuple[Any, dict[str, float]]:
    """Evaluation as the run does it: BN recalibration first if configured.

    Returns:
      ``(state, metrics)``: the state with the recalibrated statistics (or
      as it was), and :meth:`evaluate`'s metrics.
    """
    if self.config.bn_recalibration_batches > 0:
      state = self.recalibrate_batch_stats(state)
    return state, self.evaluate(state)
