"""The planner: memory, FLOPs, communication and time of 3D-parallel layouts, and schedule timelines.

``presets`` (architectures), ``gpus`` (accelerator table), ``flops`` (eq. 2 / eq. 3), ``memory``
(ZeRO model states, Korthikanti activations), ``comm`` (volumes per dimension), ``schedule`` (torch's
pipeline op orders, their simulation, bubble fractions), ``profile`` (machine profiles: matmul rates by
shape, bandwidths, collectives; shipped A100/H100 ones under ``profiles/``), ``timemodel`` (iteration
time from parts), ``calibrate`` (measure this machine into a profile), ``estimate`` (one layout -> a
:class:`Plan`), ``search`` (rank all valid layouts), ``timeline`` (draw a schedule).
"""

from mtnlg.plan.estimate import Layout, Plan, plan
from mtnlg.plan.gpus import GPUS, get_gpu
from mtnlg.plan.presets import PRESETS, PlanModel, load_model

__all__ = ["GPUS", "PRESETS", "Layout", "Plan", "PlanModel", "get_gpu", "load_model", "plan"]
