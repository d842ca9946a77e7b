"""Report sections: each study registers a function that turns run directories into markdown.

    @register_section("BatchNorm", order=30)
    def batchnorm_section(log_root: Path, img_dir: Path) -> str | None:
        ...  # read run directories under log_root, write figures into img_dir,
             # return markdown (links to figures relative to report/, i.e. "img/NAME.png"),
             # or None when there are no runs for this section.

Sections read run directories only; they never import the training code.
"""
from __future__ import annotations

import importlib
from typing import Callable

# One section module per course part (plus the course's part-1 modification study); imported
# by sections() so that their @register_section calls run.
SECTION_MODULES: tuple[str, ...] = (
    "cifarlab.report.section_modifications",
    "cifarlab.batchnorm.report_section",
    "cifarlab.dessilbi.report_section",
    "cifarlab.dropout.report_section",
    "cifarlab.edropout.report_section",
    "cifarlab.interpret.report_section",
)

_SECTIONS: list[tuple[int, str, Callable]] = []


def register_section(title: str, order: int = 50):
    def deco(fn):
        if not any(t == title for _, t, _ in _SECTIONS):  # a module re-imported registers once
            _SECTIONS.append((order, title, fn))
        return fn

    return deco


def sections() -> list[tuple[int, str, Callable]]:
    for path in SECTION_MODULES:
        importlib.import_module(path)
    return sorted(_SECTIONS, key=lambda s: (s[0], s[1]))
