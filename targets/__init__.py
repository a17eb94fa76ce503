"""Per-target IREE settings: each module owns its compile flags and runtime driver."""

from . import cpu

TARGETS = {cpu.NAME: cpu}
