"""Report sections: each study registers a function that turns run directories into markdown.

    @register_section("BatchNorm", order=30)
    def batchnorm_section(log_root: Path, img_dir: Path) -> str | None:
        ...  # read run directories under log_root, write figures into img_dir,
             # return markdown (links to figures relative to report/, i.e. "img/NAME.png"),
             # or None when there are no runs for this section.

Sections read run directories only; they never import the training code.
"""
from __future__ import annotations

from typing import Callable

_SECTIONS: list[tuple[int, str, Callable]] = []


def register_section(title: str, order: int = 50):
    def deco(fn):
        _SECTIONS.append((order, title, fn))
        return fn

    return deco


def sections() -> list[tuple[int, str, Callable]]:
    return sorted(_SECTIONS, key=lambda s: (s[0], s[1]))
