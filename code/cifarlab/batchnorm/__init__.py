"""Course part 2: how BatchNorm helps optimisation.

- landscape.py       the course's loss landscape: one model per learning rate, min/max band
- probes.py          Santurkar et al.'s probes along the gradient (pure functions)
- probe_callback.py  the probes as a training callback (every k steps, training untouched)
- figures.py         band, predictiveness and beta-smoothness figures
- study.py           ``run_study(...)``: the whole study (notebook 04, ``python -m cifarlab bn``)
- report_section.py  the report's BatchNorm section (reads run directories only)
"""
from cifarlab.lazy_api import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "run_study": "cifarlab.batchnorm.study",
    "BNProbeCallback": "cifarlab.batchnorm.probe_callback",
    "probe_along_gradient": "cifarlab.batchnorm.probes",
})
__all__ = ["run_study", "BNProbeCallback", "probe_along_gradient"]
