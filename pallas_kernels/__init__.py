"""Pallas kernels for the adder (l1) reductions, GPU (Triton) and TPU (Mosaic).

A leaf package: it imports nothing from ``adderjax``. The adapter that
makes these kernels the ``'pallas'``, ``'pallas_gpu_interpret'`` and
``'pallas_tpu_interpret'`` implementations of ``adderjax.adder_conv`` /
``adder_dense`` is :mod:`adderjax.ops.pallas_backend`. The kernel functions
can also be called directly on the canonical patch layout (``P[G, K, M]``,
``W[G, K, T]``):

Examples:
  >>> import jax.numpy as jnp
  >>> import pallas_kernels
  >>> p, w = jnp.ones((1, 3, 5)), jnp.zeros((1, 3, 2))
  >>> pallas_kernels.adder_tpu.l1_forward(p, w, interpret=True).shape
  (1, 2, 5)
"""

from pallas_kernels import adder_gpu
from pallas_kernels import adder_gpu_config
from pallas_kernels import adder_tpu
from pallas_kernels import adder_tpu_config

__all__ = ['adder_gpu', 'adder_gpu_config', 'adder_tpu', 'adder_tpu_config']
