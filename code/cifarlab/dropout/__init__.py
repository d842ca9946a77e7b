"""Course part: structural dropout (Cai et al.): drop-neuron/channel/path/layer, the
customizable conv block, the dropout networks, the variance-shift callback, the report section.

Importing this package stays light (layers and conv block only); the networks register their
model names when ``cifarlab.models`` is imported, and the callback is loaded by the Trainer's
plugin list.
"""
from cifarlab.dropout.conv_block import TrackedNorm, conv_block, track_norms_after_dropout, tracked_norms
from cifarlab.dropout.layers import DropChannel, DropLayer, DropNeuron, DropPath, parse_drop_type

__all__ = ["DropNeuron", "DropChannel", "DropPath", "DropLayer", "parse_drop_type", "conv_block",
           "TrackedNorm", "track_norms_after_dropout", "tracked_norms"]
