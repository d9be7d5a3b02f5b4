"""How much memory one file may make us allocate: what the machine has free, unless the user raises the limit.

Readers and the checkpoint loader compare what a header announces (with the copies they make) against this limit
before allocating, so a 65-byte file claiming 17 GB is refused in a line instead of swapping the machine.
"""

from __future__ import annotations

import os
import re

from napari_daeformer.base.errors import DaeformerError

ENV = "DAEFORMER_MEMORY_LIMIT"
SHARE_OF_AVAILABLE = 0.8                   # leave the rest to the viewer, the engine and the system
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """"64G", "512M", "1.5T" or plain bytes -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise DaeformerError(f"{ENV}={text!r}: give a size such as 64G or 512M")
    size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not size < 2**80:                                  # a 400-digit number is inf as a float
        raise DaeformerError(f"{ENV}={text[:20]!r}{'...' if len(text) > 20 else ''}: more memory than any machine "
                             "has; give a size such as 64G or 512M")
    return int(size)


def available_bytes() -> int:
    """Memory the kernel says can be allocated without swapping (MemAvailable), or free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):           # macOS/Windows without the names: trust the header
        return 2**62


def memory_limit() -> int:
    """Bytes one file may take: $DAEFORMER_MEMORY_LIMIT if set, else 80 % of the available memory."""
    text = os.environ.get(ENV)
    return parse_size(text) if text else int(SHARE_OF_AVAILABLE * available_bytes())


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KB" (binary units)."""
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def check_allocation(name: str, needed: int, what: str, error: type[DaeformerError] = DaeformerError) -> None:
    """Raise `error` naming `name` when `needed` bytes exceed the limit, with the numbers and how to raise it."""
    limit = memory_limit()
    if needed > limit:
        where = f"the limit {ENV}={os.environ[ENV]}" if os.environ.get(ENV) else "what this machine has free"
        raise error(f"{name}: {what} needs {format_bytes(needed)} of memory, more than {where} "
                    f"({format_bytes(limit)}); to allow it, set {ENV} (e.g. {ENV}=64G) or --memory-limit")
