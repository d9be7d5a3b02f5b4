"""`python -m napari_daeformer.app ...` is `daeformer ...` (what torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
