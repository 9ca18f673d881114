"""ResNet-20 on CIFAR-10: official recipe, 400 epochs (paper AdderNet: 91.84 %).

Kinds: ``:cnn``, ``:adder`` (default), ``:bnn``; ``:runlocal`` shrinks it.
Needs the TFDS dataset ``cifar10`` prepared (array_record), see the README.
"""

from experiments.configs import default


def get_config(arg=None):
  return default.cifar_config(arg, model='resnet20', dataset='cifar10')
