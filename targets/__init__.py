"""The compile targets, one module each: its iree-compile flags (a function of its architecture option),
its runtime driver, what it supports, its known architecture names and a one-line description."""

from . import cpu, cuda, vulkan

TARGETS = {t.NAME: t for t in (cpu, vulkan, cuda)}


def list_targets() -> str:
    """The text `g3n-compile --list-targets` prints."""
    lines = []
    for t in TARGETS.values():
        lines += [f"{t.NAME:8s}{t.DESCRIPTION}",
                  f"{'':8s}driver {t.DRIVER}; {t.ARCH_OPTION} {' | '.join(t.ARCHS)} (default {t.DEFAULT_ARCH})",
                  f"{'':8s}{t.SUPPORTS.describe()}"]
    return "\n".join(lines)
