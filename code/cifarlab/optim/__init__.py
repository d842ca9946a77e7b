"""Optimizers, schedules and DessiLBI's SLBI."""
from cifarlab.optim.factory import build_optimizer, build_scheduler
from cifarlab.optim.registry import register_optimizer
import cifarlab.optim.slbi  # noqa: F401  registers "slbi" and "slbi_adam"
from cifarlab.optim.slbi import SLBI, SLBIAdam, slbi_param_groups

__all__ = ["SLBI", "SLBIAdam", "build_optimizer", "build_scheduler", "register_optimizer", "slbi_param_groups"]
