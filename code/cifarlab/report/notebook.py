"""Showing report pieces in a notebook: markdown whose figure links work from the kernel's
working directory (Jupyter serves files relative to the notebook, i.e. notebooks/)."""
from __future__ import annotations

import os
from pathlib import Path


def relink(markdown: str, img_dir: str | Path) -> str:
    """Point a section's ``](img/...)`` links at ``img_dir`` relative to the working directory."""
    rel = Path(os.path.relpath(Path(img_dir).resolve(), Path.cwd())).as_posix()
    return markdown.replace("](img/", f"]({rel}/")


def show_markdown(markdown: str | None, img_dir: str | Path, empty: str = "_nothing to show yet_") -> None:
    from IPython.display import Markdown, display

    display(Markdown(relink(markdown, img_dir) if markdown else empty))
