"""A direct, materialising JAX implementation of the adder layer's math.

Registered as the ``'test_oracle'`` backend of :mod:`adderjax.ops.backends`
(only used when named), so that whole networks built from the real modules
(zoo models, LeNet++) can run on it and be compared with the tuned backends
under ``jit`` and eagerly. It shares no arithmetic with ``adderjax``: every
formula is the paper's, written out on the ``[G, K, M]`` difference
tensor, with no algebraic identity that could
cancel (``-sum |p - w|``, ``sum gy * clip(w - p, -1, 1)``,
``sum gy * (p - w)``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from adderjax.ops import backends
from adderjax.ops import protocol

NAME = 'test_oracle'


def _h_x(mode, d):
  if mode == 'full_precision':
    return jnp.clip(d, -1.0, 1.0)
  if mode == 'sign':
    return jnp.sign(d)
  return d


class OracleBackend(protocol.PatchBackend):
  """Paper formulas on the difference tensor, one output feature at a time.

  ``lax.map`` over the output features ``t`` keeps the memory at one
  ``[G, K, M]`` difference (the full ``[G, K, T, M]`` tensor of a VGG layer
  would not fit).
  """

  name = NAME
  explicit_only = True

  def l1_forward(self, p, w, *, precision=None):
    del precision

    def one(wt):  # wt: [G, K]
      return -jnp.sum(jnp.abs(p - wt[:, :, None]), axis=1)  # [G, M]

    return jnp.moveaxis(lax.map(one, jnp.moveaxis(w, 2, 0)), 0, 1)

  def l1_input_grad(self, p, w, gy, mode, *, precision=None):
    del precision

    def one(acc, wg):
      wt, gt = wg  # [G, K], [G, M]
      return acc + gt[:, None, :] * _h_x(mode, wt[:, :, None] - p), None

    acc, _ = lax.scan(one, jnp.zeros(p.shape, p.dtype),
                      (jnp.moveaxis(w, 2, 0), jnp.moveaxis(gy, 1, 0)))
    return acc

  def l1_weight_grad(self, p, w, gy, mode, *, precision=None):
    del precision

    def one(wg):
      wt, gt = wg
      d = p - wt[:, :, None]  # [G, K, M]
      if mode == 'sign':
        d = jnp.sign(d)
      return jnp.sum(gt[:, None, :] * d, axis=2)  # [G, K]

    out = lax.map(one, (jnp.moveaxis(w, 2, 0), jnp.moveaxis(gy, 1, 0)))
    return jnp.moveaxis(out, 0, 2)


def register() -> str:
  """Registers the oracle backend (idempotent) and returns its name."""
  if NAME not in backends.available():
    backends.register(OracleBackend(), prefer=False)
  return NAME
