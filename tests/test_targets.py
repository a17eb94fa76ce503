"""The target registry, its architecture names, and the Vulkan traps (narrow types, f16, i64 remainder) on small modules.

The Vulkan modules run on whatever Vulkan device is here: in CI, Mesa's llvmpipe (`.ci/run` installs it).
"""

import numpy as np
import pytest
import torch

import targets
from g3n_compile.cli import main as g3n_compile
from g3n_compile.model.text import _mod
from runtime.device import Device, DeviceError, Readback


def compile_torch(module: torch.nn.Module, args: tuple, flags: list[str], path) -> str:
    """`module` exported and imported as g3n does (IREE's FX importer), compiled with `flags`."""
    import iree.compiler as ic
    from iree.compiler import ir
    from iree.compiler.extras.fx_importer import FxImporter

    importer = FxImporter(context=ir.Context())
    importer.import_frozen_program(torch.export.export(module, args, strict=False), func_name="main")
    src = path.with_suffix(".mlir")
    src.write_text(str(importer.module))
    ic.compile_file(str(src), output_file=str(path), input_type="torch", extra_args=flags)
    return str(path)


def run_on(device: str, vmfb: str, args: tuple) -> np.ndarray:
    """Call `main` of `vmfb` on `device` with torch tensors (bfloat16 ones passed as IREE bf16 buffers)."""
    import iree.runtime as rt

    config = rt.Config(device=Device.parse(device).open())
    context = rt.SystemContext(config=config)
    context.add_vm_module(rt.VmModule.mmap(config.vm_instance, vmfb))

    def as_input(t: torch.Tensor):
        if t.dtype != torch.bfloat16:
            return t.numpy()
        view = config.device.allocator.allocate_buffer_copy(
            memory_type=rt.MemoryType.DEVICE_LOCAL, allowed_usage=rt.BufferUsage.DEFAULT, device=config.device,
            buffer=t.view(torch.int16).numpy(), element_type=rt.HalElementType.BFLOAT_16)
        return rt.DeviceArray(config.device, view)

    return Readback(config.device)(context.modules.module.main(*map(as_input, args)))


def test_list_targets(capsys):
    assert g3n_compile(["--list-targets"]) == 0
    out = capsys.readouterr().out
    for name, target in targets.TARGETS.items():
        assert name in out and target.ARCH_OPTION in out and target.DRIVER in out
    assert "sm_90" in out and "llvmpipe" in out and "int4" in out


@pytest.mark.parametrize("argv, message", [
    (["--target", "cuda", "--cuda-arch", "sm_91"], "'sm_91' is not a known cuda architecture"),
    (["--target", "vulkan", "--vulkan-target", "hopper"], "'hopper' is not a known vulkan architecture"),
    (["--target", "cpu", "--cuda-arch", "sm_90"], "--cuda-arch given, but the target is not among cpu"),
    (["--target", "cpu,tpu"], "unknown target 'tpu'"),
])
def test_bad_target_requests_are_one_line_errors(argv, message, tmp_path, capsys):
    assert g3n_compile(argv + ["-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_every_listed_architecture_compiles(name, tmp_path):
    target = targets.TARGETS[name]
    for arch in target.ARCHS:
        flags = target.compile_flags(arch)
        if name == "vulkan":  # never IREE's default Vulkan target (32-bit storage only: the u8 trap)
            assert any(f.startswith(("--iree-vulkan-target=", "--iree-hal-target-device=#hal.device.target")) for f in flags)
        compile_torch(torch.nn.Sequential(torch.nn.Linear(8, 8)), (torch.randn(2, 8),), flags, tmp_path / f"{arch}.vmfb")


class ToFloat(torch.nn.Module):
    def forward(self, q, h, b):
        return q.to(torch.float32) + h.to(torch.float32) * b.to(torch.float32)


@pytest.mark.parametrize("name", ["cpu", "vulkan"])
def test_narrow_inputs_read_exactly(name, tmp_path):
    """u8 (int4 codes travel packed in u8), f16 and bf16 inputs. IREE's default Vulkan target reads u8 as
    every 4th byte and turns f16 into NaN; g3n's default target for each device must read them exactly."""
    g = torch.Generator().manual_seed(0)
    args = (torch.arange(256).to(torch.uint8).reshape(8, 32), torch.randn(8, 32, generator=g).to(torch.float16),
            torch.randn(8, 32, generator=g).to(torch.bfloat16))
    target = targets.TARGETS[name]
    assert {"float16", "bfloat16"} <= set(target.SUPPORTS.dtypes)
    vmfb = compile_torch(ToFloat(), args, target.compile_flags(), tmp_path / "m.vmfb")
    np.testing.assert_array_equal(run_on(name, vmfb, args), ToFloat()(*args).numpy())


class Remainders(torch.nn.Module):
    def forward(self, x):
        return _mod(x, 5), torch.remainder(x, 7)


def test_int64_remainder_on_vulkan(tmp_path):
    """The ring-buffer index arithmetic: the model's int32 `_mod`, and a plain int64 remainder, which IREE's
    default Vulkan target cannot lower (`arith.remsi` on i64) but g3n's, declaring Int64, can."""
    x = torch.arange(-40, 40, dtype=torch.int64)
    vmfb = compile_torch(Remainders(), (x,), targets.vulkan.compile_flags(), tmp_path / "m.vmfb")
    import iree.runtime as rt

    config = rt.Config(device=Device.parse("vulkan").open())
    context = rt.SystemContext(config=config)
    context.add_vm_module(rt.VmModule.mmap(config.vm_instance, vmfb))
    read = Readback(config.device)
    got = [read(r) for r in context.modules.module.main(x.numpy())]
    for g, want in zip(got, Remainders()(x)):
        np.testing.assert_array_equal(g, want.numpy())


@pytest.mark.parametrize("spec, driver, index, kind", [
    ("cpu", "local-task", 0, "cpu"), ("local-sync", "local-sync", 0, "cpu"), ("vulkan:1", "vulkan", 1, "vulkan"),
    ("cuda", "cuda", 0, "cuda"), ("hip:2", "hip", 2, "hip"),
])
def test_device_names(spec, driver, index, kind):
    d = Device.parse(spec)
    assert (d.driver, d.index, d.kind) == (driver, index, kind)
    assert d.runs(Device(driver).driver) and (d.kind == "cpu") == d.runs("local-task")


def test_absent_devices_are_clear_errors():
    with pytest.raises(DeviceError, match="no vulkan device 7 here"):
        Device.parse("vulkan:7").open()
    with pytest.raises(DeviceError, match="expected cpu, vulkan or cuda"):
        Device.parse("vulkan:one")
    if not cuda_installed():
        with pytest.raises(DeviceError, match="no cuda device here: IREE's cuda driver is unavailable"):
            Device.parse("cuda").open()


def cuda_installed() -> bool:
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None
