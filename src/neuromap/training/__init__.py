"""Training: config -> patient-level split -> cached preprocessing -> sampling/augmentation -> loop."""

from neuromap.training.loop import RunResult, train

__all__ = ["RunResult", "train"]
