"""Grad-CAM and friends on pytorch-grad-cam (the ``grad-cam`` package; nothing reimplemented).

What this module adds around the package:
- one target per image (``ClassifierOutputTarget`` per label): the package computes the CAM of
  image 0's class for every image when given a single target;
- a default target layer found from the model's own forward pass (the last module whose output
  is still a spatial map, e.g. resnet18's layer4), and the stage before it ("previous", e.g.
  layer3): on 32x32 or 28x28 inputs the last stage is only 4x4, too coarse to localise much;
- the model left as found: the package's constructor calls ``model.eval()`` and its backward
  pass fills ``.grad``; both are undone, and its hooks are released by its context manager;
- a faithfulness score per method with the package's ROAD metric (Rong et al. 2022);
- a figure grid of images x methods with true and predicted labels.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cifarlab.errors import ConfigError

# canonical name -> class name in pytorch_grad_cam
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "eigengradcam": "EigenGradCAM",
}
DEFAULT_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam", "hirescam")
_ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam": "gradcam",
            "grad-cam++": "gradcam++", "score-cam": "scorecam", "eigen-cam": "eigencam",
            "layer-cam": "layercam", "hires-cam": "hirescam"}
DISPLAY = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
           "eigencam": "Eigen-CAM", "layercam": "Layer-CAM", "hirescam": "HiRes-CAM",
           "xgradcam": "XGrad-CAM", "eigengradcam": "EigenGrad-CAM"}


def method_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ConfigError(f"unknown CAM method {name!r}; choose from: {', '.join(METHODS)}")
    return key


def method_class(name: str):
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, METHODS[method_name(name)])


# -- target layers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # (C, H, W) of the module's output for one image
    in_shape: tuple[int, ...] | None = None  # of its first input, when that is a map
    producer: str | None = None  # outermost module that returned the tensor it was given


def spatial_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerInfo]:
    """Modules whose output is a feature map (N, C, H, W), in the order their forward
    *finishes* (a stage finishes after its blocks), from one dry run on zeros. Each entry also
    says which module produced its input tensor (the last, i.e. outermost, to return it)."""
    order: list[LayerInfo] = []
    produced_by: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold tensors so their ids stay unique during the pass
    handles = []

    def hook(name):
        def fn(_module, inp, out):
            x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                in_shape = tuple(x.shape[1:]) if x is not None and x.dim() == 4 else None
                producer = produced_by.get(id(x)) if x is not None else None
                order.append(LayerInfo(name, tuple(out.shape[1:]), in_shape, producer))
                produced_by[id(out)] = name
                keep.append(out)
            if x is not None:
                keep.append(x)
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    device = _device(model)
    with _restored(model), torch.no_grad():
        model.eval()
        try:
            model(torch.zeros(1, *input_shape, device=device))
        finally:
            for h in handles:
                h.remove()
    # a module called several times (a shared activation) counts at its last call
    last = {info.name: i for i, info in enumerate(order)}
    return [info for i, info in enumerate(order) if last[info.name] == i]


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d)


def _area(shape) -> int:
    return shape[-1] * shape[-2]


def default_layer(model: nn.Module, input_shape: Sequence[int], which: str = "last") -> str:
    """Name of the default CAM layer, found from a dry forward pass.

    ``last``: the last module to finish whose output is a map of at least 2x2 (pooling and
    dropout skipped): a whole stage such as resnet18's layer4 (4x4 on 32x32 inputs).
    ``previous``: the output of the stage before: the module that produced the input of the
    outermost module stepping down from the next larger resolution to the last one's (layer4
    takes layer3's output, so resnet18 and resnet50 give layer3, wrn28_10 layer2, densenet121
    dense3) - a finer, less semantic map.
    """
    if which not in ("last", "previous"):
        raise ConfigError(f"layer choice must be 'last', 'previous' or a module name, got {which!r}")
    kinds = dict(model.named_modules())
    infos = spatial_layers(model, input_shape)
    maps = [i for i in infos if min(i.shape[1:]) >= 2 and not isinstance(kinds[i.name], _POOLS)]
    if not maps:
        raise ConfigError(f"{type(model).__name__} has no layer with a spatial output of at least 2x2 "
                          f"for inputs of shape {tuple(input_shape)}")
    last = maps[-1]
    if which == "last":
        return last.name
    area = _area(last.shape)
    bigger = [_area(i.shape) for i in maps if _area(i.shape) > area]
    if not bigger:
        raise ConfigError(f"{type(model).__name__}: no layer before {last.name!r} has a larger feature map")
    level = min(bigger)  # the next larger resolution
    # modules stepping down from that level to the last one's; infos is in finish order, so
    # the outermost of nested ones (layer4 around layer4.0 around its strided conv) finishes last
    steps = [i for i in infos if i.in_shape is not None and i.producer is not None
             and _area(i.in_shape) == level and _area(i.shape) <= area]
    if steps:
        finish = {i.name: k for k, i in enumerate(infos)}
        # the earliest-made input among the step-down modules is the previous stage's output
        # (layer4.0's strided conv gets a tensor made inside layer4.0, later than layer3's)
        return min((i.producer for i in steps), key=lambda name: finish.get(name, len(infos)))
    return [i for i in maps if _area(i.shape) == level][-1].name  # input made by a functional op


def resolve_layer(model: nn.Module, layer: str | None, input_shape: Sequence[int]) -> str:
    """'last' / 'previous' / None -> the default; a dotted module name is checked."""
    if layer in (None, "", "last", "previous"):
        return default_layer(model, input_shape, layer or "last")
    try:
        model.get_submodule(layer)
    except AttributeError:
        tops = [n for n, _ in model.named_children()]
        raise ConfigError(f"no layer {layer!r} in {type(model).__name__}; top-level modules: "
                          f"{', '.join(tops)} (or use 'last' / 'previous')") from None
    return layer


# -- leaving the model as we found it ---------------------------------------------------------
@contextlib.contextmanager
def _restored(model: nn.Module):
    """Restore every submodule's train/eval flag and every parameter's .grad on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, g in grads:
            p.grad = g


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _quiet():
    """ScoreCAM prints a tqdm bar per image to stderr; keep the CLI and notebooks clean."""
    return contextlib.redirect_stderr(io.StringIO())


# -- CAMs and their faithfulness --------------------------------------------------------------
def compute_cams(model: nn.Module, images: torch.Tensor, targets: Sequence[int], method: str = "gradcam",
                 layer: str | None = None, score_batch: int = 128) -> np.ndarray:
    """CAMs (N, H, W) in [0, 1], image i explained for class ``targets[i]``."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.dim() != 4:
        raise ConfigError(f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
    if len(targets) != images.shape[0]:
        raise ConfigError(f"need one target per image: {len(targets)} targets for {images.shape[0]} images")
    name = method_name(method)
    layer_name = resolve_layer(model, layer, images.shape[1:])
    target_layer = model.get_submodule(layer_name)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    device = _device(model)
    quiet = _quiet() if name == "scorecam" else contextlib.nullcontext()
    with _restored(model), torch.enable_grad(), quiet:
        with method_class(name)(model=model, target_layers=[target_layer]) as cam:  # releases its hooks
            if name == "scorecam":
                cam.batch_size = score_batch
            try:
                out = cam(input_tensor=images.to(device), targets=cam_targets)
            except IndexError as exc:  # the package's __exit__ swallows IndexError: re-raise as ours
                raise RuntimeError(f"{DISPLAY[name]} failed on layer {layer_name!r}: {exc}") from exc
    return np.asarray(out, dtype=np.float32)


def road_scores(model: nn.Module, images: torch.Tensor, cams: np.ndarray, targets: Sequence[int],
                percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90), seed: int = 0) -> np.ndarray:
    """ROAD-combined faithfulness per image (higher is better): the mean over percentiles of
    (confidence drop when the least relevant pixels are removed - drop when the most relevant
    are removed) / 2, removed pixels imputed by noisy linear interpolation (the package's ROAD)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    metric = ROADCombined(percentiles=list(percentiles))
    device = _device(model)
    with _restored(model), torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
        # the package hands torch tensors to NumPy ufuncs: a NumPy 2 deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        # the imputer adds noise on the CPU: seed the CPU generator only (forked above);
        # torch.manual_seed would also reseed the GPU generators, which fork_rng(devices=[]) leaves unforked
        torch.default_generator.manual_seed(seed)
        model.eval()
        scores = metric(images.to(device), cams, [ClassifierOutputTarget(int(t)) for t in targets], model)
    return np.asarray(scores, dtype=np.float32).reshape(-1)


@dataclass
class CamStudy:
    images: torch.Tensor  # normalised, as the model sees them
    labels: list[int]
    preds: list[int]
    layer: str
    cams: dict[str, np.ndarray]  # method -> (N, H, W)
    road: dict[str, np.ndarray]  # method -> (N,) ROAD-combined score; empty if not computed

    def road_table(self) -> dict[str, float]:
        return {m: float(np.mean(s)) for m, s in self.road.items()}


def predict(model: nn.Module, images: torch.Tensor) -> list[int]:
    device = _device(model)
    with _restored(model), torch.no_grad():
        model.eval()
        return model(images.to(device)).argmax(1).cpu().tolist()


def cam_study(model: nn.Module, images: torch.Tensor, labels: Sequence[int],
              methods: Sequence[str] = DEFAULT_METHODS, layer: str | None = None,
              target: str = "label", road: bool = True,
              road_percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90)) -> CamStudy:
    """Every method on one batch, explained for the true label (``target='label'``) or for the
    model's prediction (``target='pred'``), with ROAD scores per method."""
    if target not in ("label", "pred"):
        raise ConfigError(f"target must be 'label' or 'pred', got {target!r}")
    labels = [int(v) for v in labels]
    preds = predict(model, images)
    targets = labels if target == "label" else preds
    layer_name = resolve_layer(model, layer, images.shape[1:])
    names = [method_name(m) for m in methods]
    cams = {m: compute_cams(model, images, targets, m, layer_name) for m in names}
    scores = {m: road_scores(model, images, cams[m], targets, road_percentiles) for m in names} if road else {}
    return CamStudy(images.detach().cpu(), labels, preds, layer_name, cams, scores)


# -- the figure -------------------------------------------------------------------------------
def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, C, H, W) normalised tensor -> (N, H, W, 3) float RGB in [0, 1] (gray repeated)."""
    x = images.detach().cpu().float()
    c = x.shape[1]
    m = torch.tensor(list(mean) * (c if len(mean) == 1 else 1)).view(1, c, 1, 1)
    s = torch.tensor(list(std) * (c if len(std) == 1 else 1)).view(1, c, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if c == 1:
        x = x.repeat(1, 3, 1, 1)
    elif c != 3:
        x = x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def cam_figure(study: CamStudy, path: str | Path, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
               class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Rows: images; columns: the image, then one overlay per method (ROAD score in the title)."""
    from matplotlib.figure import Figure
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from cifarlab.report.curves import save_figure

    rgb = denormalize(study.images, mean, std)
    methods = list(study.cams)
    n, cols = len(rgb), 1 + len(methods)

    def label(i):
        return class_names[i] if class_names and i < len(class_names) else str(i)

    fig = Figure(figsize=(1.5 * cols, 1.55 * n + (0.5 if title else 0.2)))
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    for r in range(n):
        ax = axes[r][0]
        ax.imshow(rgb[r])
        ok = study.preds[r] == study.labels[r]
        ax.set_title(f"true: {label(study.labels[r])}\npred: {label(study.preds[r])}", fontsize=7,
                     color="black" if ok else "red")
        for c, m in enumerate(methods, start=1):
            axes[r][c].imshow(show_cam_on_image(rgb[r].astype(np.float32), study.cams[m][r], use_rgb=True))
            if r == 0:
                head = DISPLAY[m]
                if m in study.road:
                    head += f"\nROAD {float(np.mean(study.road[m])):+.3f}"
                axes[r][c].set_title(head, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run_cam(run_dir: str | Path, *, methods: Sequence[str] = DEFAULT_METHODS, layer: str = "last", n: int = 8,
            seed: int = 0, target: str = "label", checkpoint: str = "best", road: bool = True,
            data_root: str | None = None, device: str = "auto", out: str | Path | None = None):
    """The CAM figure of a finished run (``n`` seeded test images x ``methods``) and its sidecar
    ``<figure>.json`` (layer, target, ROAD per method) that the report's interpretation section
    reads. Returns (CamStudy, figure path). ``python -m cifarlab cam`` calls this."""
    import json

    from cifarlab.interpret.insight import load_run_model, load_test_images
    from cifarlab.train.distributed import DistInfo, training_device
    from cifarlab.utils import atomic_write_text

    if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if n < 1:
        raise ConfigError(f"the number of images must be positive, got {n}")
    methods = [method_name(m) for m in methods if m.strip()]
    if not methods:
        raise ConfigError("give at least one CAM method")
    dev = training_device(device, DistInfo())  # checked: cuda without CUDA is one error line
    run = load_run_model(run_dir, checkpoint, device=dev)
    x, y = load_test_images(run.cfg, run.info, n=n, seed=seed, data_root=data_root, device=dev)
    study = cam_study(run.model, x, y.tolist(), methods, layer, target=target, road=road)
    out = Path(out) if out else Path(run_dir) / "gradcam.png"
    title = (f"{run.cfg.model} on {run.cfg.dataset}, layer {study.layer}, "
             f"{'true' if target == 'label' else 'predicted'} class explained")
    cam_figure(study, out, run.info.mean, run.info.std, run.info.classes, title)
    meta = {"run_dir": str(run_dir), "model": run.cfg.model, "dataset": run.cfg.dataset, "checkpoint": checkpoint,
            "layer": study.layer, "target": target, "n": n, "seed": seed, "methods": methods,
            "road_combined": {m: round(s, 6) for m, s in study.road_table().items()}}
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return study, out
