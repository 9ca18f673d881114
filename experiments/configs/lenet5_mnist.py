"""LeNet-5-BN on MNIST (paper: CNN 99.4 %, AdderNet 99.4 %).

The default trains a few epochs (the README's main job, minutes on 2 CPU
cores); ``:full`` gives the paper's 50 epochs. Kinds: ``:cnn``, ``:adder``
(default), ``:bnn``; ``:runlocal`` shrinks it.
"""

from experiments.configs import default

QUICK_EPOCHS = 3


def get_config(arg=None):
  return default.mnist_config(arg, quick_epochs=QUICK_EPOCHS)
