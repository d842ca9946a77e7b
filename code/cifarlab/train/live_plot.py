"""Live curves in a notebook: ``make_config(..., live_plot=True)`` redraws the loss/accuracy
curves in the cell's output at the end of every epoch (one figure, replaced in place)."""
from __future__ import annotations

from cifarlab.train.callbacks import Callback


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm shows a widget and figures display inline)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class LivePlot(Callback):
    def __init__(self):
        self.handle = None

    def on_epoch_end(self, trainer, epoch: int, row: dict) -> None:
        if not trainer.is_main:
            return
        from cifarlab.report.curves import curves_figure

        rows = [*trainer.history, row]  # the Trainer appends row after the callbacks ran
        metrics = {k: [r[k] for r in rows if r.get(k) is not None]
                   for k in ("epoch", "train_loss", "val_loss", "train_acc", "val_acc")}
        fig = curves_figure(metrics, title=f"{trainer.cfg.model} on {trainer.cfg.dataset}: epoch {epoch}/{trainer.cfg.epochs}")
        try:
            from IPython.display import display
        except ImportError:
            return
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)


def callbacks_from_config(cfg) -> list[Callback]:
    return [LivePlot()] if getattr(cfg, "live_plot", False) else []
