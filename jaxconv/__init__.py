"""jaxconv: convolution and pooling for JAX with PyTorch-exact semantics."""

from jaxconv._src.adaptive import adaptive_max_pool
from jaxconv._src.adaptive_avg import adaptive_avg_pool
from jaxconv._src.arithmetic import conv_output_size, conv_transpose_output_size
from jaxconv._src.avg import avg_pool
from jaxconv._src.conv import conv
from jaxconv._src.conv_transpose import conv_transpose
from jaxconv._src.fractional import fractional_max_pool
from jaxconv._src.graham import fractional_max_pool_graham
from jaxconv._src.lp import lp_pool
from jaxconv._src.max import max_pool
from jaxconv._src.unpool import max_unpool

__all__ = [
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "avg_pool",
    "conv",
    "conv_output_size",
    "conv_transpose",
    "conv_transpose_output_size",
    "fractional_max_pool",
    "fractional_max_pool_graham",
    "lp_pool",
    "max_pool",
    "max_unpool",
]

__version__ = "0.1.0"
