"""VRN models (:mod:`.vrn`), their building blocks (:mod:`.blocks`), the Torch7 import
(:mod:`.torch7`) and our safetensors checkpoint format (:mod:`.checkpoint`)."""

from .blocks import BN_MODES, BatchNorm2d, Residual
from .checkpoint import ModelInfo, load_checkpoint, model_info, save_checkpoint
from .vrn import (
    ARCHITECTURES,
    GUIDED_ARCHITECTURES,
    NUM_LANDMARKS,
    VRN,
    VRNConfig,
    VRNGuided,
    VRNLandmarkGuided,
    VRNMultitask,
    bn_mode_of,
    build_model,
    count_parameters,
    set_bn_mode,
)
from .weights import load_model, random_model

__all__ = ["ARCHITECTURES", "BN_MODES", "GUIDED_ARCHITECTURES", "NUM_LANDMARKS", "VRN",
           "BatchNorm2d", "ModelInfo", "Residual", "VRNConfig", "VRNGuided",
           "VRNLandmarkGuided", "VRNMultitask", "bn_mode_of", "build_model",
           "count_parameters", "load_checkpoint", "load_model", "model_info",
           "random_model", "save_checkpoint", "set_bn_mode"]
