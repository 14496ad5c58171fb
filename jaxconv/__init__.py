"""jaxconv: convolution and pooling for JAX with PyTorch-exact semantics."""

from jaxconv._src.arithmetic import conv_output_size, conv_transpose_output_size
from jaxconv._src.conv import conv, conv_transpose

__all__ = [
    "conv",
    "conv_output_size",
    "conv_transpose",
    "conv_transpose_output_size",
]

__version__ = "0.1.0"
