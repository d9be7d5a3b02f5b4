"""`--isa avx2`: run a benchmark as on an x86 CPU without AVX-512 (so without native bf16 or VNNI), on one with them.

torch's own kernels (ATen), oneDNN, MKL and FBGEMM each read a variable that caps the instructions they use. Set
before torch starts (the process is re-run with them), they make this CPU compute with the instructions of an
AVX2-only CPU at the same clock and core count; its caches and memory stay this CPU's. On an AMD Zen 4 (which runs
AVX-512 as two 256-bit halves) fp32 throughput is unchanged by the cap, while bf16 becomes emulated and int8 loses
VNNI, as on an AVX2-only CPU.
"""

from __future__ import annotations

import os
import sys

ISAS = ("native", "avx2")
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def limit_isa(isa: str) -> None:
    """Re-run this process with the instruction-set caps of `isa`; nothing for `native` or once they are set."""
    if isa == "native" or all(os.environ.get(k) == v for k, v in AVX2_ONLY.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})


def isa_in_use() -> str:
    """What the run's instruction set is, for the report."""
    import torch
    capped = os.environ.get("ATEN_CPU_CAPABILITY") == "avx2"
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}" + (" (capped by --isa avx2)" if capped else "")
