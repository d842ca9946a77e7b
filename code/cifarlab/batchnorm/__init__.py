"""Course part 2: how BatchNorm helps optimisation (Santurkar et al. 2018).

- landscape.py       the course's loss landscape: one model per learning rate, the min/max band,
                     and the course's ||g_t - g_(t-1)|| and ||w_t - w_(t-1)|| at every step
- probes.py          Santurkar et al.'s probes along the gradient (pure functions): absolute and
                     relative step sizes, fp32, train mode, one dropout mask per probe
- probe_callback.py  the probes as a training callback (every K steps, training untouched, no
                     host sync at a probed step)
- figures.py         per seed: landscape band, the course's predictiveness band and beta curve,
                     Santurkar's probe figures; the numbers and the yes/no answers per model pair
- study.py           ``run_study(...)``: the whole study (notebook 04, ``python -m cifarlab bn``,
                     tests), with resume and the probe-overhead stage; ``load_study(run_dir)``
- report_section.py  the report's BatchNorm section (reads run directories only)
"""
from cifarlab.lazy_api import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "run_study": "cifarlab.batchnorm.study",
    "load_study": "cifarlab.batchnorm.study",
    "StudyResult": "cifarlab.batchnorm.study",
    "BNProbeCallback": "cifarlab.batchnorm.probe_callback",
    "probe_along_gradient": "cifarlab.batchnorm.probes",
})
__all__ = ["run_study", "load_study", "StudyResult", "BNProbeCallback", "probe_along_gradient"]
