"""Course part 3: pruning with DessiLBI (SLBI itself is an optimizer: cifarlab/optim/slbi.py).

- toolbox.py         W*, selected filters, prune orders, percentile pruning (pure functions)
- callbacks.py       SLBIPath (per-epoch bookkeeping), SLBIExperiment (end-of-run analysis),
                     MaskedFinetune (fine-tune W* with its mask fixed)
- physical_prune.py  remove pruned channels physically (Torch-Pruning), FLOPs, speed-up
- experiment.py      ``run(...)``: train + analyse (notebook 05, ``python -m cifarlab slbi``)
- report_section.py  the report's DessiLBI section (reads run directories only)
"""
from cifarlab.lazy_api import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "run": "cifarlab.dessilbi.experiment",
    "SLBIExperiment": "cifarlab.dessilbi.callbacks",
    "MaskedFinetune": "cifarlab.dessilbi.callbacks",
    "export_pruned": "cifarlab.dessilbi.physical_prune",
    "compare_models": "cifarlab.dessilbi.physical_prune",
})
__all__ = ["run", "SLBIExperiment", "MaskedFinetune", "export_pruned", "compare_models"]
