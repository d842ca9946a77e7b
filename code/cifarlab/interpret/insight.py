"""Looking inside a finished run: first-layer filters, feature maps, confusion matrix and
per-class accuracy, the most confident mistakes.

``load_run_model(run_dir)`` rebuilds the model from the run's config.yaml and loads
checkpoints/best.pt (the best-validation weights, the ones the test accuracy is reported for).
The science is in small pure functions (confusion_matrix, per_class_accuracy,
most_confident_mistakes) that tests pin by hand; the figures only draw their results.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cifarlab.errors import CheckpointError, ConfigError, RunDirError


# -- pure functions ---------------------------------------------------------------------------
def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ConfigError(f"{t.size} labels but {p.size} predictions")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ConfigError(f"labels and predictions must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per true class: diagonal / row sum (NaN for a class with no examples)."""
    rows = cm.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, np.diag(cm) / np.where(rows > 0, rows, 1), np.nan)


def most_confident_mistakes(probs: np.ndarray, y_true: Sequence[int], k: int = 16) -> np.ndarray:
    """Indices of misclassified examples, highest predicted-class probability first (ties: lower
    index first)."""
    probs = np.asarray(probs)
    t = np.asarray(y_true).reshape(-1)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    wrong = np.flatnonzero(pred != t)
    order = np.lexsort((wrong, -conf[wrong]))  # primary key: confidence, descending
    return wrong[order][:k]


# -- a finished run ---------------------------------------------------------------------------
@dataclass
class LoadedRun:
    model: nn.Module
    cfg: object  # TrainConfig
    info: object  # DatasetInfo
    checkpoint: Path


def load_run_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the run's model from config.yaml and load checkpoints/<which>.pt (eval mode)."""
    from cifarlab.config import load_yaml, make_config
    from cifarlab.data import config_info
    from cifarlab.train.build import model_from_config
    from cifarlab.train.checkpoint import load_checkpoint, load_model_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"no run directory {run_dir}")
    if which not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {which!r}")
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir}: expected {path} (has the run finished an epoch?)")
    ckpt = load_checkpoint(path, map_location=device)
    saved = load_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else dict(ckpt["config"])
    saved.pop("recipe", None)  # the saved values already hold the recipe's
    saved["resume"] = False
    cfg = make_config(saved)
    info = config_info(cfg)  # the run's own image size, data root and measured normalisation
    model = model_from_config(cfg, info.num_classes, info.in_channels)
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    return LoadedRun(model, cfg, info, path)


def load_test_images(cfg, info, n: int | None = None, seed: int = 0, data_root: str | None = None,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised test images (float N x C x H x W) and labels of the run's dataset: the run's
    test subset, then ``n`` of them drawn with ``seed`` (all when n is None)."""
    from cifarlab.data import load_arrays, subset_indices
    from cifarlab.data.augment import norm_constants, normalize

    x, y = load_arrays(cfg.dataset, data_root or cfg.data_root, train=False, download=False)
    idx = subset_indices(len(x), cfg.test_subset)
    if n is not None:
        g = torch.Generator().manual_seed(int(seed))
        idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    scale, shift = norm_constants(info.mean, info.std, device)
    return normalize(x[idx].to(device), scale, shift), y[idx].to(device)


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    was = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x[i:i + batch_size]).float(), 1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out).numpy()


# -- layers -----------------------------------------------------------------------------------
def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ConfigError(f"{type(model).__name__} has no Conv2d layer")


@torch.no_grad()
def feature_maps(model: nn.Module, layer: str, image: torch.Tensor) -> torch.Tensor:
    """The output (C, H, W) of module ``layer`` for one image (C, H, W), model mode kept."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ConfigError(f"no layer {layer!r} in {type(model).__name__}; top-level modules: "
                          f"{', '.join(n for n, _ in model.named_children())}") from None
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: got.append(out.detach()))
    was = model.training
    model.eval()
    try:
        model(image.unsqueeze(0).to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was)
    if not got or got[-1].dim() != 4:
        raise ConfigError(f"layer {layer!r} does not output a feature map")
    return got[-1][0].cpu()


# -- figures ----------------------------------------------------------------------------------
def _grid_axes(fig, n: int, cols: int):
    rows = -(-n // cols)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    return axes


def filter_grid_figure(model: nn.Module, path: str | Path, max_filters: int = 64) -> Path:
    """First conv layer's kernels, each scaled to [0, 1] on its own (RGB when 3 input channels,
    gray otherwise: the mean over input channels)."""
    from matplotlib.figure import Figure

    from cifarlab.report.curves import save_figure

    name, conv = first_conv(model)
    w = conv.weight.detach().float().cpu()[:max_filters]
    w = w if w.shape[1] == 3 else w.mean(1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    cols = min(8, len(w))
    fig = Figure(figsize=(cols * 0.8, -(-len(w) // cols) * 0.8 + 0.4))
    for ax, k in zip(_grid_axes(fig, len(w), cols), w):
        img = k.permute(1, 2, 0).numpy()
        ax.imshow(img if img.shape[2] == 3 else img[..., 0], cmap=None if img.shape[2] == 3 else "gray",
                  interpolation="nearest", vmin=0, vmax=1)
    fig.suptitle(f"first-layer filters ({name}, {tuple(conv.weight.shape)})", fontsize=8)
    return save_figure(fig, path)


def feature_map_figure(maps: torch.Tensor, path: str | Path, title: str = "", max_maps: int = 32) -> Path:
    from matplotlib.figure import Figure

    from cifarlab.report.curves import save_figure

    maps = maps[:max_maps]
    cols = min(8, len(maps))
    fig = Figure(figsize=(cols * 0.9, -(-len(maps) // cols) * 0.9 + 0.4))
    for ax, m in zip(_grid_axes(fig, len(maps), cols), maps):
        ax.imshow(m.numpy(), cmap="viridis", interpolation="nearest")
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def confusion_figure(cm: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                     title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, and per-class accuracy in the row labels."""
    from matplotlib.figure import Figure

    from cifarlab.report.curves import save_figure

    k = cm.shape[0]
    names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
    acc = per_class_accuracy(cm)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, np.where(rows > 0, rows, 1))
    size = max(4.0, 0.45 * k + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), [f"{n} ({100 * a:.1f}%)" for n, a in zip(names, acc)], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true (per-class accuracy)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def mistakes_figure(rgb: np.ndarray, probs: np.ndarray, y_true, path: str | Path,
                    class_names: Sequence[str] | None = None) -> Path:
    """Images (N, H, W, 3) in [0, 1] with their true label, predicted label and its probability
    (``probs`` and ``y_true`` row i belong to image i)."""
    from matplotlib.figure import Figure

    from cifarlab.report.curves import save_figure

    def name(i):
        return class_names[i] if class_names and i < len(class_names) else str(i)

    n = max(1, len(rgb))
    cols = min(8, n)
    fig = Figure(figsize=(cols * 1.4, -(-n // cols) * 1.6 + 0.4))
    axes = _grid_axes(fig, n, cols)
    for ax, i in zip(axes, range(len(rgb))):
        ax.imshow(rgb[i])
        p = int(probs[i].argmax())
        ax.set_title(f"true: {name(int(y_true[i]))}\npred: {name(p)} {probs[i, p]:.2f}", fontsize=6)
    fig.suptitle("most confident mistakes (test set)" if len(rgb) else "no mistakes", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# -- all of it for one run --------------------------------------------------------------------
def run_insight(run_dir: str | Path, out_dir: str | Path | None = None, layer: str | None = None,
                n_mistakes: int = 16, data_root: str | None = None, which: str = "best") -> dict[str, Path]:
    """Write filters.png, feature_maps.png, confusion.png, mistakes.png and per_class.csv for a
    finished run into ``out_dir`` (default <run_dir>/insight/); return their paths."""
    import pandas as pd

    from cifarlab.interpret.gradcam import default_layer, denormalize
    from cifarlab.utils import atomic_write_text

    run = load_run_model(run_dir, which)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "insight"
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_test_images(run.cfg, run.info, data_root=data_root)
    probs = predict_probs(run.model, x)
    y_np = y.cpu().numpy()
    cm = confusion_matrix(y_np, probs.argmax(1), run.info.num_classes)
    acc = per_class_accuracy(cm)
    names = list(run.info.classes) or [str(i) for i in range(run.info.num_classes)]
    table = pd.DataFrame({"class": names, "examples": cm.sum(1), "correct": np.diag(cm),
                          "accuracy_pct": np.round(100 * acc, 2)})
    atomic_write_text(out / "per_class.csv", table.to_csv(index=False))
    layer = layer or default_layer(run.model, x.shape[1:], "previous")
    wrong = most_confident_mistakes(probs, y_np, n_mistakes)
    title = f"{run.cfg.model} on {run.cfg.dataset}: test accuracy {100 * np.trace(cm) / max(cm.sum(), 1):.2f}%"
    paths = {
        "filters": filter_grid_figure(run.model, out / "filters.png"),
        "feature_maps": feature_map_figure(feature_maps(run.model, layer, x[0]), out / "feature_maps.png",
                                           f"feature maps of {layer}, test image 0 (true: {names[int(y_np[0])]})"),
        "confusion": confusion_figure(cm, out / "confusion.png", names, title),
        "mistakes": mistakes_figure(denormalize(x[torch.as_tensor(wrong, dtype=torch.long)], run.info.mean, run.info.std), probs[wrong],
                                    y_np[wrong], out / "mistakes.png", names),
        "per_class": out / "per_class.csv",
    }
    return paths
