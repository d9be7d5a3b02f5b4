"""Shared fixtures: tiny model configurations and checkpoints, synthetic files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_daeformer.engine.package_cache import CACHE_ENV
from napari_daeformer.model import DAEFormer, DAEFormerConfig
from napari_daeformer.model.checkpoint import ModelCard, save_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing
from napari_daeformer.session.annotation import ENV_FOLDER

OFFICIAL_TSV = Path(__file__).resolve().parent / "data" / "official_daeformer_state_dict.tsv"   # the released checkpoint's keys

TINY = DAEFormerConfig(num_classes=3, in_channels=1, embed_dims=(16, 32, 64), depths=(1, 1, 1), decoder_depths=(1, 1))


@pytest.fixture(autouse=True)
def autosave_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autosaved sessions go to a fresh folder per test, never to the user's home (nor from one test to the next)."""
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path_factory.mktemp("autosave")))


@pytest.fixture(autouse=True)
def int8_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled int8 packages go to one folder per test session (shared by its tests), never to the user's cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "int8-cache"))


@pytest.fixture(autouse=True)
def user_models_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models made from the docks (versions of bundled models, new models) go to a fresh folder, never home."""
    monkeypatch.setattr("napari_daeformer.plugin.control.finetune.USER_MODELS", tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def torch_threads_kept() -> Iterator[None]:
    """Each test leaves torch's thread count as it found it: one left at 1 ran every later training test on one of
    the 2 cores (the phase fine-tune took 67 s in the suite, 42 s alone)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        left = torch.get_num_threads()
        torch.set_num_threads(threads)
        pytest.fail(f"the test left torch at {left} threads (it found {threads})")


@pytest.fixture
def tiny_model() -> DAEFormer:
    torch.manual_seed(0)
    return DAEFormer(TINY).eval()


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_model: DAEFormer) -> Path:
    card = ModelCard(TINY, ("background", "a", "b"), input_size=(64, 64), preprocessing=ct_preprocessing())
    return save_checkpoint(tmp_path / "tiny.safetensors", tiny_model, card)


def official_rows() -> list[tuple[str, tuple[int, ...], bool]]:
    """(key, shape, used_in_forward) of the released official checkpoint, kept in tests/data/."""
    if not OFFICIAL_TSV.is_file():
        pytest.fail(f"{OFFICIAL_TSV} is missing: the official key list is part of the repository")
    rows = []
    for line in OFFICIAL_TSV.read_text().splitlines()[1:]:
        key, shape, used = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split("x")), used == "yes"))
    return rows


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float],
                       origin: tuple[float, float, float] = (-100.0, -120.0, 50.0),
                       series_uid: str = "1.2.826.0.1.3680043.8.498.1", slope: float = 1.0,
                       intercept: float = -1024.0, skip: tuple[int, ...] = (), prefix: str = "slice") -> None:
    """Write a (Z, Y, X) uint16 volume as an axial CT DICOM series (stored values = (HU - intercept) / slope)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(volume):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{prefix}{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.3"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PHANTOM", "Phantom^Synthetic", "", "O"
        ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "1", "", "", "", ""
        ds.FrameOfReferenceUID, ds.SeriesNumber = series_uid + ".1", 1
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.InstanceNumber = len(volume) - k                          # files not in position order
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = plane.astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"{prefix}{k:03d}.dcm"), enforce_file_format=True)
