"""g3n's int4 x int8 C kernels (targets/int4_kernel) against numpy, for every variant this machine runs.

Inputs are built in natural order; the weights are put into the kernel's order by the product's own
`weight_order`, the activations by `activation_order` below, written from layout.py's description (in the
module, the quantize dispatch writes them), so a layout mistake on either side shows up as a wrong product."""

import ctypes
import subprocess

import numpy as np
import pytest
import torch

from passes.int4_pack import quantize_codes
from targets.int4_kernel.build import build_object, build_shared, host_isas, isa_for, symbol
from targets.int4_kernel.layout import GROUP, WORKGROUPS, rows_per_workgroup, superblock, takes, weight_order

ISAS = host_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="no int4 kernel variant for this CPU (x86-64 only)")

# (M, N, K): odd row counts, one and several superblocks, partial superblocks (K < 512, 3 groups), E4B's
# 2560 (5 superblocks), and more activation rows than the kernel's block of 4.
SHAPES = [(1, 37, 512), (3, 50, 1024), (5, 19, 96), (1, 16, 32), (2, 33, 2560), (6, 7, 64), (9, 5, 448),
          (6, 9, 4608)]  # the last: two row blocks, K in chunks of 2048 + 2048 + 512


def activation_order(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] in the kernel's activation order, [M][B][8][S][4]: element (b, j, s, i) is x at
    k = 32(bS + s) + 4j + i."""
    m, k = x.shape
    s = superblock(k)
    return x.reshape(m, k // (GROUP * s), s, 8, 4).permute(0, 1, 3, 2, 4).reshape(m, k)


def _kernel(isa):
    fn = getattr(ctypes.CDLL(str(build_shared(isa))), symbol(isa))
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t] * 5 + [ctypes.c_size_t] * 5
    return fn


def _run(isa, xq, xd, w, ws, n, row_splits):
    """The kernel over [M, N], its rows split like IREE's workgroups (the last range may run past N)."""
    m, k = xq.shape
    xq, xd = np.ascontiguousarray(activation_order(torch.from_numpy(xq)).numpy()), np.ascontiguousarray(xd)
    w = np.ascontiguousarray(weight_order(torch.from_numpy(w)).numpy())
    ws = np.ascontiguousarray(ws.view(np.uint16))
    y = np.full((m, n), np.nan, np.float32)
    fn = _kernel(isa)
    for begin, end in row_splits:
        fn(xq.ctypes.data, 0, xd.ctypes.data, 0, w.ctypes.data, 0, ws.ctypes.data, 0, y.ctypes.data, 0, m, n, k, begin, end)
    return y


def _inputs(m, n, k, seed, unit_scales=False):
    g = torch.Generator().manual_seed(seed)
    codes, scales = quantize_codes(torch.randn(n, k, generator=g), 32)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).numpy()
    xd = (torch.rand(m, k // 32, generator=g) * 0.1).numpy()
    if unit_scales:
        scales, xd = torch.ones_like(scales), np.ones_like(xd)
    return xq, xd, codes.numpy(), scales.numpy()


def _reference(xq, xd, codes, scales):
    """Per-group integer dot products (exact, int64), then the two scales applied in float64."""
    m, k = xq.shape
    codes = codes.astype(np.int64)
    dots = np.einsum("mgj,ngj->mng", xq.astype(np.int64).reshape(m, -1, 32), codes.reshape(codes.shape[0], -1, 32))
    return dots, np.einsum("mng,ng,mg->mn", dots, scales.astype(np.float64), xd.astype(np.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_integer_dot_products_are_exact(isa, m, n, k):
    xq, xd, w, ws = _inputs(m, n, k, seed=k + n, unit_scales=True)
    y = _run(isa, xq, xd, w, ws, n, [(0, n // 2), (n // 2, n + 16)])
    dots, _ = _reference(xq, xd, w, ws)
    np.testing.assert_array_equal(y, dots.sum(-1).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_applies_weight_and_activation_scales(isa, m, n, k):
    xq, xd, w, ws = _inputs(m, n, k, seed=7 * k + n)
    y = _run(isa, xq, xd, w, ws, n, [(0, 16), (16, n)] if n > 16 else [(0, n)])
    _, ref = _reference(xq, xd, w, ws)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_kernel_rows_outside_the_range_are_untouched():
    xq, xd, w, ws = _inputs(2, 40, 512, seed=1)
    y = _run(ISAS[-1], xq, xd, w, ws, 40, [(16, 32)])
    assert np.isnan(y[:, :16]).all() and np.isnan(y[:, 32:]).all() and not np.isnan(y[:, 16:32]).any()


def test_variant_selection_and_objects_are_self_contained():
    assert isa_for("generic") == "scalar"  # baseline x86-64: no AVX
    assert isa_for("x86-64-v3") == "avx2" and isa_for("x86-64-v4") in ("avx2", "avx512vnni")
    assert [takes(k) for k in (64, 448, 512, 2048, 2560, 2080, 96, 40)] == [True] * 4 + [True, False, True, False]
    for isa in ISAS:  # IREE links the object into a freestanding executable: nothing may stay undefined
        obj = build_object(isa).read_bytes()
        assert obj[:4] == b"\x7fELF"
        undefined = subprocess.run(["nm", "-u", str(build_object(isa))], capture_output=True, text=True, check=True)
        assert undefined.stdout.strip() == "", undefined.stdout


@pytest.mark.parametrize("n", [1, 16, 2047, 2048, 2049, 8192, 16384, 262400])
def test_workgroups_cover_the_rows_in_at_most_the_budget(n):
    rows = rows_per_workgroup(n)
    assert rows % 16 == 0 and -(-n // rows) <= WORKGROUPS
    assert rows == 16 or -(-n // (rows - 16)) > WORKGROUPS  # the smallest such multiple of 16: no coarser than needed
