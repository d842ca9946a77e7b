"""`python -m cifarlab cam`: Grad-CAM figure (images x methods) and ROAD scores for a run."""
from __future__ import annotations

import argparse

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
    from cifarlab.interpret.gradcam import DISPLAY, run_cam

    study, out = run_cam(args.run_dir, methods=args.methods.split(","), layer=args.layer, n=args.n, seed=args.seed,
                         target=args.target, checkpoint=args.checkpoint, road=args.road, data_root=args.data_root,
                         device=args.device, out=args.out)
    print(f"layer {study.layer}; figure: {out}")
    for m, s in study.road_table().items():
        print(f"  {DISPLAY[m]:<14} ROAD {s:+.4f}  (higher = more faithful)")
    return 0
