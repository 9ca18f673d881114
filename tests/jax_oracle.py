"""A direct, materialising JAX implementation of the adder layer's math.

Registered as the ``'test_oracle'`` backend of :mod:`adderjax.ops.backends`
(only used when named), so that whole networks built from the real modules
(zoo models, LeNet++) can run on it and be compared with the tuned backends
under ``jit`` and eagerly. It shares no arithmetic with ``adderjax``: every
formula is the paper's, written out on the full ``[G, K, T, M]`` difference
tensor (small test shapes only), with no algebraic identity that could
cancel (``-sum |p - w|``, ``sum gy * clip(w - p, -1, 1)``,
``sum gy * (p - w)``).
"""

from __future__ import annotations

import jax.numpy as jnp

from adderjax.ops import backends

NAME = 'test_oracle'


def _h_x(mode, d):
  if mode == 'full_precision':
    return jnp.clip(d, -1.0, 1.0)
  if mode == 'sign':
    return jnp.sign(d)
  return d


class OracleBackend(backends.Backend):
  """Paper formulas on the materialised difference tensor."""

  name = NAME
  explicit_only = True

  def forward(self, p, w, *, precision=None):
    del precision
    d = p[:, :, None, :] - w[:, :, :, None]  # [G, K, T, M]
    return -jnp.sum(jnp.abs(d), axis=1)

  def input_grad(self, p, w, gy, mode, *, precision=None):
    del precision
    d = w[:, :, :, None] - p[:, :, None, :]  # [G, K, T, M]
    return jnp.sum(gy[:, None, :, :] * _h_x(mode, d), axis=2)

  def weight_grad(self, p, w, gy, mode, *, precision=None):
    del precision
    d = p[:, :, None, :] - w[:, :, :, None]
    if mode == 'sign':
      d = jnp.sign(d)
    return jnp.sum(gy[:, None, :, :] * d, axis=3)


def register() -> str:
  """Registers the oracle backend (idempotent) and returns its name."""
  if NAME not in backends.available():
    backends.register(OracleBackend(), prefer=False)
  return NAME
