"""IREE devices by name, opened with one clear error when absent, and results read back from them.

A device is `cpu`, `vulkan` or `cuda`, optionally `:N` for the Nth device of that kind (`vulkan:1`), or
a raw IREE driver name (`local-task`, `local-sync`, ...). A name that is none of these, or a device this
machine lacks, is one line that lists the devices it has.
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


# The Python exceptions IREE's failure statuses become (INVALID_ARGUMENT: ValueError, OUT_OF_RANGE: IndexError,
# NOT_FOUND: KeyError, UNIMPLEMENTED: NotImplementedError, the rest: RuntimeError).
IREE_ERRORS = (ValueError, LookupError, RuntimeError)


class DeviceError(UserError, RuntimeError):
    """A device that does not exist here, or a device name that cannot be parsed."""


@dataclass(frozen=True)
class Device:
    driver: str
    index: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Device":
        name, _, index = spec.strip().partition(":")
        if name not in KINDS and name not in rt.query_available_drivers() or (index and not index.isdigit()):
            raise DeviceError(f"device {spec!r:.40}: expected cpu, vulkan or cuda, optionally with an index "
                              f"(vulkan:1), or an IREE driver ({', '.join(rt.query_available_drivers())}); {_here()}")
        return cls(KINDS.get(name, name), int(index or 0))

    @property
    def kind(self) -> str:
        """The g3n name of this device's kind (cpu for every local driver)."""
        return "cpu" if self.driver.startswith("local-") else next((k for k, d in KINDS.items() if d == self.driver),
                                                                  self.driver)

    def runs(self, module_driver: str) -> bool:
        """Whether a module compiled for `module_driver` runs here (CPU modules run on every local driver)."""
        return Device(module_driver).kind == self.kind

    @property
    def name(self) -> str:
        return f"{self.kind} device {self.index}" if self.index else f"{self.kind} device"

    def open(self):
        """The IREE HalDevice; DeviceError if this machine has no such device."""
        try:
            found = _devices(self.driver)
        except IREE_ERRORS as e:
            raise DeviceError(f"no {self.name} here: IREE's {self.driver} driver is unavailable ({iree_reason(e)}); "
                              f"{_here()}") from None
        if self.index >= len(found):
            raise DeviceError(f"no {self.name} here ({len(found)} found); {_here()}")
        path = found[self.index]["path"]
        try:
            return rt.get_device(f"{self.driver}://{path}" if path else self.driver)
        except IREE_ERRORS as e:
            raise DeviceError(f"{self.name} could not be opened ({iree_reason(e)})") from None


def _devices(driver: str) -> list[dict]:
    return rt.get_driver(driver).query_available_devices()


def available() -> list[str]:
    """The devices of each kind this machine has, as --device names: cpu, vulkan, vulkan:1, ..."""
    names = []
    for kind, driver in KINDS.items():
        try:
            count = len(_devices(driver))
        except IREE_ERRORS:  # the driver's library is absent
            continue
        names += [f"{kind}:{i}" if i else kind for i in range(count)]
    return names


def _here() -> str:
    return f"devices here: {', '.join(available()) or 'none'}"


def iree_reason(error: Exception) -> str:
    """IREE's first line without its source location and status prefix (nor the colon that announces the
    lines left out)."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^.*?\.c:\d+: [A-Z_]+; ", "", line).rstrip(": ;")


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
