"""ResNet-50 on ImageNet: cosine over 150 epochs (paper AdderNet: 74.9 / 91.7 %).

Kinds: ``:cnn``, ``:adder`` (default), ``:bnn``; ``:runlocal`` shrinks it.
Needs the TFDS dataset ``imagenet2012`` prepared (array_record), see the
README.
"""

from experiments.configs import default


def get_config(arg=None):
  return default.imagenet_config(arg, model='resnet50')
