"""g3n runtime: run compiled Gemma 3n folders with IREE (no torch needed)."""

from .generate import LLM, Generation, load
from .module import ModelError
from .sampling import SamplingParams

__all__ = ["load", "LLM", "Generation", "SamplingParams", "ModelError"]
