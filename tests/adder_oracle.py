"""An independent numpy oracle of the adder layer, written from the paper.

Direct loops over output positions: no patch matrices, no custom_vjp, no code
shared with ``adderjax``. Equations (Chen et al., 2020):

* forward, eq. 2: ``Y = -sum |X - F|`` over the window and input channels;
* weight gradient: eq. 5 (``X - F``) or eq. 3 (``sgn(X - F)``);
* input gradient: eq. 6-7 (``HT(F - X)``), ``sgn(F - X)`` or ``F - X``.
"""

from __future__ import annotations

import math

import numpy as np


def same_padding(in_spatial, kernel_size, strides, dilation):
  """TensorFlow/XLA 'SAME' padding, derived by hand."""
  pads = []
  for n, k, s, d in zip(in_spatial, kernel_size, strides, dilation):
    out = math.ceil(n / s)
    eff = (k - 1) * d + 1
    total = max((out - 1) * s + eff - n, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def _windows(xp_shape, kernel_size, strides, dilation):
  nsp = len(kernel_size)
  out = [(xp_shape[1 + i] - (kernel_size[i] - 1) * dilation[i] - 1) //
         strides[i] + 1 for i in range(nsp)]
  for o in np.ndindex(*out):
    idx = tuple(slice(o[i] * strides[i],
                      o[i] * strides[i] + (kernel_size[i] - 1) * dilation[i] + 1,
                      dilation[i]) for i in range(nsp))
    yield o, idx, out


def forward(x, w, strides, pads, dilation, groups):
  """Adder conv forward in float64. ``x``: (N, *sp, C); ``w``: (*ks, C/G, T)."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  nsp = x.ndim - 2
  ks = w.shape[:nsp]
  cg, t_all = w.shape[-2], w.shape[-1]
  tg = t_all // groups
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  y = None
  for o, idx, out in _windows(xp.shape, ks, strides, dilation):
    if y is None:
      y = np.zeros((x.shape[0], *out, t_all))
    patch = xp[(slice(None),) + idx]  # (N, *ks, C)
    for g in range(groups):
      pg = patch[..., g * cg:(g + 1) * cg][..., None]  # (N, *ks, cg, 1)
      wg = w[..., g * tg:(g + 1) * tg][None]  # (1, *ks, cg, tg)
      dist = np.abs(pg - wg).sum(axis=tuple(range(1, nsp + 2)))
      y[(slice(None),) + o + (slice(g * tg, (g + 1) * tg),)] = -dist
  return y


def _h_x(mode, d):
  if mode == 'full_precision':
    return np.clip(d, -1, 1)
  if mode == 'sign':
    return np.sign(d)
  return d


def _h_w(mode, d):
  return np.sign(d) if mode == 'sign' else d


def grads(x, w, gy, strides, pads, dilation, groups, mode):
  """(dL/dx, dL/dw) for cotangent ``gy`` under gradient ``mode``."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  gy = np.asarray(gy, np.float64)
  nsp = x.ndim - 2
  ks = w.shape[:nsp]
  cg, t_all = w.shape[-2], w.shape[-1]
  tg = t_all // groups
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  for o, idx, _ in _windows(xp.shape, ks, strides, dilation):
    patch = xp[(slice(None),) + idx]
    for g in range(groups):
      csl = slice(g * cg, (g + 1) * cg)
      tsl = slice(g * tg, (g + 1) * tg)
      pg = patch[..., csl][..., None]  # (N, *ks, cg, 1)
      wg = w[..., tsl][None]  # (1, *ks, cg, tg)
      gg = gy[(slice(None),) + o + (tsl,)]  # (N, tg)
      gb = gg.reshape((gg.shape[0],) + (1,) * (nsp + 1) + (tg,))
      dw[..., tsl] += (gb * _h_w(mode, pg - wg)).sum(0)
      dpatch = (gb * _h_x(mode, wg - pg)).sum(-1)  # (N, *ks, cg)
      view = dxp[(slice(None),) + idx]
      view[..., csl] += dpatch  # basic slicing: a view into dxp
  crop = tuple(slice(lo, xp.shape[1 + i] - hi) for i, (lo, hi) in
               enumerate(pads))
  return dxp[(slice(None),) + crop], dw
