"""NumPy reference of every algorithm and format: the test oracle and the memory accounting.

Each submodule builds one representation from an NCHW activation exactly as the
compiled encoder must (same arrays, same order), and multiplies it back into an
N x M x Oh x Ow output. ``dense_conv2d`` is the independent oracle.
"""
from .storage import Storage, im2col_storage, mec_storage, compression_ratios
from .dense import dense_conv2d, pad_input, is_nonzero
from .lowering import im2col_lower, im2col_multiply, mec_lower, mec_multiply

__all__ = [
    "Storage", "im2col_storage", "mec_storage", "compression_ratios",
    "dense_conv2d", "pad_input", "is_nonzero",
    "im2col_lower", "im2col_multiply", "mec_lower", "mec_multiply",
]
