"""int4 CPU kernel: int4-pack's matmuls become calls of g3n's int4 x int8 microkernel (targets/cpu_kernels).

Matches the calls int4-pack leaves, `func.call @g3n_int4_mm_{M}x{K}x{N}_g32_{elem}(x, codes, scales)` with
`codes` loaded from a `W.int4` parameter, on a target that declares `SUPPORTS.int4_kernel` (the CPU)
when the C compiler builds a kernel variant for the target's CPU (`isa_for(ctx.arch)`: AVX-512 VNNI,
AVX2 or scalar; none on non-x86 hosts), group size 32, and K % 512 == 0 or K < 512 (the kernel's
superblocks of min(K/32, 16) groups; other K keep the generic call).

Leaves `func.call @g3n_q4k_mm_{M}x{K}x{N}_{elem}(x, q4, scales)`, a private function in which
  1. two `linalg.generic`s quantize x per group of 32 to int8 with an f32 scale (llama.cpp's Q8_0:
     d = max|x| / 127, q = round-half-even(x / d)), writing q in the kernel's activation order;
     IREE forms two small dispatches of them (it does not fuse the reduction into a broadcast reader);
  2. a `flow.dispatch` of the hand-written `stream.executable @g3n_cpu_kernels` (one export per shape,
     the N rows split over at most WORKGROUPS workgroups) calls the C kernel, whose object the
     executable carries (`hal.executable.objects`) and IREE links into the module's CPU code;
and the f32 result is cast back to `elem`. `W.int4` is replaced by `W.q4_0`, the same codes in the
kernel's weight order (`relayout`); the f16 scales `W.int4_scale` are unchanged. Both orders are
specified at the top of targets/cpu_kernels/int4_matmul.c.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from iree.compiler import ir

from .int4_pack import quantize
from .ir import add_parameter, ops, parameters, tensor_type
from .pipeline import Pass, PassContext, PassError

GROUP = 32
SUPERBLOCK = 16  # groups per superblock: one 64-byte vector of 4-byte lanes
CALLEE = re.compile(r"g3n_int4_mm_(\d+)x(\d+)x(\d+)_g32_(\w+)")
WORKGROUPS = 128  # most workgroups per matmul: enough to balance 2..16 workers, few enough to cost nothing


def supported(k: int) -> bool:
    from targets.cpu_kernels import MAX_K

    return k % GROUP == 0 and (k % (GROUP * SUPERBLOCK) == 0 or k < GROUP * SUPERBLOCK) and k <= MAX_K


def superblock(k: int) -> int:
    return min(k // GROUP, SUPERBLOCK)


def relayout(packed: torch.Tensor) -> torch.Tensor:
    """int4-pack's codes (i8 [N, K/2]: low nibble = even k, two's complement) in the kernel's weight
    order: i8 [N, K/2] as [N][B][4][S][4] bytes, byte (b, c, s, i) holding code + 8 of
    k = 32(bS + s) + 4c + i in its low nibble and of k + 16 in its high nibble."""
    b = packed.view(torch.uint8)
    n, k = b.shape[0], b.shape[1] * 2
    s = superblock(k)
    codes = (torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, k) ^ 8)  # unsigned: two's complement + 8
    u = codes.reshape(n, k // (GROUP * s), s, 2, 4, 4)  # [n, b, s, half, c, i]
    return (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 1, 3, 2, 4).reshape(n, k // 2).view(torch.int8)


def activation_order(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] in the kernel's activation order, [M][B][8][S][4]: element (b, j, s, i) is
    x at k = 32(bS + s) + 4j + i (what the quantize dispatch writes)."""
    m, k = x.shape
    s = superblock(k)
    return x.reshape(m, k // (GROUP * s), s, 8, 4).permute(0, 1, 3, 2, 4).reshape(m, k)


def rows_per_workgroup(n: int) -> int:
    """Rows per workgroup: a multiple of 16 giving at most WORKGROUPS of them."""
    return max(16, (-(-n // WORKGROUPS) + 15) // 16 * 16)


def _quantize_and_call(name: str, export: str, m: int, k: int, n: int, elem: str) -> str:
    kg, s = k // GROUP, superblock(k)
    nb = kg // s
    x_t, y_t = f"!torch.vtensor<[{m},{k}],{elem}>", f"!torch.vtensor<[{m},{n}],{elem}>"
    # bf16/f16 activations widen to f32 in the quantize bodies; the f32 result narrows back after the kernel
    widen, v = (f"%v = arith.extf %a : {elem} to f32", "%v") if elem != "f32" else ("", "%a")
    narrow = "" if elem == "f32" else f"""
    %e2 = tensor.empty() : tensor<{m}x{n}x{elem}>
    %y = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>],
        iterator_types = ["parallel", "parallel"]}} ins(%yf : tensor<{m}x{n}xf32>) outs(%e2 : tensor<{m}x{n}x{elem}>) {{
    ^bb0(%r: f32, %o: {elem}):
      %yt = arith.truncf %r : f32 to {elem}
      linalg.yield %yt : {elem}
    }} -> tensor<{m}x{n}x{elem}>"""
    return f"""
  func.func private @{name}(%x: {x_t}, %w: tensor<{n}x{k // 2}xi8>, %s: tensor<{n}x{kg}xf16>) -> {y_t} {{
    %zero = arith.constant 0.0 : f32
    %xb = torch_c.to_builtin_tensor %x : {x_t} -> tensor<{m}x{k}x{elem}>
    %xg = tensor.expand_shape %xb [[0], [1, 2]] output_shape [{m}, {kg}, {GROUP}] : tensor<{m}x{k}x{elem}> into tensor<{m}x{kg}x{GROUP}x{elem}>
    %e0 = tensor.empty() : tensor<{m}x{kg}xf32>
    %z0 = linalg.fill ins(%zero : f32) outs(%e0 : tensor<{m}x{kg}xf32>) -> tensor<{m}x{kg}xf32>
    %amax = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d1)>],
        iterator_types = ["parallel", "parallel", "reduction"]}} ins(%xg : tensor<{m}x{kg}x{GROUP}x{elem}>) outs(%z0 : tensor<{m}x{kg}xf32>) {{
    ^bb0(%a: {elem}, %o: f32):
      {widen}
      %abs = math.absf {v} : f32
      %mx = arith.maximumf %o, %abs : f32
      linalg.yield %mx : f32
    }} -> tensor<{m}x{kg}xf32>
    %d = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>],
        iterator_types = ["parallel", "parallel"]}} ins(%amax : tensor<{m}x{kg}xf32>) outs(%e0 : tensor<{m}x{kg}xf32>) {{
    ^bb0(%a: f32, %o: f32):
      %c127 = arith.constant 127.0 : f32
      %q = arith.divf %a, %c127 : f32
      linalg.yield %q : f32
    }} -> tensor<{m}x{kg}xf32>
    %x5 = tensor.expand_shape %xb [[0], [1, 2, 3, 4]] output_shape [{m}, {nb}, {s}, 8, 4] : tensor<{m}x{k}x{elem}> into tensor<{m}x{nb}x{s}x8x4x{elem}>
    %d3 = tensor.expand_shape %d [[0], [1, 2]] output_shape [{m}, {nb}, {s}] : tensor<{m}x{kg}xf32> into tensor<{m}x{nb}x{s}xf32>
    %e1 = tensor.empty() : tensor<{m}x{nb}x8x{s}x4xi8>
    %xq5 = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3, d4)>,
        affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>, affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d3, d2, d4)>],
        iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}}
        ins(%x5, %d3 : tensor<{m}x{nb}x{s}x8x4x{elem}>, tensor<{m}x{nb}x{s}xf32>) outs(%e1 : tensor<{m}x{nb}x8x{s}x4xi8>) {{
    ^bb0(%a: {elem}, %dd: f32, %o: i8):
      {widen}
      %is0 = arith.cmpf oeq, %dd, %zero : f32
      %one = arith.constant 1.0 : f32
      %safe = arith.select %is0, %one, %dd : f32
      %r = arith.divf {v}, %safe : f32
      %rr = math.roundeven %r : f32
      %qi = arith.fptosi %rr : f32 to i8
      linalg.yield %qi : i8
    }} -> tensor<{m}x{nb}x8x{s}x4xi8>
    %xq = tensor.collapse_shape %xq5 [[0], [1, 2, 3, 4]] : tensor<{m}x{nb}x8x{s}x4xi8> into tensor<{m}x{k}xi8>
    %rows = arith.constant {n} : index
    %yf = flow.dispatch @g3n_cpu_kernels::@{export}[%rows](%xq, %d, %w, %s)
        : (tensor<{m}x{k}xi8>, tensor<{m}x{kg}xf32>, tensor<{n}x{k // 2}xi8>, tensor<{n}x{kg}xf16>) -> tensor<{m}x{n}xf32>{narrow}
    %out = torch_c.from_builtin_tensor {"%y" if narrow else "%yf"} : tensor<{m}x{n}x{elem}> -> {y_t}
    return %out : {y_t}
  }}"""


def _executable(symbol: str, obj: Path, shapes: list[tuple[int, int, int]]) -> str:
    """`stream.executable @g3n_cpu_kernels`: one export per (M, K, N), each calling `symbol` for its rows. The
    object is keyed by a generic x86-64 target, so IREE translates the executable for the compile's own CPU
    target and links it with the generated dispatches (a variant with a target of its own would not be)."""
    bases = ["i8", "f32", "i8", "f16", "f32"]
    arg_types = ", ".join(f"memref<{b}>, index" for b in bases)
    exports, funcs = [], []
    for m, k, n in shapes:
        kg, rows, name = k // GROUP, rows_per_workgroup(n), export_name(m, k, n)
        memrefs = [f"memref<{m}x{k}xi8>", f"memref<{m}x{kg}xf32>", f"memref<{n}x{k // 2}xi8>",
                   f"memref<{n}x{kg}xf16>", f"memref<{m}x{n}xf32>"]
        exports.append(f"""
    stream.executable.export public @{name} workgroups(%rows: index) -> (index, index, index) {{
      %x = affine.apply affine_map<()[s0] -> (s0 ceildiv {rows})>()[%rows]
      %c1 = arith.constant 1 : index
      stream.return %x, %c1, %c1 : index, index, index
    }}""")
        body = "".join(f"""
        %m{i} = stream.binding.subspan %a{i}[%c0] : !stream.binding -> {t}
        %b{i}, %o{i}, %sz{i}:2, %st{i}:2 = iree_codegen.extract_strided_metadata %m{i} : {t} -> memref<{b}>, index, index, index, index, index"""
                       for i, (t, b) in enumerate(zip(memrefs, bases)))
        args = ", ".join(f"%b{i}, %o{i}" for i in range(5))
        funcs.append(f"""
      func.func @{name}({", ".join(f"%a{i}: !stream.binding" for i in range(5))}) {{
        %c0 = arith.constant 0 : index
        %cm = arith.constant {m} : index
        %cn = arith.constant {n} : index
        %ck = arith.constant {k} : index
        %crows = arith.constant {rows} : index
        %wg = stream.dispatch.workgroup.id[0] : index
        %begin = arith.muli %wg, %crows : index
        %end = arith.addi %begin, %crows : index{body}
        func.call @{symbol}({args}, %cm, %cn, %ck, %begin, %end) : ({arg_types}, index, index, index, index, index) -> ()
        return
      }}""")
    return f"""
  stream.executable private @g3n_cpu_kernels attributes {{hal.executable.objects = #hal.executable.objects<{{
      #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64"> = [#hal.executable.object<{{path = "{obj}"}}>]}}>}} {{{"".join(exports)}
    builtin.module {{
      func.func private @{symbol}({arg_types}, index, index, index, index, index) attributes {{hal.import.static, llvm.bareptr = true}}{"".join(funcs)}
    }}
  }}"""


def export_name(m: int, k: int, n: int) -> str:
    return f"q4_mm_{m}x{k}x{n}"


class Int4CpuKernel(Pass):
    """int4 linears on CPU call g3n's int4 x int8 C microkernel (activations quantized to int8 per group)."""

    name = "int4-cpu-kernel"
    requires = ("int4-pack",)

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        return ctx.quant == "int4" and ctx.group_size == GROUP and getattr(ctx.target.SUPPORTS, "int4_kernel", False)

    def run(self, module, ctx: PassContext) -> dict:
        from targets.cpu_kernels import KernelBuildError, build_object, isa_for, symbol

        params = parameters(module)
        calls = [op for op in ops(module, "func.call") if CALLEE.fullmatch(_callee(op))]
        try:
            isa = isa_for(ctx.arch)
            sites = [c for c in calls if supported(int(CALLEE.fullmatch(_callee(c)).group(2)))] if isa else []
            obj = build_object(isa) if sites else None
        except KernelBuildError as e:
            raise PassError(f"int4-cpu-kernel: {e}") from None
        shapes, functions, globals_ = [], set(), {}
        for call in sites:
            m, k, n, elem = CALLEE.fullmatch(_callee(call)).groups()
            m, k, n = int(m), int(k), int(n)
            name = f"g3n_q4k_mm_{m}x{k}x{n}_{elem}"
            if name not in functions:
                if (m, k, n) not in shapes:
                    shapes.append((m, k, n))
                _append(module, _quantize_and_call(name, export_name(m, k, n), m, k, n, elem))
                functions.add(name)
            codes = call.operands[1].owner
            weight = params[ir.FlatSymbolRefAttr(codes.attributes["global"]).value][0].removesuffix(".int4")
            if weight not in globals_:
                globals_[weight] = add_parameter(module, f"{weight}.q4_0", (n, k // 2), "i8")
                ctx.derived.add_many((f"{weight}.q4_0", f"{weight}.int4_scale"), (weight,),
                                     lambda w: (lambda c, s: (relayout(c), s))(*quantize(w, GROUP)))
            with call.location, ir.InsertionPoint(call):
                q4 = ir.Operation.create("util.global.load", results=[tensor_type((n, k // 2), "i8")],
                                         attributes={"global": ir.FlatSymbolRefAttr.get(globals_[weight])}).result
            call.operands[1] = q4
            call.attributes["callee"] = ir.FlatSymbolRefAttr.get(name)
        if shapes:
            _append(module, _executable(symbol(isa), obj, shapes), first=True)
        still_called = {_callee(c) for c in ops(module, "func.call")}
        for f in ops(module, "func.func"):  # int4-pack's generic kernels that no call needs any more
            fname = ir.StringAttr(f.attributes["sym_name"]).value
            if CALLEE.fullmatch(fname) and fname not in still_called:
                f.erase()
        return {"matched": len(calls), "rewritten": len(sites), "shapes": len(shapes), "weights": len(globals_),
                "isa": isa or "none"}


def _callee(call) -> str:
    return ir.FlatSymbolRefAttr(call.attributes["callee"]).value


def _append(module: ir.Module, text: str, first: bool = False) -> None:
    """Parse `text` (a module, or functions for one) and move its top-level ops into `module`."""
    parsed = ir.Module.parse(text if text.lstrip().startswith(("#", "module")) else "module {" + text + "}")
    for op in list(parsed.body.operations):
        op.operation.detach_from_parent()
        if first:
            ir.InsertionPoint.at_block_begin(module.body).insert(op.operation)
        else:
            module.body.append(op.operation)
