"""The generated report: run directories -> pandas tables -> markdown, matplotlib figures.

Every module in this package is imported so its @register_section calls run.
"""
import importlib
import pkgutil

from cifarlab.report.registry import register_section, sections

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["register_section", "sections"]
