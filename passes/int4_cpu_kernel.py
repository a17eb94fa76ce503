"""int4 CPU kernel: int4-pack's matmuls become calls of g3n's int4 x int8 microkernel (targets/int4_kernel).

Matches the calls int4-pack leaves, `func.call @g3n_int4_mm_{M}x{K}x{N}_g32_{elem}(x, codes, scales)` with
`codes` loaded from a `W.int4` parameter, on a target that declares a kernel (`SUPPORTS.int4_kernel`: the CPU)
when the C compiler builds a variant for the target's CPU (AVX-512 VNNI, AVX2 or scalar; none on non-x86
hosts), group size 32, and K the kernel takes (K % 512 == 0 or K < 512: whole superblocks of 16 groups, or one
partial one; other K keep the generic call).

Leaves `func.call @g3n_q4k_mm_{M}x{K}x{N}_{elem}(x, q4, scales)`, a private function the kernel provides
(`Int4Kernel.function`: the activations quantized to int8 per group of 32, then a `flow.dispatch` of the kernel),
and the kernel's `stream.executable @g3n_cpu_kernels`, whose object IREE links into the module's CPU code.
`W.int4` is replaced by `W.q4_0`, the same codes in the kernel's weight order (`Int4Kernel.weight_order`; the
orders are specified in targets/int4_kernel/layout.py); the f16 scales `W.int4_scale` are unchanged.
"""

from __future__ import annotations

import re

from iree.compiler import ir

from .int4_pack import linear_depths, quantize_codes
from .ir import Pattern, add_parameter, apply_patterns, ops, parameters, tensor_type
from .pipeline import Pass, PassContext, PassError

CALLEE = re.compile(r"g3n_int4_mm_(\d+)x(\d+)x(\d+)_g32_(\w+)")


def _callee(call) -> str:
    return ir.FlatSymbolRefAttr(call.attributes["callee"]).value


class KernelCall(Pattern):
    """A generic int4 call whose K the kernel takes: a call of the kernel's function for its shape, reading the
    weight in the kernel's order."""

    name = "kernel-call"

    def __init__(self, kernel):
        self.kernel, self.shapes, self.functions, self.globals = kernel, [], set(), {}

    def candidates(self, module) -> list:
        self.module, self.params = module, parameters(module)
        return ops(module, "func.call")

    def match(self, call, ctx):
        found = CALLEE.fullmatch(_callee(call))
        if found is None or not self.kernel.takes(int(found.group(2))):
            return None
        m, k, n, elem = found.groups()
        return call, int(m), int(k), int(n), elem

    def rewrite(self, site, ctx) -> None:
        call, m, k, n, elem = site
        name = f"g3n_q4k_mm_{m}x{k}x{n}_{elem}"
        if name not in self.functions:
            if (m, k, n) not in self.shapes:
                self.shapes.append((m, k, n))
            _append(self.module, self.kernel.function(name, m, k, n, elem))
            self.functions.add(name)
        codes = call.operands[1].owner
        weight = self.params[ir.FlatSymbolRefAttr(codes.attributes["global"]).value][0].removesuffix(".int4")
        if weight not in self.globals:
            ordered = weight + self.kernel.weight_suffix
            self.globals[weight] = add_parameter(self.module, ordered, (n, k // 2), "i8")
            reorder = self.kernel.weight_order
            ctx.derived.add_many((ordered, f"{weight}.int4_scale"), (weight,),
                                 lambda w: (lambda c, s: (reorder(c), s))(*quantize_codes(w, self.kernel.group)))
        with call.location, ir.InsertionPoint(call):
            q4 = ir.Operation.create("util.global.load", results=[tensor_type((n, k // 2), "i8")],
                                     attributes={"global": ir.FlatSymbolRefAttr.get(self.globals[weight])}).result
        call.operands[1] = q4
        call.attributes["callee"] = ir.FlatSymbolRefAttr.get(name)


class Int4CpuKernel(Pass):
    """int4 linears on CPU call g3n's int4 x int8 C microkernel (activations quantized to int8 per group)."""

    name = "int4-cpu-kernel"
    requires = ("int4-pack",)

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        kernel = ctx.target.SUPPORTS.int4_kernel
        return ctx.quant == "int4" and kernel is not None and ctx.group_size == kernel.group

    @staticmethod
    def _isa(ctx: PassContext) -> str | None:
        kernel = ctx.target.SUPPORTS.int4_kernel
        try:
            return kernel.isa(ctx.arch)
        except kernel.Error as e:
            raise PassError(f"int4-cpu-kernel: {e}") from None

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [KernelCall(ctx.target.SUPPORTS.int4_kernel)] if self._isa(ctx) else []

    def run(self, module, ctx: PassContext) -> dict:
        kernel, isa = ctx.target.SUPPORTS.int4_kernel, self._isa(ctx)
        calls = [op for op in ops(module, "func.call") if CALLEE.fullmatch(_callee(op))]
        patterns = self.patterns(ctx)
        stats = apply_patterns(module, patterns, ctx)
        rewritten = patterns[0] if patterns else None
        if rewritten is not None and rewritten.shapes:
            try:
                _append(module, kernel.executable(isa, rewritten.shapes), first=True)
            except kernel.Error as e:
                raise PassError(f"int4-cpu-kernel: {e}") from None
        still_called = {_callee(c) for c in ops(module, "func.call")}
        for f in ops(module, "func.func"):  # int4-pack's generic kernels that no call needs any more
            fname = ir.StringAttr(f.attributes["sym_name"]).value
            if CALLEE.fullmatch(fname) and fname not in still_called:
                f.erase()
        return {"kernel-call": stats.get("kernel-call", 0), "generic_calls": len(calls),
                "shapes": len(rewritten.shapes) if rewritten else 0,
                "weights": len(rewritten.globals) if rewritten else 0, "isa": isa or "none"}

    def expected(self, ctx: PassContext) -> dict[str, int]:
        """Every int4 linear whose K the kernel takes, where a variant builds for the CPU (none off x86-64)."""
        kernel = ctx.target.SUPPORTS.int4_kernel
        if not self._isa(ctx):
            return {"kernel-call": 0}
        per_function = sum(k % ctx.group_size == 0 and kernel.takes(k) for k in linear_depths(ctx))
        return {"kernel-call": per_function * len(ctx.functions)}


def _append(module: ir.Module, text: str, first: bool = False) -> None:
    """Parse `text` (a module, or functions for one) and move its top-level ops into `module`."""
    parsed = ir.Module.parse(text if text.lstrip().startswith(("#", "module")) else "module {" + text + "}")
    for op in list(parsed.body.operations):
        op.operation.detach_from_parent()
        if first:
            ir.InsertionPoint.at_block_begin(module.body).insert(op.operation)
        else:
            module.body.append(op.operation)
