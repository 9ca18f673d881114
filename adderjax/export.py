"""``jax.export`` of adder networks: the safety checks the kernels need.

``jax.export`` refuses custom calls whose targets JAX does not guarantee to
be stable unless the caller disables that check by name. A lowering of an
adder layer for ``'cuda'`` (or ``'rocm'``) holds the Pallas Triton kernels,
one custom call each (target
:data:`pallas_kernels.gpu_lowering.TRITON_CUSTOM_CALL`); the Mosaic (TPU)
kernels' ``tpu_custom_call`` and the XLA code of the CPU need nothing.
:func:`~adderjax.export_safety_checks` returns the checks to disable for a
list of platforms, so that callers need not name the kernels' targets, and
:func:`export` is ``jax.export.export`` with them:

>>> import jax, jax.numpy as jnp
>>> import adderjax
>>> from adderjax import export as adder_export
>>> f = lambda x, w: adderjax.adder_conv(x, w, padding='SAME')
>>> x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
>>> w = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)
>>> exp = adder_export.export(f, platforms=('cpu', 'cuda', 'tpu'))(x, w)
>>> exp.platforms  # from any host, GPU and TPU included
('cpu', 'cuda', 'tpu')
>>> text = exp.mlir_module()  # the XLA code, a Triton and a Mosaic kernel
>>> text.count('__gpu$xla.gpu.triton'), text.count('tpu_custom_call')
(1, 1)

The same with ``jax.export.export`` itself:

>>> exp = jax.export.export(
...     jax.jit(f), platforms=('cpu', 'cuda'),
...     disabled_checks=adder_export.export_safety_checks(('cpu', 'cuda')))(
...         x, w)

Shape polymorphism: the batch may be symbolic in every adder layer, a
spatial size where the layer has unit strides and dilation
(:func:`adderjax.ops.geometry.make_geometry` says which dimension is not
allowed, and why). The Pallas kernels need static sizes, so a layer with a
symbolic size is lowered with the XLA backend for every platform (with a
warning for an accelerator; see :mod:`adderjax.ops.backends`): export with a
static batch to get the kernels on GPU and TPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import export as jax_export

from pallas_kernels import gpu_lowering

#: Platform names ``jax.export`` accepts.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')

#: Custom-call targets of the adder kernels that ``jax.export`` does not
#: guarantee to be stable, by platform.
KERNEL_CUSTOM_CALLS = {
    'cuda': (gpu_lowering.TRITON_CUSTOM_CALL,),
    'rocm': (gpu_lowering.TRITON_CUSTOM_CALL,),
}


def _platform_list(platforms) -> tuple[str, ...]:
  if platforms is None:
    return PLATFORMS
  if isinstance(platforms, str):
    platforms = (platforms,)
  if not isinstance(platforms, Sequence) or not platforms:
    raise ValueError(f'platforms must be None or a non-empty sequence of '
                     f'{PLATFORMS}, got {platforms!r}.')
  bad = [p for p in platforms if not isinstance(p, str) or
         p.lower() not in PLATFORMS]
  if bad:
    raise ValueError(f'platforms must name platforms of {PLATFORMS}, got '
                     f'{platforms!r} (unknown: {bad!r}; a GPU is '
                     "'cuda' or 'rocm').")
  return tuple(p.lower() for p in platforms)


def export_safety_checks(
    platforms: Sequence[str] | str | None = None
) -> list[jax_export.DisabledSafetyCheck]:
  """The ``jax.export`` safety checks the adder kernels need disabled.

  Args:
    platforms: the platforms of the export (``'cpu'``, ``'cuda'``,
      ``'rocm'``, ``'tpu'``), as given to ``jax.export.export``; ``None``
      for every platform (what an export for the local default backend may
      need).

  Returns:
    A list of ``jax.export.DisabledSafetyCheck`` for the
    ``disabled_checks`` argument of ``jax.export.export``: the custom call of
    the Triton kernels when ``platforms`` has a GPU, else empty. Add your own
    checks to it.

  Raises:
    ValueError: ``platforms`` empty or naming an unknown platform.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adderjax
    >>> from adderjax.export import export_safety_checks
    >>> export_safety_checks(['cpu', 'tpu'])
    []
    >>> f = jax.jit(lambda x, w: adderjax.adder_dense(x, w))
    >>> exp = jax.export.export(
    ...     f, platforms=('cpu', 'cuda', 'tpu'),
    ...     disabled_checks=export_safety_checks(('cpu', 'cuda', 'tpu')))(
    ...         jax.ShapeDtypeStruct((4, 16), jnp.float32),
    ...         jax.ShapeDtypeStruct((16, 8), jnp.float32))
    >>> exp.platforms
    ('cpu', 'cuda', 'tpu')
  """
  targets = []
  for p in _platform_list(platforms):
    for target in KERNEL_CUSTOM_CALLS.get(p, ()):
      if target not in targets:
        targets.append(target)
  return [jax_export.DisabledSafetyCheck.custom_call(t) for t in targets]


def export(fn: Callable[..., Any], *,
           platforms: Sequence[str] | str | None = None,
           disabled_checks: Sequence[jax_export.DisabledSafetyCheck] = (),
           **kwargs) -> Callable[..., jax_export.Exported]:
  """``jax.export.export`` with the checks the adder kernels need disabled.

  Args:
    fn: the function to export; wrapped in ``jax.jit`` unless it is jitted
      already.
    platforms: as in ``jax.export.export`` (``None``: the default backend).
    disabled_checks: further checks to disable, added to
      :func:`~adderjax.export_safety_checks` of ``platforms``.
    **kwargs: passed to ``jax.export.export``.

  Returns:
    The function of argument specs (``jax.ShapeDtypeStruct``, symbolic
    shapes allowed) that ``jax.export.export`` returns.

  Raises:
    ValueError: ``platforms`` naming an unknown platform.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import adderjax
    >>> from adderjax import export as adder_export
    >>> w = jnp.ones((3, 2))
    >>> f = lambda x: adderjax.adder_dense(x, w)
    >>> x = jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, 3'),
    ...                          jnp.float32)
    >>> exp = adder_export.export(f, platforms=('cpu',))(x)
    >>> exp.call(jnp.zeros((5, 3))).tolist()  # any batch
    [[-3.0, -3.0], [-3.0, -3.0], [-3.0, -3.0], [-3.0, -3.0], [-3.0, -3.0]]
  """
  checks = export_safety_checks(platforms)
  checks += [c for c in disabled_checks if c not in checks]
  if not hasattr(fn, 'trace'):
    fn = jax.jit(fn)
  return jax_export.export(
      fn, platforms=None if platforms is None else _platform_list(platforms),
      disabled_checks=checks, **kwargs)
