"""int4 weight packing: linear weights as group-wise symmetric int4, dequantised inside the matmul.

Matches `torch.aten.mm(x [M, K], torch.aten.permute(W, [1, 0]))` where W is an external parameter
named like a quantisable linear (attention q/k/v/o, MLP gate/up/down, LAuReL (fused or not), AltUp and
per-layer projections, and the LM head tied to the token embedding; see QUANTIZED) and K is a
multiple of the group size G.

Leaves `func.call @g3n_int4_mm_...(x, codes, scales)`, a private function in "form E" (toolchain
notes §3): `iree_tensor_ext.bitcast` of the i8 codes [N, K/2] to i4 [N, K], a dequant
`linalg.generic` (sign-extend, times the f16 group scale) and a grouped-contraction `linalg.generic`
over [M, K/G, G] accumulating in f32, which IREE fuses into one dispatch. The archive gains
`W.int4` (i8 [N, K/2], two codes per byte, low nibble = even k) and `W.int4_scale` (f16 [N, K/G]);
W itself is dropped when nothing else reads it. 0.5625 bytes per weight at G = 32.

Quantisation: per group of G weights of a row, scale = w* / -8 (rounded to f16) where w* is the
group's weight of largest magnitude, code = clamp(round(w / scale), -8, 7). Mapping the extreme to -8
uses all 16 codes (llama.cpp's Q4_0 rule); on Gaussian weights it has 11 % less RMS error than
max|w| / 7 for the same bytes (0.086 vs 0.097 of the weights' RMS).

The LM head gets its own int4 copy of the embedding table it is tied to (at E2B shape it would read
1.07 GB of bf16 per token, 39 % of int4 decode time; int4: 0.30 GB), while the token lookup keeps
gathering rows of the original table. The per-layer embedding, norms and the tiny AltUp
router/coefficient linears stay at the checkpoint's precision: embeddings are gathered, not multiplied
(their bytes are not read per token), and the rest is a rounding error in size.
"""

from __future__ import annotations

import re

import torch
from iree.compiler import ir

from .ir import add_parameter, linear_weight, ops, parameters, tensor_type, vtensor
from .pipeline import Pass, PassContext

QUANTIZED = re.compile(r"(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|laurel\.linear_(left|right)"
                       r"|per_layer_input_gate|per_layer_projection|attn_laurel_in)|altup_(unembed_)?projections\.\d+"
                       r"|per_layer_model_projection|embed_tokens)\.weight")


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes packed two per byte as int8 [N, K/2], f16 scales [N, K/G]) for weight w [N, K]."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    scale = (extreme / -8).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.clamp(torch.round(groups / safe[..., None]), -8, 7).to(torch.int8).reshape(n, k)
    nibbles = codes.view(torch.uint8) & 0xF
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.view(torch.int8), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The f32 weight the module computes with (the inverse of `quantize`, up to rounding)."""
    b = packed.view(torch.uint8)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1).to(torch.int16)
    codes = torch.where(nibbles > 7, nibbles - 16, nibbles).float()
    group = codes.shape[1] // scale.shape[1]
    return (codes.reshape(*scale.shape, group) * scale.float()[..., None]).reshape(codes.shape)


def _kernel(name: str, m: int, k: int, n: int, g: int, elem: str) -> str:
    kg = k // g
    x_t, y_t = f"!torch.vtensor<[{m},{k}],{elem}>", f"!torch.vtensor<[{m},{n}],{elem}>"
    widen = f"%xf = arith.extf %a : {elem} to f32" if elem != "f32" else "%xf = arith.addf %a, %zero_f : f32"
    result = "%y" if elem == "f32" else "%yt"
    narrow = "" if elem == "f32" else f"""
    %e2 = tensor.empty() : tensor<{m}x{n}x{elem}>
    %yt = linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>],
        iterator_types = ["parallel", "parallel"]}} ins(%y : tensor<{m}x{n}xf32>) outs(%e2 : tensor<{m}x{n}x{elem}>) {{
    ^bb0(%a: f32, %o: {elem}):
      %t = arith.truncf %a : f32 to {elem}
      linalg.yield %t : {elem}
    }} -> tensor<{m}x{n}x{elem}>"""
    return f"""
  func.func private @{name}(%x: {x_t}, %q: tensor<{n}x{k // 2}xi8>, %s: tensor<{n}x{kg}xf16>) -> {y_t} {{
    %zero_f = arith.constant 0.0 : f32
    %xb = torch_c.to_builtin_tensor %x : {x_t} -> tensor<{m}x{k}x{elem}>
    %q4 = iree_tensor_ext.bitcast %q : tensor<{n}x{k // 2}xi8> -> tensor<{n}x{k}xi4>
    %w = tensor.expand_shape %q4 [[0], [1, 2]] output_shape [{n}, {kg}, {g}] : tensor<{n}x{k}xi4> into tensor<{n}x{kg}x{g}xi4>
    %xe = tensor.expand_shape %xb [[0], [1, 2]] output_shape [{m}, {kg}, {g}] : tensor<{m}x{k}x{elem}> into tensor<{m}x{kg}x{g}x{elem}>
    %e0 = tensor.empty() : tensor<{n}x{kg}x{g}xf32>
    %dq = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d1)>,
        affine_map<(d0, d1, d2) -> (d0, d1, d2)>], iterator_types = ["parallel", "parallel", "parallel"]}}
        ins(%w, %s : tensor<{n}x{kg}x{g}xi4>, tensor<{n}x{kg}xf16>) outs(%e0 : tensor<{n}x{kg}x{g}xf32>) {{
    ^bb0(%c: i4, %sc: f16, %o: f32):
      %i = arith.extsi %c : i4 to i32
      %f = arith.sitofp %i : i32 to f32
      %s32 = arith.extf %sc : f16 to f32
      %v = arith.mulf %f, %s32 : f32
      linalg.yield %v : f32
    }} -> tensor<{n}x{kg}x{g}xf32>
    %e1 = tensor.empty() : tensor<{m}x{n}xf32>
    %acc = linalg.fill ins(%zero_f : f32) outs(%e1 : tensor<{m}x{n}xf32>) -> tensor<{m}x{n}xf32>
    %y = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d2, d3)>,
        affine_map<(d0, d1, d2, d3) -> (d1, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1)>],
        iterator_types = ["parallel", "parallel", "reduction", "reduction"]}}
        ins(%xe, %dq : tensor<{m}x{kg}x{g}x{elem}>, tensor<{n}x{kg}x{g}xf32>) outs(%acc : tensor<{m}x{n}xf32>) {{
    ^bb0(%a: {elem}, %b: f32, %o: f32):
      {widen}
      %p = arith.mulf %xf, %b : f32
      %r = arith.addf %o, %p : f32
      linalg.yield %r : f32
    }} -> tensor<{m}x{n}xf32>{narrow}
    %out = torch_c.from_builtin_tensor {result} : tensor<{m}x{n}x{elem}> -> {y_t}
    return %out : {y_t}
  }}"""


def _match(op, params: dict, group: int) -> str | None:
    """The parameter name if `op` is a linear layer by a quantisable weight whose width G divides."""
    name = linear_weight(op, params)
    if name is None or not QUANTIZED.fullmatch(name):
        return None
    k = vtensor(op.operands[0])[0][1]
    return name if k % group == 0 and k % 2 == 0 else None


class Int4Pack(Pass):
    """Linear weights as group-wise int4 with f16 scales; dequant fused into the matmul (form E)."""

    name = "int4-pack"
    after = ("altup-fusion", "laurel-fusion")

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        return ctx.quant == "int4"

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        g = ctx.group_size
        params = parameters(module)
        sites = [(op, hit) for op in ops(module) if (hit := _match(op, params, g))]
        kernels, globals_ = set(), {}
        body = module.body
        for op, name in sites:
            (m, k), elem = vtensor(op.operands[0])
            n = vtensor(op.result)[0][1]
            kernel = f"g3n_int4_mm_{m}x{k}x{n}_g{g}_{elem}"
            if kernel not in kernels:
                # Parse the kernel as a module of its own, then move its function into ours.
                kernel_module = ir.Module.parse("module {" + _kernel(kernel, m, k, n, g, elem) + "}")
                for f in list(kernel_module.body.operations):
                    f.operation.detach_from_parent()
                    body.append(f.operation)
                kernels.add(kernel)
            if name not in globals_:
                globals_[name] = self._add_globals(module, name, n, k, g, ctx)
            codes_sym, scale_sym = globals_[name]
            with op.location, ir.InsertionPoint(op):
                codes = _load(codes_sym, tensor_type((n, k // 2), "i8"))
                scales = _load(scale_sym, tensor_type((n, k // g), "f16"))
                call = ir.Operation.create("func.call", results=[op.result.type],
                                           operands=[op.operands[0], codes, scales],
                                           attributes={"callee": ir.FlatSymbolRefAttr.get(kernel)})
            op.result.replace_all_uses_with(call.result)
            op.erase()
        return {"matched": len(sites), "rewritten": len(sites), "weights": len(globals_), "kernels": len(kernels)}

    @staticmethod
    def _add_globals(module, name: str, n: int, k: int, g: int, ctx: PassContext) -> tuple[str, str]:
        codes = add_parameter(module, f"{name}.int4", (n, k // 2), "i8")
        scales = add_parameter(module, f"{name}.int4_scale", (n, k // g), "f16")
        ctx.derived.add_many((f"{name}.int4", f"{name}.int4_scale"), (name,), lambda w: quantize(w, g))
        return codes, scales


def _load(symbol: str, t: ir.Type) -> ir.Value:
    return ir.Operation.create("util.global.load", results=[t],
                               attributes={"global": ir.FlatSymbolRefAttr.get(symbol)}).result
