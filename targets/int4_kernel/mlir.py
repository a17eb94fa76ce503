"""The MLIR the int4 kernel is called with: a function that quantizes its activations and dispatches the kernel, and
the `stream.executable` that carries the kernel's object for IREE to link into the module's CPU code.

`quantize_and_call` is a private function of the caller's module in which
  1. two `linalg.generic`s quantize x per group of 32 to int8 with an f32 scale (llama.cpp's Q8_0:
     d = max|x| / 127, q = round-half-even(x / d)), writing q in the kernel's activation order (layout.py);
     IREE forms two small dispatches of them (it does not fuse the reduction into a broadcast reader);
  2. a `flow.dispatch` of `@g3n_cpu_kernels` (one export per shape, the N rows split over at most WORKGROUPS
     workgroups) calls the C kernel;
and the f32 result is cast back to the activations' element type.
"""

from __future__ import annotations

from pathlib import Path

from .layout import GROUP, rows_per_workgroup, superblock


def quantize_and_call(name: str, export: str, m: int, k: int, n: int, elem: str) -> str:
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


def executable(symbol: str, obj: Path, shapes: list[tuple[int, int, int]]) -> str:
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
