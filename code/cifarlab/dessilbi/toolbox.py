"""DessiLBI toolbox: W*, selected filters, prune order and percentile pruning (REFERENCE §2).

An SLBI optimizer keeps a sparse companion Gamma per sparse weight (``opt.state[p]["gamma"]``).
W* is W restricted to Gamma's support; a conv filter (or linear unit) is *selected* when its
Gamma slice is nonzero. The prune order ranks entries by how early their Gamma became nonzero
(the first-activation epoch, NEVER = 2000 if it never did) and by magnitude:

    conv:   order[filter] = ||W_filter||_2 - min(first epoch over the filter)
    linear: order[i, j]   = |W_ij| - first_epoch_ij

and pruning p% of a layer zeroes the filters/entries whose order is below the p-th percentile
(numpy's linear interpolation), together with the matching bias; every change is restorable.
These are small functions over tensors so tests can pin them on hand-made layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from cifarlab.errors import ConfigError
from cifarlab.optim.slbi import NEVER

__all__ = ["NEVER", "sparse_layers", "w_star", "use_w_star", "filter_support", "selection",
           "support_sizes", "new_first_epoch_record", "update_first_epoch", "prune_order",
           "percentile_keep", "prune_layers", "PruneHandle", "kernel_tile"]


# -- which layers SLBI made sparse -------------------------------------------------------------

def sparse_layers(model: nn.Module, opt) -> dict[str, nn.Module]:
    """Module name -> conv/linear module whose weight carries an SLBI Gamma (in model order)."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(w, torch.Tensor) \
                and opt is not None and "gamma" in opt.state.get(w, {}):
            out[name] = module
    return out


def _gamma(opt, module: nn.Module) -> torch.Tensor:
    return opt.state[module.weight]["gamma"]


def w_star(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W on Gamma's support, zero elsewhere."""
    return weight * (gamma != 0)


@contextlib.contextmanager
def use_w_star(model: nn.Module, opt):
    """Swap W* into every sparse layer; restore W exactly on exit (even after an exception)."""
    saved = []
    with torch.no_grad():
        for module in sparse_layers(model, opt).values():
            w = module.weight
            saved.append((w, w.detach().clone()))
            w.mul_(_gamma(opt, module) != 0)
    try:
        yield model
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def filter_support(gamma: torch.Tensor) -> torch.Tensor:
    """Bool per slice along dim 0 (conv filter / linear unit): any nonzero entry."""
    return (gamma != 0).reshape(gamma.shape[0], -1).any(dim=1)


def selection(model: nn.Module, opt) -> list[dict]:
    """Per sparse layer: conv -> filters selected/total; linear -> weights (entries) selected/total,
    plus the units (rows) with any selected weight. One host read per layer: call per epoch."""
    rows = []
    for name, module in sparse_layers(model, opt).items():
        g = _gamma(opt, module)
        conv = g.dim() > 2
        units = int(filter_support(g).sum())
        if conv:
            total, selected = g.shape[0], units
        else:
            total, selected = g.numel(), int((g != 0).sum())
        rows.append({"layer": name, "kind": "conv" if conv else "linear", "total": total,
                     "selected": selected, "ratio": selected / total if total else 0.0,
                     "units": g.shape[0], "units_selected": units, "support": int((g != 0).sum()),
                     "numel": g.numel()})
    return rows


def support_sizes(model: nn.Module, opt) -> dict[str, int]:
    """Number of nonzero Gamma entries per sparse layer (the regularisation path's y-axis)."""
    return {r["layer"]: r["support"] for r in selection(model, opt)}


# -- first-activation epochs and the prune order -------------------------------------------------

def new_first_epoch_record(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """NEVER for every entry of every sparse weight (int32, on the weight's device)."""
    return {name: torch.full(m.weight.shape, NEVER, dtype=torch.int32, device=m.weight.device)
            for name, m in sparse_layers(model, opt).items()}


def update_first_epoch(record: dict[str, torch.Tensor], model: nn.Module, opt, epoch: int) -> None:
    """Entries whose Gamma is nonzero now and had no epoch yet get ``epoch`` (in place, no sync)."""
    for name, module in sparse_layers(model, opt).items():
        rec = record.get(name)
        if rec is None:
            rec = record[name] = torch.full(module.weight.shape, NEVER, dtype=torch.int32,
                                            device=module.weight.device)
        fresh = (_gamma(opt, module) != 0) & (rec == NEVER)
        rec.masked_fill_(fresh, epoch)


def prune_order(weight: torch.Tensor, first_epoch: torch.Tensor | None) -> torch.Tensor:
    """conv (dim > 2): one value per filter, ||W_f|| - min epoch in f; linear: |W| - epoch.
    Without a record (an SGD model) every entry counts as NEVER: plain magnitude order."""
    w = weight.detach().float()
    if first_epoch is None:
        first_epoch = torch.full(w.shape, NEVER, dtype=torch.int32, device=w.device)
    ep = first_epoch.to(w.device).float()
    if w.dim() > 2:
        norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        return norms - ep.reshape(w.shape[0], -1).amin(dim=1)
    return w.abs() - ep


def percentile_keep(order: torch.Tensor, percent: float) -> torch.Tensor:
    """Bool mask of entries kept: order >= the ``percent``-th percentile (linear interpolation)."""
    if not 0.0 <= percent <= 100.0:
        raise ConfigError(f"prune percent must be in [0, 100], got {percent}")
    values = order.detach().cpu().double().numpy()
    threshold = float(np.percentile(values, percent)) if values.size else 0.0
    return order >= torch.tensor(threshold, dtype=order.dtype, device=order.device)


@dataclass
class PruneHandle:
    """What prune_layers changed: keep masks per layer (filters for conv, entries for linear)
    and the original tensors, so ``restore()`` puts them back exactly."""
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    _saved: list = field(default_factory=list, repr=False)

    def restore(self) -> None:
        with torch.no_grad():
            for t, original in self._saved:
                t.copy_(original)
        self._saved.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _resolve_layer(model: nn.Module, name: str) -> nn.Module:
    name = name[:-len(".weight")] if name.endswith(".weight") else name
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"layer {name!r} is not in the model") from None
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        raise ConfigError(f"layer {name!r} is a {type(module).__name__}, not a conv or linear layer")
    return module


def prune_layers(model: nn.Module, layers, percent: float,
                 first_epoch: dict[str, torch.Tensor] | None = None) -> PruneHandle:
    """Zero p% of each listed layer by prune order (and the bias of pruned filters / of linear
    units with every weight pruned). Returns a handle whose restore() undoes it exactly."""
    if isinstance(layers, str):
        layers = [layers]
    handle = PruneHandle()
    with torch.no_grad():
        for name in layers:
            name = name[:-len(".weight")] if name.endswith(".weight") else name
            module = _resolve_layer(model, name)
            w = module.weight
            keep = percentile_keep(prune_order(w, (first_epoch or {}).get(name)), percent)
            handle.keep[name] = keep
            handle._saved.append((w, w.detach().clone()))
            if w.dim() > 2:  # keep is per filter
                w.mul_(keep.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))
                unit_alive = keep
            else:
                w.mul_(keep.to(w.dtype))
                unit_alive = keep.any(dim=1)
            if module.bias is not None:
                handle._saved.append((module.bias, module.bias.detach().clone()))
                module.bias.mul_(unit_alive.to(module.bias.dtype))
    return handle


# -- the "conv-slbi" picture ---------------------------------------------------------------------

def kernel_tile(weight: torch.Tensor, rows: int = 10, cols: int = 10) -> np.ndarray:
    """|W| of the first rows x cols (out, in) kernels tiled into one grayscale array
    (LeNet-5 conv3: 10x10 kernels of 5x5 -> a 50x50 image), as in the official example."""
    if weight.dim() != 4:
        raise ConfigError(f"kernel_tile needs a conv weight (4-D), got shape {tuple(weight.shape)}")
    w = weight.detach().abs().float().cpu()[:rows, :cols]
    r, c, kh, kw = w.shape
    return w.permute(0, 2, 1, 3).reshape(r * kh, c * kw).numpy()
