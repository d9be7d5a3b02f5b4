"""`daeformer interpolate`: fill the slices between the painted ones of a label map (`session.fill`), written with
the label map's own geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_daeformer.app.options import whole
from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.io import check_label_path, read_image, write_labels
from napari_daeformer.io.record import label_values
from napari_daeformer.session.fill import check_fill, fill_between


def add_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("labels", type=Path, help="label map painted on a few slices (NIfTI, NRRD/.seg.nrrd, TIFF)")
    p.add_argument("output", type=Path, help="the filled label map (same geometry)")
    p.add_argument("--slices", help="the painted slices along --axis, e.g. 3,5,10-12 (default: every slice holding a "
                   "label, or with --ignore-value every slice holding any other value)")
    p.add_argument("--axis", type=whole(0, 2), default=0, help="the slice axis of the array (default: %(default)s)")
    p.add_argument("--ignore-value", type=whole(0, 65535), help="label value meaning 'not annotated' (kept where "
                   "nothing is filled)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def run_interpolate(args: argparse.Namespace) -> int:
    from napari_daeformer.app.learn import slice_list

    check_label_path(args.output, overwrite=args.overwrite, source=args.labels)
    record = read_image(args.labels)
    labels = label_values(record.data, len(record.spatial_shape), args.labels.name)
    if labels.ndim != 3:
        raise DaeformerError(f"{args.labels.name}: a {labels.ndim}D label map has no slices to fill between")
    count = labels.shape[args.axis]
    unannotated = np.zeros(labels.shape, bool) if args.ignore_value is None else labels == args.ignore_value
    per_slice = tuple(a for a in range(3) if a != args.axis)
    if args.slices:
        painted = slice_list(args.slices, count)
    elif args.ignore_value is not None:
        painted = (~unannotated).any(axis=per_slice)
    else:
        painted = (labels != 0).any(axis=per_slice)
    annotated = np.where(unannotated, 0, labels)
    _, between = check_fill(annotated, painted, args.axis)
    filled = fill_between(annotated, painted, args.axis)
    kept = np.expand_dims(~between, per_slice) & unannotated       # "not annotated" where nothing was filled
    out = np.where(kept, labels, filled)
    written = write_labels(args.output, out.astype(np.uint16 if out.max() > 255 else np.uint8), record,
                           overwrite=args.overwrite)
    print(f"filled {int(between.sum())} slice(s) between {int(painted.sum())} painted along axis {args.axis}; wrote {written}")
    return 0
