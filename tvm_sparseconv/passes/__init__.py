"""Relax passes of tvm-sparseconv, one per file (and one TIR pass: stack_scratch.py)."""
from .rewrite_conv2d import LayerChoice, LayoutGraph, RewriteConv2D, applied_layers, layout_transforms

__all__ = ["LayerChoice", "LayoutGraph", "RewriteConv2D", "applied_layers", "layout_transforms"]
