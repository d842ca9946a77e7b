"""Structural dropout (drop-neuron/channel/path/layer) and the customizable conv block.

Kept light on purpose: EDropout and the variance-shift callback import the training code,
so they are imported by their own module paths, never from here.
"""
from cifarlab.dropout.conv_block import TrackedNorm, conv_block, track_norms_after_dropout, tracked_norms
from cifarlab.dropout.layers import DropChannel, DropLayer, DropNeuron, DropPath, parse_drop_type

__all__ = ["DropNeuron", "DropChannel", "DropPath", "DropLayer", "parse_drop_type", "conv_block",
           "TrackedNorm", "track_norms_after_dropout", "tracked_norms", "EDropout"]


def __getattr__(name):
    # `cifarlab.dropout.EDropout` on first use only, so importing the layers stays light
    if name == "EDropout":
        from cifarlab.dropout.edropout import EDropout

        return EDropout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
