"""Every config key, with defaults; the experiment configs override it.

Values marked ``[not fixed]`` are not set by the paper (Chen et al., "AdderNet:
Do We Really Need Multiplications in Deep Learning?", CVPR 2020) or its
official code (github.com/huawei-noah/AdderNet); they are our choice.

``python -m experiments.main --help`` lists every key with its default
(:func:`describe_keys`).

Config arguments (``--config experiments/configs/<name>.py:ARG``) are a
comma-separated list of tokens, parsed by :func:`parse_arg`:

* ``cnn`` / ``adder`` / ``bnn``: the model kind (also ``--config.model.kind``);
* ``runlocal``: shrink everything for a quick local run (small model, few
  steps; still needs the dataset);
* ``full``: the paper's full schedule where the default is shortened (MNIST);
* a variant of :data:`TOKENS` (``pkkd``, ``adv``, ``slac``): a training method
  or a model variant, set on top of the experiment's own settings
  (:func:`apply_tokens`), so ``lenet5_mnist.py:pkkd`` and
  ``resnet20_cifar10.py:adv`` work the same way on every config.

Examples:
  >>> parse_arg('cnn,runlocal')
  {'kind': 'cnn', 'runlocal': True, 'full': False, 'variants': ()}
  >>> parse_arg('adder,pkkd')['variants']
  ('pkkd',)
  >>> get_config().model.kind
  'adder'
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

KINDS = ('cnn', 'adder', 'bnn')


def _pkkd(c: ml_collections.ConfigDict) -> None:
  """Kernel-based progressive distillation (Xu et al., NeurIPS 2020).

  A CNN twin of the same architecture trains beside the adder student
  (``teacher='joint'``) or is read from a finished run
  (``teacher='workdir'`` with ``teacher_workdir``); see
  :mod:`experiments.distillation` for every option.
  """
  c.method = 'pkkd'
  c.method_options = ml_collections.ConfigDict({
      'teacher': 'joint',        # 'joint' (trained together) | 'workdir'
      'teacher_workdir': '',     # a finished CNN run (teacher='workdir')
      'kernel': True,            # [not fixed] kernel maps on / raw features
      'layers': 'all',           # [not fixed] 'all' | 'last' | '0,2,...'
      'feature_weight': 1.0,     # [not fixed]
      'kd_weight': 1.0,          # [not fixed] output distillation
      'temperature': 4.0,        # [not fixed]
      'align': True,             # [not fixed] learned 1x1 linear transform
  })


def _adv(c: ml_collections.ConfigDict) -> None:
  """Adversarial training with PGD examples made in the step (Madry et
  al.); see :mod:`experiments.adversarial` for every option."""
  mnist = c.dataset.name in ('mnist', 'idx')
  c.method = 'adversarial'
  c.method_options = ml_collections.ConfigDict({
      'attack': 'pgd',
      # Pixel space ([0, 1]); the usual budgets: 0.3 on MNIST, 8/255 else.
      'epsilon': 0.3 if mnist else 8 / 255,
      'steps': 7,
      'step_size': 0.1 if mnist else 2 / 255,
      'random_start': True,
      # The loss is clean_weight * clean + (1 - clean_weight) * adversarial.
      'clean_weight': 0.0,
  })


def _slac(c: ml_collections.ConfigDict) -> None:
  """The skew-Laplace classifier head (Dong et al., NeurIPS 2021) and its
  losses: L = L_c + 0.01 L_nll + 0.1 L_ac, the Sigma learning rate / 100."""
  c.model.overrides.head = 'slac'
  c.loss_terms = 'slac_nll=0.01,slac_ac=0.1'
  c.optimizer.lr_scales = 'sigma=0.01'


#: Config-argument tokens that set a training method or a model variant on
#: any experiment config: token -> ``fn(config)``, applied last.
TOKENS = {'pkkd': _pkkd, 'adv': _adv, 'slac': _slac}


def parse_arg(arg: str | None) -> dict:
  """Parses the config argument string (see module docstring).

  Raises:
    ValueError: an unknown token.
  """
  out = {'kind': None, 'runlocal': False, 'full': False}
  variants = []
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token in KINDS:
      out['kind'] = token
    elif token in ('runlocal', 'full'):
      out[token] = True
    elif token in TOKENS:
      if token not in variants:
        variants.append(token)
    else:
      raise ValueError(f'unknown config argument {token!r}; use a kind '
                       f'{KINDS}, runlocal, full or one of {sorted(TOKENS)}.')
  out['variants'] = tuple(variants)
  return out


def apply_tokens(c: ml_collections.ConfigDict, arg: str | None) -> None:
  """Applies the :data:`TOKENS` of the config argument ``arg`` to ``c``.

  Raises:
    ValueError: two tokens that set different training methods.

  Examples:
    >>> c = get_config()
    >>> apply_tokens(c, 'pkkd')
    >>> c.method, c.method_options.teacher
    ('pkkd', 'joint')
  """
  variants = parse_arg(arg)['variants']
  for token in variants:
    before = c.method
    TOKENS[token](c)
    if before != 'supervised' and c.method != before:
      raise ValueError(f'config arguments {list(variants)}: {token!r} sets '
                       f'method {c.method!r} after {before!r}; a run has one '
                       'training method.')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config: every key the training loop reads."""
  args = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'lenet5_bn'     # adderjax.models name, or 'module:factory'
  c.model.kind = args['kind'] or 'adder'
  c.model.dtype = 'float32'
  # BatchNorm running-average momentum, Flax convention (PyTorch's 0.1).
  c.model.bn_momentum = 0.9
  c.model.grad = config_dict.placeholder(str)  # adder gradient mode
  c.model.implementation = config_dict.placeholder(str)  # adder backend
  c.model.overrides = ml_collections.ConfigDict()  # other model fields

  c.dataset = ml_collections.ConfigDict()
  # 'mnist' (IDX files, sha256-checked against MNIST's), 'idx' (any dataset
  # in MNIST's IDX format), 'cifar10', 'cifar100', 'imagenet2012'.
  c.dataset.name = 'mnist'
  c.dataset.data_dir = 'data/mnist'          # MNIST-format IDX files
  c.dataset.tfds_data_dir = config_dict.placeholder(str)  # TFDS data_dir
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.num_classes = 10
  c.dataset.image_size = 28
  c.dataset.augment = False
  c.dataset.eval_resize = 256                # ImageNet eval: resize, crop
  c.dataset.num_workers = 8                  # decoding threads (ImageNet)
  c.dataset.prefetch = 2                     # batches prepared ahead
  c.dataset.max_train_examples = -1          # >0: use the first N only
  c.dataset.max_eval_examples = -1
  # Per-channel normalisation of [0, 1] pixels; None: the dataset's known
  # values (MNIST, CIFAR, ImageNet), or computed from the training set (idx).
  c.dataset.mean = config_dict.placeholder(tuple)
  c.dataset.std = config_dict.placeholder(tuple)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.eta = 0.2                      # adaptive LR (official code)
  c.optimizer.scaling = 'adaptive'           # 'adaptive' | 'ilr' | 'none'
  c.optimizer.ilr_factor = config_dict.placeholder(float)
  # 'cosine_epoch': the official per-epoch cosine; 'cosine_step': smooth.
  c.optimizer.schedule = 'cosine_epoch'
  # Per-parameter learning-rate factors, 'name=factor,...': every parameter
  # whose path contains a path component 'name' has its update scaled
  # (e.g. 'sigma=0.01' for the SLAC head's Sigma).
  c.optimizer.lr_scales = ''

  c.num_epochs = 50
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.steps_per_epoch = -1    # >0: shorter epochs (runlocal)
  c.num_train_steps = -1    # >0: stop after this many steps (schedule kept)
  c.parallelism = 'jit'     # 'jit' (mesh + NamedSharding) or 'pmap'
  # The jit runner's mesh: sizes (one -1 = the rest) and axis names; the
  # batch is split over every axis (experiments.parallel.make_mesh).
  c.mesh_shape = (-1,)
  c.mesh_axes = ('data',)
  # Activation recompute in the train step: 'layer_outputs' keeps only the
  # layers' outputs (and small reductions) from the forward pass and
  # recomputes the elementwise ops between layers in the backward pass
  # (adderjax.layer_outputs_saveable); 'none' keeps what XLA keeps; 'auto'
  # is 'layer_outputs' on GPU/TPU and 'none' on CPU (steps.resolve_remat).
  c.remat = 'auto'
  # ResNets: recompute whole residual blocks in the backward pass (their
  # adder forwards run again): 'none', 'all', or stage numbers counted from
  # 1 ('1,2'); 'auto' is, with remat='auto', the choice measured for the
  # model on TPU (steps.TPU_AUTO_REMAT; ResNet-20's AddNN: stages 1-2) and
  # 'none' elsewhere.
  c.remat_blocks = 'auto'
  # The training method (experiments.methods.METHODS): how the state is
  # made and what one step does; 'supervised' is the paper's.
  c.method = 'supervised'
  # The method's own settings (set by a method token, e.g. ':pkkd'; each
  # method names the keys it takes).
  c.method_options = ml_collections.ConfigDict()
  # Extra loss terms, 'name=weight,...' (experiments.losses.TERMS), e.g.
  # 'logit_l2=0.01'; each is logged as train/loss/<name>.
  c.loss_terms = ''

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = -1   # <=0: at the end of every epoch
  c.max_to_keep = 2
  c.async_checkpointing = True
  c.progress_bar = True
  c.tensorboard = True
  # >0: recompute BN statistics over N training batches before each eval.
  c.bn_recalibration_batches = 0
  return c


def describe_keys(config: ml_collections.ConfigDict | None = None,
                  prefix: str = '') -> list[str]:
  """``key = default`` lines for every config key (for ``--help``).

  Examples:
    >>> 'optimizer.learning_rate = 0.1' in describe_keys()
    True
  """
  config = get_config() if config is None else config
  lines = []
  for key in sorted(config.keys()):
    value = config[key]
    if (isinstance(value, ml_collections.ConfigDict) and
        prefix + key != 'model.overrides'):
      lines.extend(describe_keys(value, f'{prefix}{key}.'))
    else:
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      lines.append(f'{prefix}{key} = {value!r}')
  return lines


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> None:
  """Common ``runlocal`` settings: a few short epochs, small batches."""
  c.num_epochs = 2
  c.steps_per_epoch = 10
  c.batch_size = 32
  c.eval_batch_size = 64
  c.dataset.max_eval_examples = 256
  c.log_every_steps = 5


# ----------------------------------------------------------------------------
# Builders shared by the experiment configs.

# Model fields per architecture, written out so that they can be overridden
# from the command line (e.g. --config.model.overrides.width=8).
_ARCH = {
    'lenet5_bn': {'pool': 'max'},
    'vgg_small': {'widths': (128, 256, 512)},
    'resnet20': {'stage_sizes': (3, 3, 3), 'width': 16},
    'resnet32': {'stage_sizes': (5, 5, 5), 'width': 16},
    'resnet18': {'stage_sizes': (2, 2, 2, 2), 'width': 64},
    'resnet50': {'stage_sizes': (3, 4, 6, 3), 'width': 64},
    # 'attention': 'auto' (l1 for the adder kind, dot for cnn) | 'l1' |
    # 'dot'; 'identity': 'output' | 'logits' | 'none'.
    'vit_tiny': {'patch_size': 7, 'hidden': 64, 'depth': 4, 'num_heads': 4,
                 'mlp_dim': 128, 'attention': 'auto', 'identity': 'output'},
}
_RUNLOCAL_ARCH = {
    'lenet5_bn': {},
    'vgg_small': {'widths': (8, 16, 32)},
    'resnet20': {'stage_sizes': (1, 1, 1), 'width': 8},
    'resnet32': {'stage_sizes': (1, 1, 1), 'width': 8},
    'resnet18': {'stage_sizes': (1, 1, 1, 1), 'width': 8},
    'resnet50': {'stage_sizes': (1, 1, 1, 1), 'width': 8},
    'vit_tiny': {'hidden': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 16},
}


def _set_model(c, name: str, runlocal: bool) -> None:
  c.model.name = name
  c.model.overrides = ml_collections.ConfigDict(dict(_ARCH[name]))
  if runlocal:
    c.model.overrides.update(_RUNLOCAL_ARCH[name])


def mnist_config(arg: str | None, quick_epochs: int,
                 model: str = 'lenet5_bn') -> ml_collections.ConfigDict:
  """A model (LeNet-5-BN) on MNIST with the paper's recipe (lr 0.1 cosine,
  batch 256).

  The default runs ``quick_epochs`` (minutes on 2 CPU cores); the ``full``
  argument gives the paper's 50 epochs.
  """
  args = parse_arg(arg)
  c = get_config(arg)
  _set_model(c, model, args['runlocal'])
  c.dataset.name = 'mnist'
  c.dataset.data_dir = 'data/mnist'
  c.dataset.num_classes = 10
  c.dataset.image_size = 28
  c.dataset.augment = False        # [not fixed] no augmentation
  c.optimizer.learning_rate = 0.1  # paper
  c.optimizer.momentum = 0.9       # [not fixed] as CIFAR
  c.optimizer.weight_decay = 5e-4  # [not fixed] as CIFAR
  c.batch_size = 256               # paper
  c.num_epochs = 50 if args['full'] else quick_epochs  # paper: 50
  c.eval_batch_size = 1000         # [not fixed] any divisor of 10000
  c.log_every_steps = 50
  if args['runlocal']:
    shrink_for_runlocal(c)
  apply_tokens(c, arg)
  return c


def cifar_config(arg: str | None, model: str,
                 dataset: str) -> ml_collections.ConfigDict:
  """A CIFAR-10/100 experiment with the official code's recipe."""
  args = parse_arg(arg)
  c = get_config(arg)
  _set_model(c, model, args['runlocal'])
  c.dataset.name = dataset
  c.dataset.num_classes = {'cifar10': 10, 'cifar100': 100}[dataset]
  c.dataset.image_size = 32
  c.dataset.augment = True          # crop 32 with 4-pixel pad + flip
  c.optimizer.learning_rate = 0.1   # 0.05 * (1 + cos(pi * epoch / 400))
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = 'cosine_epoch'  # official: set once per epoch
  c.batch_size = 256
  c.num_epochs = 400
  c.eval_batch_size = 400           # [not fixed]; divides 10000
  c.log_every_steps = 50
  if args['runlocal']:
    shrink_for_runlocal(c)
  apply_tokens(c, arg)
  return c


def imagenet_config(arg: str | None, model: str) -> ml_collections.ConfigDict:
  """An ImageNet experiment (the standard ResNet recipe, as the paper)."""
  args = parse_arg(arg)
  c = get_config(arg)
  _set_model(c, model, args['runlocal'])
  c.dataset.name = 'imagenet2012'
  c.dataset.eval_split = 'validation'
  c.dataset.num_classes = 1000
  c.dataset.image_size = 224        # eval: resize 256, centre crop 224
  c.dataset.eval_resize = 256
  c.dataset.augment = True          # random resized crop 224 + flip
  c.optimizer.learning_rate = 0.1   # [not fixed] standard ResNet, batch 256
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = 'cosine_step'  # [not fixed] granularity
  c.batch_size = 256
  c.num_epochs = 150
  c.eval_batch_size = 256           # [not fixed]; last batch padded
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000   # [not fixed] ~0.4 epoch
  if args['runlocal']:
    shrink_for_runlocal(c)
    c.dataset.image_size = 64
    c.dataset.eval_resize = 73
  apply_tokens(c, arg)
  return c
