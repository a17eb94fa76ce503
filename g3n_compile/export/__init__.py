"""PyTorch models -> torch-dialect MLIR with external parameters: one recipe (program.py) over the entry points
the module ABI (runtime/abi.py) declares, for the text decoder (text.py) and the towers (encoders.py)."""
