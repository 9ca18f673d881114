"""A small ViT on MNIST: multiplying, adder-linear and full adder attention.

Shu et al. (NeurIPS 2021, "Adder Attention for Vision Transformer") measure
adder ViTs on MNIST; this config trains :class:`adderjax.models.ViT`
(``vit_tiny``: 7x7 patches, 16 tokens, width 64, 4 blocks of 4 heads, MLP
128) with the LeNet-5 recipe of the paper (SGD momentum 0.9, lr 0.1 cosine,
batch 256, the adaptive learning rate on every adder kernel), a few epochs
by default and 50 with ``:full``; the BatchNorm statistics are recomputed
before each evaluation (``bn_recalibration_batches``).

Config argument tokens, besides the common ones (``cnn`` / ``adder``,
``runlocal``, ``full``, the method tokens):

* ``cnn``: the multiplying ViT (dot-product attention: ``attention='auto'``
  follows the kind, also when the kind is set with ``--config.model.kind``);
* ``adder``: adder projections and MLPs with l1 attention scores and the
  identity fix (``identity='output'``), the full adder ViT;
* ``dot``: with ``adder``, dot-product scores (the "adder-linear" ViT);
* ``noid``: l1 scores without the identity fix;
* ``idlogits``: the identity added to the logits before the softmax.

Examples:
  >>> c = get_config('adder,noid')
  >>> c.model.name, c.model.overrides.attention, c.model.overrides.identity
  ('vit_tiny', 'auto', 'none')
"""

from experiments.configs import default

QUICK_EPOCHS = 3

#: This config's own tokens -> model overrides.
VIT_TOKENS = {
    'dot': {'attention': 'dot'},
    'noid': {'identity': 'none'},
    'idlogits': {'identity': 'logits'},
}


def get_config(arg=None):
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  own = [t for t in tokens if t in VIT_TOKENS]
  rest = ','.join(t for t in tokens if t not in VIT_TOKENS)
  try:
    c = default.mnist_config(rest, quick_epochs=QUICK_EPOCHS,
                             model='vit_tiny')
  except ValueError as e:  # name this config's own tokens too
    raise ValueError(f'{e} vit_mnist also takes {sorted(VIT_TOKENS)}.') from e
  for token in own:
    c.model.overrides.update(VIT_TOKENS[token])
  # [not fixed] BatchNorm statistics recomputed from 50 training batches
  # before each evaluation, for every variant: the adder layers' output
  # statistics drift faster than the running averages follow (3-epoch
  # adder ViT: 93.45 % with the running averages, 96.30 % recomputed; the
  # CNN ViT's train and test accuracy agree either way).
  c.bn_recalibration_batches = 2 if 'runlocal' in tokens else 50
  return c
