"""Relax passes of tvm-sparseconv, one per file."""
from .rewrite_conv2d import RewriteConv2D, LayerChoice, applied_layers, layout_transforms

__all__ = ["RewriteConv2D", "LayerChoice", "applied_layers", "layout_transforms"]
