"""Looking inside a trained model (the course's "insight" part of the report).

- gradcam.py         CAM methods through pytorch-grad-cam, target layers, ROAD scores, figure
- insight.py         load a run's model and test images; filters, feature maps, confusion
                     matrix, per-class accuracy, the most confident mistakes
- report_section.py  the report's interpretation section (reads run directories only)
"""
from cifarlab.lazy_api import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "cam_study": "cifarlab.interpret.gradcam",
    "cam_figure": "cifarlab.interpret.gradcam",
    "run_cam": "cifarlab.interpret.gradcam",
    "run_insight": "cifarlab.interpret.insight",
    "load_run_model": "cifarlab.interpret.insight",
    "load_test_images": "cifarlab.interpret.insight",
})
__all__ = ["cam_study", "cam_figure", "run_cam", "run_insight", "load_run_model", "load_test_images"]
