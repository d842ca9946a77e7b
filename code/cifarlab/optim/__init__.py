"""Optimizers, schedules and DessiLBI's SLBI."""
from cifarlab.optim.factory import build_optimizer, build_scheduler
from cifarlab.optim.registry import register_optimizer

__all__ = ["build_optimizer", "build_scheduler", "register_optimizer"]
