"""CIFAR model families, one file each; every module registers its names on import."""
import importlib
import pkgutil

from cifarlab.models.registry import available_models, build_model, register_model

# Import every family module so that its @register_model calls run.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
# the structural-dropout networks live with their course part and register here too
importlib.import_module("cifarlab.dropout.networks")

__all__ = ["available_models", "build_model", "register_model"]
