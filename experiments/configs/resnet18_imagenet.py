"""ResNet-18 on ImageNet: cosine over 150 epochs (paper AdderNet: 67.0 / 87.6 %).

Kinds: ``:cnn``, ``:adder`` (default), ``:bnn``; ``:runlocal`` shrinks it.
Needs the TFDS dataset ``imagenet2012`` prepared (array_record), see the
README.
"""

from experiments.configs import default


def get_config(arg=None):
  return default.imagenet_config(arg, model='resnet18')
