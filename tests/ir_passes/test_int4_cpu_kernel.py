"""The int4-cpu-kernel pass: int4-pack's matmuls become int8 activation quantization + g3n's C kernel.

IR in (three int4 linears: K = 64, a partial superblock; K = 512; K = 544, which the kernel does not
take), structure out, and the compiled module against numpy: the kernel's product of the Q8_0-quantized
activations and the int4 weights, and the f32 product within int8-activation rounding."""


import numpy as np
import pytest
import torch

from helpers import context, count, filecheck, fixture, parameter_names, run_compiled
from passes import PassError, run_passes
from passes.int4_cpu_kernel import Int4CpuKernel
from passes.int4_pack import Int4Pack, dequantize, quantize
from targets import cpu, cuda
from targets.int4_kernel.build import host_isas

pytestmark = pytest.mark.skipif(not host_isas(), reason="no int4 kernel variant for this CPU (x86-64 only)")

LINEARS = {"layers.0.laurel.linear_right.weight": (48, 64), "layers.0.mlp.down_proj.weight": (40, 512),
           "layers.0.mlp.up_proj.weight": (24, 544)}  # as in the fixture int4_cpu_kernel.mlir


def _ir(elem: str = "f32") -> str:
    return fixture("int4_cpu_kernel.mlir").replace("f32", elem)


def _run(ir_text: str, **options):
    ctx = context(quant="int4", group_size=32, arch="host", **options)
    after, report = run_passes(ir_text, ctx, [Int4Pack, Int4CpuKernel], check_sites=False, log=lambda *_: None)
    return after, report[1]["stats"], ctx


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's Q8_0 per group of 32: d = max|x| / 127, q = round-half-even(x / d)."""
    g = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(g).max(-1) / np.float32(127)
    q = np.round(g / np.where(d == 0, 1, d)[..., None])
    return q.reshape(x.shape), d


def test_kernel_pass_structure_and_numerics(tmp_path):
    after, stats, ctx = _run(_ir())
    assert stats["generic_calls"] == 3 and stats["kernel-call"] == 2 and stats["isa"] == host_isas()[0]
    filecheck(after, "int4_cpu_kernel.mlir")
    filecheck(after, "int4_cpu_kernel.mlir", "ABSENT")
    # Two kernel shapes in one hand-written executable that carries the object; K = 544 stays generic.
    assert after.count("stream.executable private @g3n_cpu_kernels") == 1 and after.count("#hal.executable.objects<") == 1
    assert count(after, "flow.dispatch") == 2 and count(after, "stream.executable.export") == 2
    assert after.count("call @g3n_q4k_mm_") == 2 and after.count("call @g3n_int4_mm_3x544x24") == 1
    assert "func.func private @g3n_int4_mm_3x64" not in after and "iree_tensor_ext.bitcast" in after
    for name in list(LINEARS)[:2]:  # kernel layout replaces int4-pack's codes; scales are shared
        assert f'"{name}.q4_0"' in after and f'"{name}.int4"' not in after and f'"{name}.int4_scale"' in after
    assert '"layers.0.mlp.up_proj.weight.int4"' in after

    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, k, generator=g) for name, (n, k) in LINEARS.items()}
    source = ctx.derived.getter(weights.__getitem__)
    names = parameter_names(after)
    xs = [torch.randn(3, k, generator=g).numpy() for _, k in LINEARS.values()]
    ys = run_compiled(after, tmp_path, xs, {n: source(n) for n in names}, quant="int4")
    for (name, _), x, y in zip(LINEARS.items(), xs, ys):
        packed, scales = quantize(weights[name], 32)
        w = dequantize(packed, scales).numpy().astype(np.float64)
        exact = x.astype(np.float64) @ w.T
        if name.endswith("up_proj.weight"):  # generic int4: f32 activations
            np.testing.assert_allclose(y, exact, rtol=1e-4, atol=1e-4)
            continue
        q, d = _q8_0(x)
        kernel = (np.repeat(d, 32, axis=1) * q).astype(np.float64) @ w.T
        np.testing.assert_allclose(y, kernel, rtol=1e-4, atol=1e-4 * np.abs(kernel).max())
        # int8 activations cost ~0.4 % of the product's scale (half a step of max|x| / 127 per element)
        assert np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()


def test_kernel_pass_with_bf16_activations_compiles():
    """bf16 activations widen to f32 for quantization and the kernel's f32 result narrows back to bf16
    (the numerics are the f32 test's: the same kernel on the same int8 values)."""
    import iree.compiler as ic

    after, stats, _ = _run(_ir("bf16"))
    assert stats["kernel-call"] == 2 and count(after, "arith.truncf") == 3  # 2 after the kernel, 1 in K = 544's generic code
    ic.compile_str(after, input_type="torch", extra_args=cpu.compile_flags(quant="int4"))


def test_kernel_pass_applies_only_to_cpu_int4_group_32():
    assert Int4CpuKernel.applies(context(cpu, quant="int4", group_size=32, arch="host"))
    assert not Int4CpuKernel.applies(context(cpu, quant="int4", group_size=64, arch="host"))
    assert not Int4CpuKernel.applies(context(cpu, quant="none", arch="host"))
    assert not Int4CpuKernel.applies(context(cuda, quant="int4", group_size=32, arch="sm_90"))


def test_missing_c_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PassError, match="no C compiler found.*--disable-pass int4-cpu-kernel"):
        _run(_ir())
