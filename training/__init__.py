"""The bundled DAE-Former trainer: plain PyTorch, no Qt. `daeformer train` and the fine-tune widget use it."""
