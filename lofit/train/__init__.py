"""lofit-train: stage 1 selects heads with L1-regularised scales, stage 2 tunes offsets on them."""

from lofit.train.config import TrainConfig
from lofit.train.pipeline import train_adapter

__all__ = ["TrainConfig", "train_adapter"]
