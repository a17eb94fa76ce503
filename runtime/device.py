"""IREE devices by name, opened with one clear error when absent, and results read back from them.

A device is `cpu`, `vulkan` or `cuda`, optionally `:N` for the Nth device of that kind (`vulkan:1`), or
a raw IREE driver name (`local-task`, `local-sync`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import iree.runtime as rt
import numpy as np

from .errors import UserError

KINDS = {"cpu": "local-task", "vulkan": "vulkan", "cuda": "cuda"}  # device kind -> IREE driver
# Parameters are read into memory instead of memory-mapped on these drivers: with a mapped archive, Vulkan
# context creation failed in 3 of ~30 runs (DATA_LOSS in hal.fence.await), read into memory in none of 25.
PRELOAD_PARAMETERS = {"vulkan"}


class DeviceError(UserError, RuntimeError):
    """A device that does not exist here, or a device name that cannot be parsed."""


@dataclass(frozen=True)
class Device:
    driver: str
    index: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Device":
        name, _, index = spec.strip().partition(":")
        if not name or (index and not index.isdigit()):
            raise DeviceError(f"device {spec!r}: expected cpu, vulkan or cuda, optionally with an index (vulkan:1)")
        return cls(KINDS.get(name, name), int(index or 0))

    @property
    def kind(self) -> str:
        """The g3n name of this device's kind (cpu for every local driver)."""
        return "cpu" if self.driver.startswith("local-") else next((k for k, d in KINDS.items() if d == self.driver),
                                                                  self.driver)

    def runs(self, module_driver: str) -> bool:
        """Whether a module compiled for `module_driver` runs here (CPU modules run on every local driver)."""
        return Device(module_driver).kind == self.kind

    def open(self):
        """The IREE HalDevice; DeviceError if this machine has no such device."""
        try:
            driver = rt.get_driver(self.driver)
            found = driver.query_available_devices()
        except (ValueError, RuntimeError) as e:
            raise DeviceError(f"no {self.kind} device here: IREE's {self.driver} driver is unavailable "
                              f"({_reason(e)})") from None
        if self.index >= len(found):
            raise DeviceError(f"no {self.kind} device {self.index} here ({len(found)} found)")
        path = found[self.index]["path"]
        try:
            return rt.get_device(f"{self.driver}://{path}" if path else self.driver)
        except (ValueError, RuntimeError) as e:
            raise DeviceError(f"{self.kind} device {self.index} could not be opened ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    """IREE's message without its source location and status prefix."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^.*?\.c:\d+: [A-Z_]+; ", "", line)


class Readback:
    """Copies device results to the host through one host-visible staging buffer per size: Vulkan refuses
    to import host memory, so IREE's `to_host()` fails there on host-pointer alignment; the copy works on
    every driver."""

    def __init__(self, device):
        self.device = device
        self.staging: dict[int, object] = {}
        self.fence = device.create_semaphore(0)
        self.copies = 0

    def __call__(self, array) -> np.ndarray:
        dtype = np.dtype(array.dtype)
        size = int(np.prod(array.shape)) * dtype.itemsize
        if size not in self.staging:
            self.staging[size] = self.device.allocator.allocate_buffer(
                memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
                allowed_usage=rt.BufferUsage.TRANSFER | rt.BufferUsage.MAPPING, allocation_size=size)
        self.copies += 1
        self.device.queue_copy(array._buffer_view.get_buffer(), self.staging[size], [], [(self.fence, self.copies)])
        self.fence.wait(self.copies)
        return self.staging[size].map().asarray(list(array.shape), dtype).copy()
