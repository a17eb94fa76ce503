"""g3n runtime: run compiled Gemma 3n folders with IREE (no torch needed).

Every error the runtime raises for something the caller gave (a folder, a file, a request) is a
`UserError` with a one-line message; `ModelError` (a folder that cannot be used), `RequestError` (a bad
argument to generate/chat) and `SamplingError` (bad sampling parameters) are the ones apps catch most."""

from .errors import UserError
from .generate import LLM, Generation, RequestError, load
from .module import ModelError
from .sampling import SamplingError, SamplingParams

__all__ = ["load", "LLM", "Generation", "SamplingParams", "ModelError", "RequestError", "SamplingError", "UserError"]
