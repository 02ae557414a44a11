"""VRN models (:mod:`.vrn`), their building blocks (:mod:`.blocks`), the Torch7 import
(:mod:`.torch7`) and our safetensors checkpoint format (:mod:`.checkpoint`)."""

from .blocks import BN_MODES, BatchNorm2d, Residual
from .vrn import (ARCHITECTURES, GUIDED_ARCHITECTURES, NUM_LANDMARKS, VRN, VRNConfig,
                  VRNGuided, VRNLandmarkGuided, VRNMultitask,
                  build_model, count_parameters, set_bn_mode)

__all__ = ["ARCHITECTURES", "BN_MODES", "GUIDED_ARCHITECTURES", "VRNLandmarkGuided", "NUM_LANDMARKS", "BatchNorm2d", "Residual", "VRN",
           "VRNConfig", "VRNGuided", "VRNMultitask", "build_model", "count_parameters",
           "set_bn_mode"]
from .checkpoint import ModelInfo, load_checkpoint, model_info, save_checkpoint
from .weights import load_model, random_model

__all__ += ["ModelInfo", "load_checkpoint", "load_model", "model_info", "random_model",
            "save_checkpoint"]
