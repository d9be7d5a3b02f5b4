"""The inference engine: slice-by-slice inference (`inference.SliceInferer`), its numeric paths and transfers, the
device choice, the machine probes and static int8. Plain PyTorch: no Qt, no training."""
