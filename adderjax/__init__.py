"""adderjax: AdderNets (Chen et al., CVPR 2020) in JAX and Flax."""

from adderjax.ops import adder_conv
from adderjax.ops import adder_dense
from adderjax.ops import available_implementations
from adderjax.ops import GRAD_MODES
from adderjax import attacks
from adderjax import attention
from adderjax import datasets
from adderjax import distill
from adderjax import export
from adderjax import introspect
from adderjax import linen
from adderjax import nnx
from adderjax import optim
from adderjax import bnn
from adderjax import models
from adderjax import official
from adderjax import quant
from adderjax import slac
from adderjax.export import export_safety_checks
from adderjax.introspect import trace_layers
from adderjax.models import create_model
from adderjax.ops_count import count_ops
from adderjax.ops_count import count_params
from adderjax.ops_count import EnergyModel
from adderjax.remat import layer_outputs_saveable

__version__ = '0.1.0'

__all__ = ['adder_conv', 'adder_dense', 'available_implementations',
           'GRAD_MODES', 'linen', 'nnx', 'optim', 'bnn', 'models', 'official',
           'create_model', 'count_ops', 'count_params', 'EnergyModel',
           'quant', 'layer_outputs_saveable', 'introspect', 'trace_layers',
           'attacks', 'attention', 'datasets', 'distill', 'slac', 'export',
           'export_safety_checks']
