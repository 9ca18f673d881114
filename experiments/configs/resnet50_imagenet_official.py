"""ResNet-50 on ImageNet with the official checkpoint's head (fc with bias).

``resnet50_imagenet`` plus ``model.overrides.classifier_bias=True``: the
official ResNet-50's classifier is a 1x1 convolution with a bias. The config
of a converted ``ResNet50-AdderNet.pth`` (``experiments.convert_official``)
and of fine-tuning it (``--init_from``). Kinds and ``:runlocal`` as
``resnet50_imagenet``.
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.imagenet_config(arg, model='resnet50')
  c.model.overrides.classifier_bias = True
  return c
