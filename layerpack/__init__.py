"""layerpack: convert Hugging Face checkpoints into per-layer packs, verify, inspect and share them.
The format code itself lives in layerpack_runtime (the lightweight runtime distribution)."""

__version__ = "0.1.0"
