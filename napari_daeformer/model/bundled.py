"""The demonstration models shipped inside the package (trained by this project on synthetic data)."""

from __future__ import annotations

from pathlib import Path

from napari_daeformer.base.errors import CheckpointError

MODELS_DIR = Path(__file__).parent.parent / "models"
BUNDLED = {"ct": "ct_small.safetensors", "skin": "skin_small.safetensors"}


def bundled_model(kind: str = "ct") -> Path:
    """Path of the bundled `ct` or `skin` demonstration checkpoint."""
    if kind not in BUNDLED:
        raise CheckpointError(f"no bundled model {kind!r}; choose one of {sorted(BUNDLED)}")
    path = MODELS_DIR / BUNDLED[kind]
    if not path.is_file():
        raise CheckpointError(f"the bundled {kind} model is missing from the installation ({path}); reinstall "
                              "napari-daeformer or pass --model")
    return path


def resolve_model(model: str | None, kind: str = "ct") -> Path:
    """A checkpoint path from --model: a file, the name of a bundled model, or None for the bundled `kind`."""
    if model is None:
        return bundled_model(kind)
    if model.lower() in BUNDLED and not Path(model).exists():
        return bundled_model(model.lower())
    if not Path(model).exists():
        raise CheckpointError(f"{model}: no such checkpoint (the bundled models are {' and '.join(sorted(BUNDLED))})")
    return Path(model)
