"""The training engine: one loop (Trainer) with callbacks, checkpoints, run directories."""
from cifarlab.train.callbacks import Callback


def __getattr__(name):  # lazy: `from cifarlab.train import Trainer` without import cycles
    if name == "Trainer":
        from cifarlab.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["Callback", "Trainer"]
