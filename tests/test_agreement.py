"""Agreement per model version: measures, the lineage's history in provenance, and its summary for the plot."""

from __future__ import annotations

import numpy as np

from napari_daeformer.session.agreement import as_provenance, by_version, history, measure, merged


def test_agreement_measures_and_lineage() -> None:
    proposal = np.zeros((4, 10, 10), np.uint8)
    proposal[:, 2:6, 2:6] = 1                                           # 16 voxels a slice
    final = proposal.copy()
    final[1, 2:6, 2:4] = 0                                              # the user removed half of slice 1's organ
    a = measure("ct", "m.safetensors", "ab" * 32, proposal, final, 3)
    assert a.slices_changed == 0.25 and a.slices == 4
    assert a.dice == round(2 * 56 / (64 + 56), 5)                        # pooled over the volume, class 1 only
    assert measure("ct", "m", "", proposal, proposal, 3).dice == 1.0
    b = measure("ct", "m-ft1.safetensors", "cd" * 32, final, final, 3)
    again = measure("ct", "m.safetensors", "ab" * 32, proposal, proposal, 3)   # the same case re-measured
    records = history({"agreement": [*as_provenance([a, b]), {"case": "broken"}]})
    assert records == [a, b]                                            # malformed entries are skipped
    versions = by_version(merged(records, [again]))
    assert [v.version for v in versions] == ["m.safetensors (abababab)", "m-ft1.safetensors (cdcdcdcd)"]
    assert versions[0].dice == 1.0 and versions[0].cases == 1           # the latest measure of a case wins
