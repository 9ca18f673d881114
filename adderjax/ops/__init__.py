"""Functional adder ops (the one source of truth for every layer)."""

from adderjax.ops.adder import ADDER_OUTPUT
from adderjax.ops.adder import adder_conv
from adderjax.ops.adder import adder_dense
from adderjax.ops.backends import available as available_implementations
from adderjax.ops.geometry import GRAD_MODES
from adderjax.ops.integer import adder_conv_int
from adderjax.ops.integer import adder_dense_int

__all__ = ['ADDER_OUTPUT', 'adder_conv', 'adder_dense', 'adder_conv_int',
           'adder_dense_int', 'available_implementations', 'GRAD_MODES']
