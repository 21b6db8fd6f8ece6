"""Tolaria: the training loop, checkpoints, the governor, and distillation."""

from esper_ray.tolaria.trainer import Trainer

__all__ = ["Trainer"]
