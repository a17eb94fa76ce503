"""g3n compiler: Gemma 3n checkpoint -> model -> torch-mlir export -> passes -> IREE."""

__version__ = "0.1.0"
