"""DAE-Former: model, configuration and named presets (plain PyTorch)."""

from napari_daeformer.model.config import PRESETS, SIZE_MULTIPLE, DAEFormerConfig, named_config
from napari_daeformer.model.daeformer import DAEFormer, count_parameters

__all__ = ["DAEFormer", "DAEFormerConfig", "PRESETS", "SIZE_MULTIPLE", "count_parameters", "named_config"]
