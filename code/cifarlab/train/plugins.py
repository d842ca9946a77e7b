"""Which callbacks a TrainConfig asks for.

Each technique module exposes ``callbacks_from_config(cfg) -> list[Callback]`` and is listed
here by dotted path; it returns [] when the config does not use it. Imports are lazy so the
plain training path loads nothing it does not need.
"""
from __future__ import annotations

import importlib

PLUGINS: tuple[str, ...] = (
    "cifarlab.train.live_plot",
    "cifarlab.batchnorm.probe_callback",
    "cifarlab.dropout.variance_shift",
    "cifarlab.edropout.callback",
    "cifarlab.dessilbi.callbacks",
)


def callbacks_from_config(cfg) -> list:
    out = []
    for path in PLUGINS:
        module = importlib.import_module(path)
        out.extend(module.callbacks_from_config(cfg))
    return out
