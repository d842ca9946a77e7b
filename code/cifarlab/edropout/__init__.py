"""Energy-based dropout (EDropout, Salehinejad & Valaee): a population of binary unit states
evolved by differential evolution on a margin energy; the best state masks each training step.

- search.py          energy, population, DE/rand/1 mutation, crossover, selection (pure functions)
- unit_masks.py      prunable units (conv filters + their BN, classifier inputs) and their masks
- callback.py        ``EDropout``: the search as a training callback (``--edropout``)
- export.py          the physically pruned network of a state; R (paper), params and FLOPs kept
- recalibrate.py     BatchNorm statistics for the all-on network (EDropout F), restored bit for bit
- bench.py           search and frozen step cost vs a plain step (``bench edropout``)
- report_section.py  the report's EDropout table (reads run directories only)
"""
from cifarlab.lazy_api import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "EDropout": "cifarlab.edropout.callback",
    "export_pruned": "cifarlab.edropout.export",
    "r_paper": "cifarlab.edropout.export",
    "recalibrate_bn": "cifarlab.edropout.recalibrate",
    "bn_state_restored": "cifarlab.edropout.recalibrate",
    "bench_edropout": "cifarlab.edropout.bench",
})
__all__ = ["EDropout", "export_pruned", "r_paper", "recalibrate_bn", "bn_state_restored", "bench_edropout"]
