"""Network interpretation (seed 004): the Grad-CAM and insight figures made for finished runs.

The report never loads a model (it reads run directories only), so the figures are made
beforehand by the commands and picked up here:
  python -m cifarlab cam --run-dir RUN       -> RUN/gradcam.png + RUN/gradcam.json (layer, ROAD)
  python -m cifarlab insight --run-dir RUN   -> RUN/insight/{filters,feature_maps,confusion,mistakes}.png
Each is copied into report/img/ under a name made from the run's group and name.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cifarlab.report.build import slug, find_runs, markdown_table
from cifarlab.report.registry import register_section

INSIGHT = (("filters", "first-layer filters"), ("feature_maps", "feature maps"),
           ("confusion", "confusion matrix and per-class accuracy"), ("mistakes", "most confident mistakes"))
NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM", "eigencam": "Eigen-CAM",
         "layercam": "Layer-CAM", "hirescam": "HiRes-CAM", "xgradcam": "XGrad-CAM", "eigengradcam": "EigenGrad-CAM"}


def _copy(src: Path, img_dir: Path, name: str) -> str:
    shutil.copyfile(src, img_dir / name)
    return f"img/{name}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@register_section("Network interpretation: Grad-CAM and insight", order=80)
def interpretation_section(log_root: Path, img_dir: Path) -> str | None:
    import pandas as pd

    parts: list[str] = []
    for run in find_runs(log_root):
        cam_png = run.path / "gradcam.png"
        insight = [(key, label, run.path / "insight" / f"{key}.png") for key, label in INSIGHT]
        insight = [t for t in insight if t[2].is_file()]
        if not cam_png.is_file() and not insight:
            continue
        stem = slug(f"{run.group}-{run.name}")
        parts += [f"### {run.group} / {run.name}", ""]
        if cam_png.is_file():
            meta = _read_json(run.path / "gradcam.json")
            link = _copy(cam_png, img_dir, f"gradcam-{stem}.png")
            what = (f"{run.model} on {run.dataset}, layer `{meta.get('layer', '?')}`, "
                    f"{meta.get('n', '?')} test images (seed {meta.get('seed', '?')}), each explained for its "
                    f"{'true' if meta.get('target', 'label') == 'label' else 'predicted'} class; "
                    f"checkpoint {meta.get('checkpoint', 'best')}.pt"
                    + (f" (test accuracy {100 * run.summary['test_acc']:.2f}%)." if run.summary.get("test_acc") is not None
                       else "."))
            parts += [what, "", f"![Grad-CAM, {run.name}]({link})", ""]
            road = meta.get("road_combined") or {}
            if road:
                table = pd.DataFrame({"method": [NAMES.get(m, m) for m in road],
                                      "ROAD combined (higher = more faithful)": [f"{float(v):+.4f}" for v in road.values()]})
                parts += [markdown_table(table), ""]
        for key, label, src in insight:
            parts += [f"![{label}]({_copy(src, img_dir, f'{key}-{stem}.png')})", ""]
    if not parts:
        return None
    intro = ("Class activation maps from the `grad-cam` package (pytorch-grad-cam), one target per image. "
             "ROAD (Rong et al. 2022, the package's `ROADCombined`) removes the most / least relevant "
             "pixels at 10-90% and imputes them by noisy linear interpolation; the score is half the "
             "difference of the resulting confidence drops, so higher means the map points at what the "
             "model uses. Made by `python -m cifarlab cam --run-dir RUN` and `python -m cifarlab insight --run-dir RUN`.")
    return "\n".join([intro, ""] + parts)
