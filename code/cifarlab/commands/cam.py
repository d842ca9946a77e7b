"""`python -m cifarlab cam`: Grad-CAM figure (images x methods) and ROAD scores for a run."""
from __future__ import annotations

import argparse
import json

NAME = "cam"
HELP = "class activation maps (Grad-CAM, Grad-CAM++, Score-CAM, ...) of a finished run, with ROAD scores"


def add_arguments(parser) -> None:
    from cifarlab.interpret.gradcam import DEFAULT_METHODS

    parser.add_argument("--run-dir", required=True, metavar="DIR", help="a run directory with checkpoints/best.pt")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2,...",
                        help=f"CAM methods, comma-separated (default: {','.join(DEFAULT_METHODS)}; "
                             "also xgradcam, eigengradcam)")
    parser.add_argument("--layer", default="last", metavar="NAME",
                        help="target layer: 'last' (e.g. resnet18 layer4), 'previous' (layer3, finer) "
                             "or a module name such as layer3.1")
    parser.add_argument("--n", type=int, default=8, help="number of test images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="which test images: a seeded random draw")
    parser.add_argument("--target", choices=("label", "pred"), default="label",
                        help="explain the true label (default) or the predicted class")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--road", action=argparse.BooleanOptionalAction, default=True,
                        help="compute the ROAD faithfulness score per method (default on)")
    parser.add_argument("--data-root", default=None, metavar="DIR", help="override the run's data root")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="auto (a GPU when there is one) | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--out", default=None, metavar="FILE", help="figure path (default <run-dir>/gradcam.png)")


def run(args) -> int:
    from pathlib import Path

    from cifarlab.interpret.gradcam import DISPLAY, cam_figure, cam_study, method_name
    from cifarlab.interpret.insight import load_run_model, load_test_images
    from cifarlab.errors import ConfigError
    from cifarlab.train.distributed import DistInfo, training_device
    from cifarlab.utils import atomic_write_text

    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.n < 1:
        raise ConfigError(f"--n must be positive, got {args.n}")
    methods = [method_name(m) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: give at least one method")
    device = training_device(args.device, DistInfo())  # checked: cuda without CUDA is one error line
    run = load_run_model(args.run_dir, args.checkpoint, device=device)
    x, y = load_test_images(run.cfg, run.info, n=args.n, seed=args.seed, data_root=args.data_root, device=device)
    study = cam_study(run.model, x, y.tolist(), methods, args.layer, target=args.target, road=args.road)
    out = Path(args.out) if args.out else Path(args.run_dir) / "gradcam.png"
    title = (f"{run.cfg.model} on {run.cfg.dataset}, layer {study.layer}, "
             f"{'true' if args.target == 'label' else 'predicted'} class explained")
    cam_figure(study, out, run.info.mean, run.info.std, run.info.classes, title)
    # a sidecar the report's interpretation section reads (it never loads models itself)
    meta = {"run_dir": str(args.run_dir), "model": run.cfg.model, "dataset": run.cfg.dataset,
            "checkpoint": args.checkpoint, "layer": study.layer, "target": args.target, "n": args.n,
            "seed": args.seed, "methods": methods,
            "road_combined": {m: round(s, 6) for m, s in study.road_table().items()}}
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    print(f"layer {study.layer}; figure: {out}")
    for m, s in study.road_table().items():
        print(f"  {DISPLAY[m]:<14} ROAD {s:+.4f}  (higher = more faithful)")
    return 0
