"""ResNet-32 on CIFAR-100: official recipe, 400 epochs (paper AdderNet: 69.02 %).

Kinds: ``:cnn``, ``:adder`` (default), ``:bnn``; ``:runlocal`` shrinks it.
Needs the TFDS dataset ``cifar100`` prepared (array_record), see the README.
"""

from experiments.configs import default


def get_config(arg=None):
  return default.cifar_config(arg, model='resnet32', dataset='cifar100')
