"""DAE-Former: model, configuration and named presets (plain PyTorch)."""

from .config import PRESETS, SIZE_MULTIPLE, DAEFormerConfig, named_config
from .daeformer import DAEFormer, count_parameters

__all__ = ["DAEFormer", "DAEFormerConfig", "PRESETS", "SIZE_MULTIPLE", "count_parameters", "named_config"]
