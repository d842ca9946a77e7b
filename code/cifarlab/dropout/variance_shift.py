"""Variance-shift logging (``--report-ratio``): eval/train input statistics of the norm layers
that follow dropout, per epoch, for the first, middle and last tracked layer.

The dropout network wraps those norm layers in ``TrackedNorm`` (``report_ratio=True`` at build
time). Each epoch this callback clears their accumulators, lets the epoch's training batches
(train mode, dropout on) and the validation pass (eval mode, dropout off) fill them, then
writes to metrics.csv the columns

    ratio_mean_{first,middle,last}   eval/train average |channel mean| of the layer's input
    ratio_var_{first,middle,last}    eval/train average channel variance of the layer's input

A variance ratio below 1 is the "variance shift": the norm layer's running variance (learnt
with dropout) overestimates what it sees at test time.
"""
from __future__ import annotations

import math
from typing import Any

from cifarlab.dropout.conv_block import tracked_norms
from cifarlab.errors import ConfigError
from cifarlab.train.callbacks import Callback

POSITIONS = ("first", "middle", "last")


def columns() -> list[str]:
    return [f"ratio_{stat}_{pos}" for pos in POSITIONS for stat in ("mean", "var")]


class VarianceShift(Callback):
    def __init__(self):
        self._layers = []
        self._last: dict[str, float] = {}

    def on_fit_start(self, trainer) -> None:
        layers = tracked_norms(trainer.model)
        if not layers:
            raise ConfigError("report_ratio: the model has no tracked norm layer; use a dropout network "
                              "(--net-type) with a --drop-type")
        self._layers = [layers[0], layers[len(layers) // 2], layers[-1]]

    def on_epoch_start(self, trainer, epoch: int) -> None:
        for layer in self._layers:
            layer.reset()

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, Any]) -> None:
        for pos, layer in zip(POSITIONS, self._layers):
            mean_ratio, var_ratio = layer.ratios()  # one host sync per layer per epoch
            row[f"ratio_mean_{pos}"] = mean_ratio
            row[f"ratio_var_{pos}"] = var_ratio
        self._last = {k: row[k] for k in columns()}

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        # JSON has no NaN: an unseen mode (no validation pass) is reported as null
        summary.update({k: (None if math.isnan(v) else v) for k, v in self._last.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self._last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = dict(state.get("last", {}))


def callbacks_from_config(cfg) -> list[Callback]:
    return [VarianceShift()] if cfg.report_ratio else []
