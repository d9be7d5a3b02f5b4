"""`python -m napari_daeformer.app ...` is `daeformer ...` (what torchrun launches)."""

import sys

from napari_daeformer.app.cli import main

sys.exit(main())
