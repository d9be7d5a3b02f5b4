"""npe2 activation: make napari open the medical formats with our reader.

napari 0.9's own reader also claims `.nii`, `.nii.gz`, `.dcm`, `.nrrd` and `.nhdr` (through imageio, which fails on
NIfTI, reads one DICOM file without Hounsfield units and an NRRD without its spacing, a `.seg.nrrd` as an image), so
with two readers and no preference `viewer.open` raises and the GUI asks which plugin to use. A plugin cannot rank
itself in its manifest; napari's answer is the reader preference (Preferences > Plugins,
`settings.plugins.extension2reader`). On its first activation (its sample, a dock, or the reader chosen once in the
dialog) the plugin sets that preference for the medical patterns the user has not assigned; a preference the user
chose is never replaced. TIFF and photos stay napari's choice to ask.
"""

from __future__ import annotations

from typing import Any

PLUGIN = "napari-daeformer"
MEDICAL_PATTERNS = ("*.nii", "*.nii.gz", "*.dcm", "*.nrrd", "*.nhdr")


def prefer_our_reader() -> list[str]:
    """Assign each unassigned medical pattern to our reader; the patterns assigned now."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    chosen = dict(plugins.extension2reader)
    new = [p for p in MEDICAL_PATTERNS if p not in chosen]
    if new:
        plugins.extension2reader = {**chosen, **dict.fromkeys(new, PLUGIN)}
    return new


def activate(context: Any) -> None:
    """npe2 `on_activate`: our reader preferred for the medical formats, said once in a notification."""
    from napari.utils.notifications import show_info

    if new := prefer_our_reader():
        show_info(f"DAE-Former now opens {', '.join(new)} files (change it in Preferences > Plugins)")
