"""The old name of the training step (kept so existing scripts and tests import it unchanged).

The engine was split: applying a layout lives in :mod:`mtnlg.parallel.parallelize`, the step
(loss, gradient-sync scaling, clipping, the pipeline schedule) in :mod:`mtnlg.train.step`.
``build_engine(cfg, device)`` is :func:`mtnlg.train.step.build_train_step`.
"""

from __future__ import annotations

from mtnlg.parallel.mesh import init_distributed
from mtnlg.train.step import StepOutput, TrainStep, build_train_step

Engine = TrainStep
build_engine = build_train_step

__all__ = ["Engine", "StepOutput", "build_engine", "init_distributed"]
