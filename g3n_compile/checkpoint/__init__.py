"""Checkpoints in the Hugging Face layout: reading them (safetensors, name mapping, models filled tensor by tensor
or shaped for export, the towers a checkpoint holds), and writing random ones (the built-in tiny-random model,
E2B/E4B-shaped weights for benchmarks). Imports the model package, never the export or compile code."""

from .folder import Checkpoint, CheckpointError
from .load import load_model, load_text_model
from .preflight import check_checkpoint
from .presets import cache_root, resolve_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "check_checkpoint", "load_model", "load_text_model", "cache_root",
           "resolve_checkpoint"]
