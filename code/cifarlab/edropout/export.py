"""EDropout results: the physically pruned network and R, the percentage of parameters kept.

``export_pruned(model, layers, state, example)`` returns a new model that computes what the
masked model computes (evaluation mode) with the dropped units removed:
  1. a copy of the model gets the dropped units' parameters set to zero (conv filter rows and
     bias, BN weight and bias, classifier input columns): the copy without masks now equals
     the masked model;
  2. Torch-Pruning's DependencyGraph removes channels physically, with everything coupled to
     them: the BN channel, the next layer's input weights, and across residual additions the
     same channel of every block that writes into that stream. A coupled channel is removed
     only where every layer writing it is dropped (otherwise the sum still carries it, and the
     dropped filters stay as zeros); never the last channel of a layer;
  3. the classifier's remaining dropped inputs are removed by slicing its weight columns and
     selecting the kept inputs (``SelectInputs``).

Sizes of a state, three ways (issue 12):
  * ``r_paper`` (``paper_r``): R as the released code counts it (``kept_counter``): per conv
    layer kept filters x k_h x k_w, plus kept classifier inputs x classes, over the same sums
    with every unit kept. Input channels do not enter. Only this one stands beside the paper's R.
  * ``r_params`` = parameters of the physically pruned export / parameters of the dense model
    (dropped filters that the export cannot remove, because a residual stream keeps their
    channel alive, are still counted: they are still there).
  * ``flops_kept`` = FLOPs of the export / FLOPs of the dense model (one image, FlopCounterMode).
``params_kept_pct`` (older): the export's parameters that are not structurally zero, in %.
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import torch
import torch.nn as nn

from cifarlab.edropout.unit_masks import UnitLayer, strip_overrides
from cifarlab.utils import atomic_torch_save, count_params, forward_flops


class SelectInputs(nn.Module):
    """Keeps the listed features of the last dimension (the classifier's surviving inputs)."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.long())

    def forward(self, x):
        return x.index_select(-1, self.index)


def _zero_dropped(layers, mods, state) -> None:
    with torch.no_grad():
        for layer in layers:
            drop = ~state[layer.slice].to(torch.bool)
            drop = drop.to(mods[layer.name].weight.device)
            if layer.kind == "linear_in":
                mods[layer.name].weight[:, drop] = 0
                continue
            conv = mods[layer.name]
            conv.weight[drop] = 0
            if conv.bias is not None:
                conv.bias[drop] = 0
            if layer.bn_name is not None:
                bn = mods[layer.bn_name]
                for p in (bn.weight, bn.bias):
                    if p is not None:
                        p[drop] = 0


def paper_r(layers: list[UnitLayer], state: torch.Tensor) -> tuple[int, int]:
    """(kept, total) of the released code's ``kept_counter``: each conv layer weighs a filter by
    its kernel area k_h x k_w, the classifier weighs an input by its number of outputs."""
    state = state.to(torch.bool).cpu()
    kept = total = 0
    for layer in layers:
        if layer.kind == "conv":
            kh, kw = layer.module.kernel_size
            weight = kh * kw
        else:
            weight = layer.module.out_features
        kept += int(state[layer.slice].sum()) * weight
        total += layer.size * weight
    return kept, total


def r_paper(layers: list[UnitLayer], state: torch.Tensor) -> float:
    """R (paper) as a fraction in [0, 1]."""
    kept, total = paper_r(layers, state)
    return kept / total if total else 0.0


def _has_params(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False))


def export_pruned(model: nn.Module, layers: list[UnitLayer], state: torch.Tensor,
                  example_input: torch.Tensor) -> tuple[nn.Module, dict]:
    """(pruned model in eval mode, info) for the bool ``state`` over ``layers`` (see module doc)."""
    import torch_pruning as tp

    state = state.to(torch.bool).cpu()
    pruned = strip_overrides(copy.deepcopy(model)).eval()
    dense_flops = forward_flops(pruned, example_input)
    mods = dict(pruned.named_modules())
    _zero_dropped(layers, mods, state)

    conv_layers = [layer for layer in layers if layer.kind == "conv"]
    conv_of = {}  # module -> its unit layer, for the conv and its BN
    alive = {}  # unit layer name -> original index of each current output channel
    dropped = {}  # unit layer name -> set of dropped original indices
    for layer in conv_layers:
        conv_of[mods[layer.name]] = layer
        if layer.bn_name is not None:
            conv_of[mods[layer.bn_name]] = layer
        alive[layer.name] = list(range(layer.size))
        dropped[layer.name] = {i for i, k in enumerate(state[layer.slice].tolist()) if not k}
    fc_layer = next((layer for layer in layers if layer.kind == "linear_in"), None)
    fc = mods[fc_layer.name] if fc_layer is not None else None
    fc_alive = list(range(fc_layer.size)) if fc_layer is not None else []

    with torch.enable_grad():  # the dependency graph is traced through autograd
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_input, verbose=False)
    physical = 0
    for layer in conv_layers:
        conv = mods[layer.name]
        pos = [p for p, o in enumerate(alive[layer.name]) if o in dropped[layer.name]]
        if not pos:
            continue
        ok = set(range(len(pos)))
        for dep, idxs in dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=pos).items:
            mod, fn = dep.target.module, dep.handler
            idxs = [int(getattr(i, "idx", i)) for i in idxs]
            owner = conv_of.get(mod)
            if owner is not None and (mod is not mods[owner.name] or dg.is_out_channel_pruning_fn(fn)):
                # a layer that writes this channel: it must be dropped there too
                if len(idxs) != len(pos):
                    ok = set()
                    break
                ok &= {k for k, i in enumerate(idxs) if alive[owner.name][i] in dropped[owner.name]}
            elif not _has_params(mod) or (dg.is_in_channel_pruning_fn(fn) and not dg.is_out_channel_pruning_fn(fn)):
                continue  # an operation without parameters, or a layer reading the channel
            else:
                ok = set()  # a parametrised layer we do not mask (e.g. a BN on a residual stream)
                break
        sel = [pos[k] for k in sorted(ok)]
        if len(sel) == len(alive[layer.name]):
            sel = sel[:-1]  # keep one (zero) channel: a layer needs an output
        if not sel:
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sel)
        for dep, idxs in group.items:
            mod, fn = dep.target.module, dep.handler
            idxs = {int(getattr(i, "idx", i)) for i in idxs}
            owner = conv_of.get(mod)
            if owner is not None and mod is mods[owner.name] and dg.is_out_channel_pruning_fn(fn):
                alive[owner.name] = [o for p, o in enumerate(alive[owner.name]) if p not in idxs]
            elif mod is fc and dg.is_in_channel_pruning_fn(fn):
                fc_alive = [o for p, o in enumerate(fc_alive) if p not in idxs]
        group.prune()
        physical += len(sel)

    if fc_layer is not None:  # the classifier's dropped inputs that are still there
        fc_keep = state[fc_layer.slice].tolist()
        drop_pos = [p for p, o in enumerate(fc_alive) if not fc_keep[o]]
        if drop_pos and len(drop_pos) < len(fc_alive):
            keep_pos = torch.tensor([p for p in range(len(fc_alive)) if p not in set(drop_pos)],
                                    device=fc.weight.device)
            tp.prune_linear_in_channels(fc, drop_pos)
            parent_name, _, child = fc_layer.name.rpartition(".")
            parent = pruned.get_submodule(parent_name) if parent_name else pruned
            setattr(parent, child, nn.Sequential(SelectInputs(keep_pos), fc))

    # parameters still present but zero: dropped filters on channels other layers keep alive
    zero = 0
    per_layer = []
    for layer in conv_layers:
        conv = mods[layer.name]
        still = [p for p, o in enumerate(alive[layer.name]) if o in dropped[layer.name]]
        per_unit = conv.weight[0].numel() + (conv.bias is not None)
        if layer.bn_name is not None:
            bn = mods[layer.bn_name]
            per_unit += (bn.weight is not None) + (bn.bias is not None)
        zero += len(still) * per_unit
        per_layer.append({"layer": layer.name, "units": layer.size,
                          "kept": layer.size - len(dropped[layer.name]),
                          "channels_after_export": len(alive[layer.name])})
    if fc_layer is not None:
        per_layer.append({"layer": fc_layer.name + " (inputs)", "units": fc_layer.size,
                          "kept": int(state[fc_layer.slice].sum()), "channels_after_export": fc.in_features})
    total = count_params(model)
    pruned_params = count_params(pruned)
    flops = forward_flops(pruned, example_input)
    info = {
        "params": total, "pruned_params": pruned_params, "params_kept": pruned_params - zero,
        "params_kept_pct": 100.0 * (pruned_params - zero) / total,
        "r_params": pruned_params / total, "r_paper": r_paper(layers, state),
        "flops": dense_flops, "pruned_flops": flops, "flops_kept": flops / dense_flops if dense_flops else None,
        "units": int(state.numel()), "units_kept": int(state.sum()),
        "channels_removed": physical, "layers": per_layer,
    }
    return pruned, info


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, trainer=None) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (summed on the device, one host read)."""
    model.eval()
    dev = next(model.parameters()).device
    correct = torch.zeros((), device=dev)
    n = torch.zeros((), device=dev)
    for x, y in loader:
        if trainer is not None and getattr(trainer, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        with trainer.autocast() if trainer is not None else torch.autocast(dev.type, enabled=False):
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    tot = torch.stack([correct, n])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tot)
    c, m = tot.tolist()
    return c / max(m, 1.0)


def write_edropout_files(run_dir, layers: list[UnitLayer], state: torch.Tensor, info: dict,
                        kept_steps: torch.Tensor | None = None, search_steps: int | None = None) -> None:
    """edropout_state.pt (loads with weights_only=True): the state, the layers' slices of it,
    and for a search run ``kept_steps`` (per unit, the number of search steps whose training
    state kept it) and ``search_steps``; edropout_layers.csv: units kept per layer (and, for a
    search run, units never kept before the freeze)."""
    run_dir = Path(run_dir)
    state = state.to(torch.bool).cpu()
    payload = {"state": state, "layers": [[l.name, l.kind, l.offset, l.size] for l in layers],
               "params_kept_pct": float(info["params_kept_pct"]), "r_paper": float(info["r_paper"]),
               "r_params": float(info["r_params"])}
    rows = [dict(r) for r in info["layers"]]
    fields = ["layer", "units", "kept", "channels_after_export"]
    if kept_steps is not None:
        kept_steps = kept_steps.cpu()
        payload["kept_steps"], payload["search_steps"] = kept_steps, int(search_steps or 0)
        fields.append("never_trained")
        for row, layer in zip(rows, layers):
            row["never_trained"] = int((kept_steps[layer.slice] == 0).sum())
    atomic_torch_save(payload, run_dir / "edropout_state.pt")
    tmp = run_dir / ".edropout_layers.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(run_dir / "edropout_layers.csv")


def dropped_units_training(state: torch.Tensor, kept_steps: torch.Tensor, search_steps: int) -> dict:
    """How much training the units outside the final state received before the freeze: the
    median over those units of (search steps that kept the unit / search steps), and the share
    of them kept in under 5% of the steps. This is what F (all units on) pays for: a unit
    the search rarely kept has weights close to their initialisation. Fractions 0..1; empty
    dict when there is nothing to measure (no search steps, or no dropped unit)."""
    state = state.to(torch.bool).cpu()
    dropped = ~state
    if search_steps <= 0 or not bool(dropped.any()):
        return {}
    frac = kept_steps.cpu().double()[dropped] / search_steps
    return {"dropped_kept_median": float(frac.median()), "dropped_kept_under_5pct": float((frac < 0.05).double().mean())}


def read_dropped_units_training(run_dir) -> dict:
    """``dropped_units_training`` from a run's edropout_state.pt ({} for a random-mask run,
    an older run without kept_steps, or no file)."""
    path = Path(run_dir) / "edropout_state.pt"
    if not path.is_file():
        return {}
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if "kept_steps" not in payload:
        return {}
    return dropped_units_training(payload["state"], payload["kept_steps"], int(payload.get("search_steps") or 0))
