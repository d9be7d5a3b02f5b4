"""`python -m napari_daeformer.app ...` is `daeformer ...` (what torchrun launches)."""

import os
import sys

# `python -m` puts the working folder first on the import path, where a user's own training.py (or training/) would
# shadow the installed `training` package; the command needs nothing from that folder.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from .cli import main  # noqa: E402

sys.exit(main())
