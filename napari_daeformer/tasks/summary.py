"""A batch run's record, one row per file: `summary.csv` (and each rank's progress rows until it is written), read
back by a run started again, ranked by the model's doubt, and safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import printable

SUMMARY = "summary.csv"
PROGRESS = ".summary-progress.rank{rank}.csv"   # each rank's rows so far, until the summary is written


@dataclass(kw_only=True)
class FileResult:
    input: str                       # relative to input_dir
    output: str                      # relative to output_dir ("" when failed)
    status: str                      # done, existing, failed
    reason: str = ""
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    seconds: float = 0.0
    measures: dict[str, float] = field(default_factory=dict)
    unit: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    mean_entropy: float | None = None          # mean predictive entropy (nats) over the image: the model's doubt
    uncertain_slice: int | None = None         # the slice (axis 0) with the highest mean entropy



def read_earlier(folder: Path) -> dict[str, FileResult]:
    """input -> what earlier runs in `folder` say of it (seconds, uncertainty, checkpoint): its summary.csv, then
    the progress rows of a run killed before its summary; empty when there are none. Cells that do not parse are
    left unknown."""
    found: dict[str, FileResult] = {}
    for path in [folder / SUMMARY, *sorted(folder.glob(PROGRESS.format(rank="*")))]:
        found.update(_summary_rows(path))
    return found


def _summary_rows(summary: Path) -> dict[str, FileResult]:
    try:
        with open(summary, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    found = {}
    for row in rows:
        if row.get("status") not in ("done", "existing") or not row.get("input"):
            continue
        entropy, slice_, seconds = _number(row, "mean_entropy", float), _number(row, "most_uncertain_slice", int), \
            _number(row, "seconds", float)
        found[uncell(row["input"])] = FileResult(
            input=uncell(row["input"]), output=uncell(row.get("output") or ""), status="existing", seconds=seconds or 0.0,
            checkpoint=uncell(row.get("checkpoint") or ""), checkpoint_sha256=row.get("checkpoint_sha256") or "",
            mean_entropy=entropy, uncertain_slice=slice_)
    return found


def _number(row: dict[str, str], key: str, kind: type[float] | type[int]) -> float | int | None:
    try:
        return kind(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def ranked(results: list[FileResult]) -> list[FileResult]:
    """Most uncertain first (highest mean entropy); files without a measure (failed) last, by name."""
    return sorted(results, key=lambda r: (r.mean_entropy is None, -(r.mean_entropy or 0.0), r.input))


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")      # a spreadsheet runs a cell starting so as a formula


def cell(text: str) -> str:
    """`text` safe to open in a spreadsheet: a leading formula character is quoted with an apostrophe (OWASP)."""
    return f"'{text}" if text.startswith(FORMULA_START) else text


def uncell(text: str) -> str:
    """`cell` undone."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def summary_csv(results: list[FileResult]) -> str:
    """CSV text: one row per file with shape, spacing, seconds, uncertainty (mean predictive entropy in nats and the
    most uncertain slice), per-class measures, checkpoint name and hash."""
    classes: list[str] = []
    for r in results:
        classes += [c for c in r.measures if c not in classes]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["input", "output", "status", "reason", "shape", "spacing_mm", "seconds", "mean_entropy",
                     "most_uncertain_slice", "unit", *map(cell, classes), "checkpoint", "checkpoint_sha256"])
    for r in results:                                      # names as valid UTF-8 (\xNN for undecodable bytes)
        writer.writerow([cell(printable(r.input)), cell(printable(r.output)), r.status, cell(printable(r.reason)),
                         "x".join(map(str, r.shape)),
                         "x".join(f"{s:g}" for s in r.spacing), f"{r.seconds:.3f}",
                         "" if r.mean_entropy is None else f"{r.mean_entropy:.5f}",
                         "" if r.uncertain_slice is None else r.uncertain_slice, r.unit,
                         *(f"{r.measures[c]:.3f}" if c in r.measures else "" for c in classes),
                         cell(r.checkpoint), r.checkpoint_sha256])
    return out.getvalue()


def write_summary(folder: Path, results: list[FileResult], name: str = SUMMARY) -> Path:
    """`name` in the output `folder`, atomically; the whole run's summary.csv replaces the progress files."""
    text = summary_csv(results)
    out = atomic_write(folder / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if name == SUMMARY:
        for progress in folder.glob(PROGRESS.format(rank="*")):
            progress.unlink(missing_ok=True)
    return out
