"""int4 weight packing: linear weights as group-wise symmetric int4, dequantised inside the matmul.

Matches `torch.aten.mm(x [M, K], torch.aten.permute(W, [1, 0]))` where W is an external parameter
named like a quantisable linear (attention q/k/v/o, MLP gate/up/down, LAuReL (fused or not), AltUp and
per-layer projections, and the LM head tied to the token embedding; see QUANTIZED) and K is a
multiple of the group size G.

Leaves `func.call @g3n_int4_mm_...(x, codes, scales)` (pattern `int4-linear`), a private function of
`iree_tensor_ext.bitcast` of the i8 codes [N, K/2] to i4 [N, K], a dequant `linalg.generic` (sign-extend,
times the f16 group scale) and a grouped-contraction `linalg.generic` over [M, K/G, G] accumulating in f32,
which IREE fuses into one dispatch (on GPUs; two on the CPU). The i4 bitcast is what lets IREE fuse the
dequantisation into the contraction; plain ATen unpacking would materialise the dequantised weight. The archive gains
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

from .ir import Pattern, add_parameter, apply_patterns, linear_weight, ops, parameters, tensor_type, vtensor
from .pipeline import Pass, PassContext

QUANTIZED = re.compile(r"(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|laurel\.linear_(left|right)"
                       r"|per_layer_input_gate|per_layer_projection|attn_laurel_in)|altup_(unembed_)?projections\.\d+"
                       r"|per_layer_model_projection|embed_tokens)\.weight")


LAYOUT = "W.int4 i8 [N, K/2] (low nibble = even k), W.int4_scale f16 [N, K/G]"


def quantize_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed codes int8 [N, K] in -8..7, f16 scales [N, K/G]) for weight w [N, K]."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    scale = (extreme / -8).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.clamp(torch.round(groups / safe[..., None]), -8, 7).to(torch.int8).reshape(n, k)
    return codes, scale


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes packed two per byte as int8 [N, K/2], f16 scales [N, K/G]) for weight w [N, K]: `LAYOUT`."""
    codes, scale = quantize_codes(w, group)
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


class QuantizedLinear(Pattern):
    """`mm(x [M, K], permute(W))` by a quantisable weight W whose K the group size divides: a call of the int4
    kernel for its shape, reading `W.int4` and `W.int4_scale`."""

    name = "int4-linear"

    def __init__(self):
        self.kernels, self.globals = set(), {}

    def candidates(self, module) -> list:
        self.module, self.params = module, parameters(module)
        return ops(module, "torch.aten.mm")

    def match(self, op, ctx):
        name = linear_weight(op, self.params)
        if name is None or not QUANTIZED.fullmatch(name):
            return None
        k = vtensor(op.operands[0])[0][1]
        return (op, name) if k % ctx.group_size == 0 and k % 2 == 0 else None

    def rewrite(self, site, ctx) -> None:
        op, name = site
        g = ctx.group_size
        (m, k), elem = vtensor(op.operands[0])
        n = vtensor(op.result)[0][1]
        kernel = f"g3n_int4_mm_{m}x{k}x{n}_g{g}_{elem}"
        if kernel not in self.kernels:
            # Parse the kernel as a module of its own, then move its function into ours.
            kernel_module = ir.Module.parse("module {" + _kernel(kernel, m, k, n, g, elem) + "}")
            for f in list(kernel_module.body.operations):
                f.operation.detach_from_parent()
                self.module.body.append(f.operation)
            self.kernels.add(kernel)
        if name not in self.globals:
            codes = add_parameter(self.module, f"{name}.int4", (n, k // 2), "i8")
            scales = add_parameter(self.module, f"{name}.int4_scale", (n, k // g), "f16")
            ctx.derived.add_many((f"{name}.int4", f"{name}.int4_scale"), (name,), lambda w: quantize(w, g))
            self.globals[name] = codes, scales
        codes_sym, scale_sym = self.globals[name]
        with op.location, ir.InsertionPoint(op):
            codes = _load(codes_sym, tensor_type((n, k // 2), "i8"))
            scales = _load(scale_sym, tensor_type((n, k // g), "f16"))
            call = ir.Operation.create("func.call", results=[op.result.type], operands=[op.operands[0], codes, scales],
                                       attributes={"callee": ir.FlatSymbolRefAttr.get(kernel)})
        op.result.replace_all_uses_with(call.result)
        op.erase()


def linear_depths(ctx: PassContext) -> list[int]:
    """K of every quantisable linear a function of the model computes, as the module has them when int4-pack runs
    (q/k/v and LAuReL's left projection as one matmul when laurel-fusion ran)."""
    c = ctx.config
    d = c.hidden_size
    depths = [d] * (1 + 2 * (c.altup_num_inputs - 1) + 1)  # per-layer model projection, AltUp (un)embed, LM head
    for layer in range(c.num_hidden_layers):
        inputs = 1 if "laurel-fusion" in ctx.enabled else (4 if c.kv_source(layer) == layer else 2)
        depths += [d] * inputs + [c.num_attention_heads * c.head_dim]           # q/k/v/LAuReL-left, o
        depths += [d, d, c.intermediate_size[layer], c.laurel_rank]               # gate, up, down, LAuReL right
        depths += [d, c.hidden_size_per_layer_input]                             # per-layer input gate, projection
    return depths


class Int4Pack(Pass):
    """Linear weights as group-wise int4 with f16 scales; dequant fused into the matmul."""

    name = "int4-pack"
    after = ("altup-fusion", "laurel-fusion")

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        return ctx.quant == "int4"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [QuantizedLinear()]

    def run(self, module, ctx: PassContext) -> dict[str, int]:
        linears, = patterns = self.patterns(ctx)
        return {**apply_patterns(module, patterns, ctx), "weights": len(linears.globals),
                "kernels": len(linears.kernels)}

    def expected(self, ctx: PassContext) -> dict[str, int]:
        """Every linear of every function whose K the group size divides."""
        per_function = sum(k % ctx.group_size == 0 and k % 2 == 0 for k in linear_depths(ctx))
        return {"int4-linear": per_function * len(ctx.functions)}


def _load(symbol: str, t: ir.Type) -> ir.Value:
    return ir.Operation.create("util.global.load", results=[t],
                               attributes={"global": ir.FlatSymbolRefAttr.get(symbol)}).result
