"""Physical pruning: a smaller dense model with the pruned filters removed (Torch-Pruning).

Masking a conv filter's weights does not silence its channel: the bias and a following
BatchNorm still emit a constant, and across a residual add a channel is shared by every conv
that writes into the sum. So a channel is removed only as a whole *group* (Torch-Pruning's
DependencyGraph: the conv, its BatchNorm, the next layer's inputs, every producer coupled by an
add) and only when every weighted producer in the group wants it gone. The *masked model* is
the same network with exactly those channels silenced (producer weights, biases and BatchNorm
affine zeroed); the physically pruned model computes the same function with fewer parameters
and FLOPs, which ``compare_models`` checks and times.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.utils import forward_flops

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class PlanItem:
    layer: str  # module name of the group's root (a conv or linear layer)
    idxs: list[int]  # its output channels to remove


def keep_from_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer keep masks over output channels from weight-shaped or per-channel bool masks:
    a channel is kept when any of its weights is kept."""
    out = {}
    for name, m in masks.items():
        m = m.detach().bool().cpu()
        out[name] = m if m.dim() == 1 else m.reshape(m.shape[0], -1).any(dim=1)
    return out


def _is_out_fn(handler) -> bool:
    return getattr(handler, "__name__", "") in ("prune_out_channels",)


class ChannelPruner:
    """Plans, masks and removes output channels of a model's conv/linear layers as coupled groups."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor):
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        was_training = model.training
        model.eval()
        self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        model.train(was_training)
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())

    def _fn(self, module):
        tp = self.tp
        if isinstance(module, nn.Linear):
            return tp.prune_linear_out_channels
        return tp.prune_conv_out_channels

    def _group(self, module, idxs):
        return self.dg.get_pruning_group(module, self._fn(module), idxs=list(idxs))

    def _members(self, group):
        """(module, idxs) of every out-channel member of a group with weights or norm affine."""
        for dep, idxs in group:
            mod = dep.target.module
            if _is_out_fn(dep.handler) and isinstance(mod, _WEIGHTED + _NORMS):
                yield mod, [int(i) for i in idxs]

    def plan(self, keep: dict[str, torch.Tensor]) -> list[PlanItem]:
        """Channels that can go: wanted gone by every weighted producer of their group."""
        want: dict[nn.Module, set[int]] = {}
        for name, k in keep.items():
            if name not in self.modules or not isinstance(self.modules[name], _WEIGHTED):
                raise ConfigError(f"layer {name!r} is not a conv or linear layer of the model")
            want[self.modules[name]] = set(torch.nonzero(~k.bool().cpu()).flatten().tolist())
        covered: set[nn.Module] = set()
        items = []
        for module in self.modules.values():  # model order, so a stream is planned from its first writer
            if module not in want or module in covered or not want[module]:
                continue
            idxs = sorted(want[module])
            allowed = set(idxs)
            group = self._group(module, idxs)
            for mod, midx in self._members(group):
                if mod is module or not isinstance(mod, _WEIGHTED):
                    continue
                if sorted(midx) == idxs:  # identity coupling (residual add): same channel numbers
                    allowed &= want.get(mod, set())
                else:  # another index map: check channel by channel
                    allowed = {i for i in allowed if self._index_ok(module, i, want)}
                    break
            for mod, _ in self._members(group):
                covered.add(mod)
            if len(allowed) >= module.weight.shape[0]:  # a layer keeps at least one channel
                allowed.discard(min(allowed))
            if allowed:
                items.append(PlanItem(self.names[module], sorted(allowed)))
        return items

    def _index_ok(self, module, i: int, want) -> bool:
        for mod, midx in self._members(self._group(module, [i])):
            if mod is not module and isinstance(mod, _WEIGHTED) and not set(midx) <= want.get(mod, set()):
                return False
        return True

    @torch.no_grad()
    def mask(self, plan: list[PlanItem]) -> None:
        """Silence the planned channels in place: producer weights/bias and norm affine (and running
        mean) to zero, so each channel is exactly 0 wherever it is consumed."""
        for item in plan:
            for mod, idxs in self._members(self._group(self.modules[item.layer], item.idxs)):
                idx = torch.tensor(idxs, dtype=torch.long)
                for t in (getattr(mod, "weight", None), getattr(mod, "bias", None),
                          getattr(mod, "running_mean", None)):
                    if isinstance(t, torch.Tensor):
                        t.index_fill_(0, idx.to(t.device), 0.0)

    def prune(self, plan: list[PlanItem]) -> None:
        """Remove the planned channels (and everything coupled to them) from the model in place."""
        for item in plan:
            group = self._group(self.modules[item.layer], item.idxs)
            if not self.dg.check_pruning_group(group):
                raise ConfigError(f"pruning {len(item.idxs)} channels of {item.layer} would leave a layer empty")
            group.prune()


def export_pruned(model: nn.Module, keep: dict[str, torch.Tensor], example_inputs: torch.Tensor):
    """(masked copy, physically pruned copy, plan) for per-layer keep masks over output channels.
    The input model is left untouched."""
    masked = copy.deepcopy(model)
    pm = ChannelPruner(masked, example_inputs)
    plan = pm.plan(keep)
    pm.mask(plan)
    pruned = copy.deepcopy(model)
    ChannelPruner(pruned, example_inputs).prune(plan)
    return masked, pruned, plan


@torch.no_grad()
def _forward_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


@torch.no_grad()
def compare_models(masked: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int = 10) -> dict:
    """Params, FLOPs (per image), largest output difference on ``x``, and the measured inference
    speed-up (median forward time on the batch ``x``, the two models interleaved)."""
    masked.eval()
    pruned.eval()
    diff = (masked(x) - pruned(x)).abs().max().item()
    one = x[:1]
    _forward_ms(masked, x, 2)
    _forward_ms(pruned, x, 2)  # warm-up
    tm, tp_ = [], []
    for _ in range(repeats):
        tm += _forward_ms(masked, x, 1)
        tp_ += _forward_ms(pruned, x, 1)
    masked_ms, pruned_ms = statistics.median(tm), statistics.median(tp_)
    pm, pp = sum(p.numel() for p in masked.parameters()), sum(p.numel() for p in pruned.parameters())
    fm, fp = forward_flops(masked, one), forward_flops(pruned, one)
    return {"params_before": pm, "params_after": pp, "params_ratio": pp / pm,
            "flops_before": fm, "flops_after": fp, "flops_ratio": fp / fm if fm else 1.0,
            "max_abs_diff": diff, "batch": x.shape[0], "masked_ms": masked_ms, "pruned_ms": pruned_ms,
            "speedup": masked_ms / pruned_ms if pruned_ms > 0 else float("nan")}
