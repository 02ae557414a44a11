"""Training VRN models with the paper's recipe (:mod:`.loop`)."""

from .loop import Augmentation, TrainConfig, augment_sample, train, volume_targets

__all__ = ["Augmentation", "TrainConfig", "augment_sample", "train", "volume_targets"]
