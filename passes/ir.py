"""The rewrite layer g3n's passes are written in, over the MLIR Python bindings (IREE's context: torch, torch_c,
util, linalg, tensor, arith) and torch-dialect IR as the FX importer writes it: `Pattern` (match/rewrite) and
`apply_patterns`, the matchers the passes share (`rms_norm`, `linear_weight`, chains of ops), and `Builder`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from iree.compiler import ir

_VTENSOR = re.compile(r"!torch\.vtensor<\[([0-9,]*)\],(\w+)>")
ASSERT = "torch.aten._assert_tensor_metadata"
_PARAM = re.compile(r'#stream\.parameter\.named<"([^"]*)"::"([^"]*)">')


def parse_module(text: str) -> ir.Module:
    return ir.Module.parse(text, ir.Context())


class Pattern:
    """One rewrite of one IR form, in the style of xDSL's RewritePattern. `match(op, ctx)` looks at one candidate
    op (by default every op of the module: `candidates`) and returns what `rewrite` needs, or None; it changes
    nothing. `name` keys the number of sites in the pass's statistics and its expected count."""

    name = ""

    def candidates(self, module: ir.Module) -> list:
        return ops(module)

    def match(self, op, ctx):
        raise NotImplementedError

    def rewrite(self, site, ctx) -> None:
        raise NotImplementedError


def apply_patterns(module: ir.Module, patterns: list[Pattern], ctx) -> dict[str, int]:
    """Each pattern in turn: match every candidate first (so a rewrite never hides or invents a site of its own
    pattern), then rewrite the sites in IR order. Returns the sites per pattern name."""
    counts = {}
    for pattern in patterns:
        sites = [site for op in pattern.candidates(module) if (site := pattern.match(op, ctx)) is not None]
        for site in sites:
            pattern.rewrite(site, ctx)
        counts[pattern.name] = len(sites)
    return counts


def ops(root, name: str | None = None) -> list[ir.Operation]:
    """Every operation under `root` (pre-order), optionally only those called `name`. A list, so
    callers may rewrite while iterating."""
    found = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if name is None or child.name == name:
                        found.append(child)
                    visit(child)

    visit(root.operation)
    return found


def producer(value: ir.Value) -> ir.Operation | None:
    owner = value.owner
    return owner.operation if isinstance(owner, ir.OpView | ir.Operation) else None


def users(value: ir.Value) -> list[ir.Operation]:
    """The ops that compute from `value`: its users but the `torch.aten._assert_tensor_metadata` checks
    torch.export leaves on many values."""
    found = [use.owner.operation if isinstance(use.owner, ir.OpView) else use.owner for use in value.uses]
    return [op for op in found if op.name != ASSERT]


def chain_up(value: ir.Value, *names: str) -> list[ir.Operation] | None:
    """The producers of `value` named `names` (torch.aten.*), each the previous one's first operand, or None."""
    found = []
    for name in names:
        op = producer(value)
        if op is None or op.name != f"torch.aten.{name}":
            return None
        found.append(op)
        value = op.operands[0]
    return found


def chain_down(value: ir.Value, *names: str) -> list[ir.Operation] | None:
    """The ops named `names` (torch.aten.*), each the only user (`users`) of the previous one's result, or None."""
    found = []
    for name in names:
        after = users(value)
        if len(after) != 1 or after[0].name != f"torch.aten.{name}":
            return None
        found.append(after[0])
        value = after[0].result
    return found


@dataclass
class RMSNorm:
    x: ir.Value
    weight: str  # its parameter name
    eps: float
    ops: list    # from the weight multiply up to the squaring


def rms_norm(value: ir.Value, params: dict) -> RMSNorm | None:
    """`value` = mul(mul(x, pow.Tensor_Scalar(add.Scalar(mean.dim(pow.Tensor_Scalar(x, 2), [-1], keepdim), eps),
    -0.5)), w): g3n_compile.model.RMSNorm of an f32 x, w a parameter as loaded or cast to f32 (`.float()` of a
    bf16 weight, `prims.convert_element_type`)."""
    scaled = chain_up(value, "mul.Tensor", "mul.Tensor")
    if scaled is None:
        return None
    w = scaled[0].operands[1]
    cast = producer(w)
    if cast is not None and cast.name == "torch.prims.convert_element_type":
        w = cast.operands[0]
    weight = loaded_parameter(w, params)
    x = scaled[1].operands[0]
    rsqrt = chain_up(scaled[1].operands[1], "pow.Tensor_Scalar", "add.Scalar", "mean.dim", "pow.Tensor_Scalar")
    shape = vtensor(x)
    if weight is None or rsqrt is None or shape is None or shape[1] != "f32":
        return None
    power, add, mean, square = rsqrt
    if (constant_float(power.operands[1]) != -0.5 or constant_int(add.operands[2]) != 1 or
            constant_ints(mean.operands[1]) not in ([-1], [len(shape[0]) - 1]) or square.operands[0] != x or
            constant_int(square.operands[1]) != 2):
        return None
    return RMSNorm(x, weight, constant_float(add.operands[1]), [*scaled, *rsqrt])


def erase_with_checks(candidates) -> None:
    """Erase those of `candidates` that only metadata checks still read, with those checks, until none is
    left to erase (so a chain of them goes whatever its order). Others keep their remaining users."""
    pending, changed = list(candidates), True
    while changed:
        left = []
        for op in pending:
            if all(not users(r) for r in op.results):
                for r in op.results:
                    for use in list(r.uses):
                        use.owner.operation.erase()
                op.erase()
            else:
                left.append(op)
        pending, changed = left, len(left) < len(pending)


def vtensor(value_or_type) -> tuple[tuple[int, ...], str] | None:
    """(shape, element type) of a static `!torch.vtensor`, else None."""
    t = value_or_type.type if isinstance(value_or_type, ir.Value) else value_or_type
    m = _VTENSOR.fullmatch(str(t))
    if not m:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d), m.group(2)


def vtensor_type(shape, elem: str = "f32") -> ir.Type:
    return ir.Type.parse(f"!torch.vtensor<[{','.join(map(str, shape))}],{elem}>")


def tensor_type(shape, elem: str = "f32") -> ir.Type:
    return ir.Type.parse(f"tensor<{'x'.join(map(str, shape))}x{elem}>")


def constant_int(value: ir.Value) -> int | None:
    op = producer(value)
    if op is None or op.name != "torch.constant.int":
        return None
    return ir.IntegerAttr(op.attributes["value"]).value


def constant_float(value: ir.Value) -> float | None:
    op = producer(value)
    if op is None or op.name != "torch.constant.float":
        return None
    return ir.FloatAttr(op.attributes["value"]).value


def constant_ints(value: ir.Value) -> list[int] | None:
    op = producer(value)
    if op is None or op.name != "torch.prim.ListConstruct":
        return None
    items = [constant_int(v) for v in op.operands]
    return None if any(i is None for i in items) else items


def parameters(module: ir.Module) -> dict[str, tuple[str, ir.Operation]]:
    """Global symbol -> (archive parameter name, the util.global op) for every external parameter."""
    found = {}
    for op in module.body.operations:
        if op.operation.name == "util.global" and "initial_value" in op.attributes:
            m = _PARAM.match(str(op.attributes["initial_value"]))
            if m:
                found[ir.StringAttr(op.attributes["sym_name"]).value] = (m.group(2), op.operation)
    return found


def loaded_parameter(value: ir.Value, params: dict) -> str | None:
    """The parameter name if `value` is `torch_c.from_builtin_tensor(util.global.load @param)`."""
    op = producer(value)
    if op is None or op.name != "torch_c.from_builtin_tensor":
        return None
    load = producer(op.operands[0])
    if load is None or load.name != "util.global.load":
        return None
    symbol = ir.FlatSymbolRefAttr(load.attributes["global"]).value
    return params[symbol][0] if symbol in params else None


def linear_weight(op: ir.Operation, params: dict) -> str | None:
    """The parameter name W if `op` is `torch.aten.mm(x, torch.aten.permute(W, [1, 0]))` (a linear layer
    as torch.export writes it) with W an external parameter."""
    if op.name != "torch.aten.mm":
        return None
    perm = producer(op.operands[1])
    if perm is None or perm.name != "torch.aten.permute" or constant_ints(perm.operands[1]) != [1, 0]:
        return None
    return loaded_parameter(perm.operands[0], params)


def add_parameter(module: ir.Module, name: str, shape, elem: str) -> str:
    """Declare a new external parameter `name` (in the scope the module's parameters use); returns its
    global's symbol."""
    scope = str(next(iter(parameters(module).values()))[1].attributes["initial_value"]).split('"')[1]
    t = tensor_type(shape, elem)
    symbol = "param_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    with ir.InsertionPoint.at_block_begin(module.body), ir.Location.unknown():
        ir.Operation.create("util.global", attributes={
            "sym_name": ir.StringAttr.get(symbol), "sym_visibility": ir.StringAttr.get("private"),
            "type": ir.TypeAttr.get(t),
            "initial_value": ir.Attribute.parse(f'#stream.parameter.named<"{scope}"::"{name}"> : {t}'),
            "inlining_policy": ir.Attribute.parse("#util.inline.never")})
    return symbol


def erase_dead(root) -> int:
    """Erase side-effect-free ops whose results are unused, repeatedly; returns how many. torch ops whose
    results are all value-semantic tensors (`!torch.vtensor`, all the FX importer writes) are pure."""
    pure = ("torch.constant.", "torch.prim.ListConstruct", "torch.vtensor.literal", "torch_c.", "util.global.load")

    def is_pure(op) -> bool:
        return op.name.startswith(pure) or (op.name.startswith("torch.aten.") and
                                            all(str(r.type).startswith("!torch.vtensor<") for r in op.results))

    erased, changed = 0, True
    while changed:
        changed = False
        for op in reversed(ops(root)):
            if is_pure(op) and op.results and all(not list(r.uses) for r in op.results):
                op.erase()
                erased, changed = erased + 1, True
    return erased


def erase_unused_parameters(module: ir.Module) -> list[str]:
    """Drop parameter globals no function loads any more; returns their archive names."""
    used = {ir.FlatSymbolRefAttr(op.attributes["global"]).value for op in ops(module, "util.global.load")}
    dropped = []
    for symbol, (name, op) in parameters(module).items():
        if symbol not in used:
            op.erase()
            dropped.append(name)
    return dropped


class Builder:
    """Creates torch-dialect ops just before an anchor op."""

    def __init__(self, anchor: ir.Operation):
        self.anchor = anchor
        self.location = anchor.location

    def op(self, name: str, operands, result_types, attributes=None) -> ir.Operation:
        with self.location:
            return ir.Operation.create(name, results=list(result_types), operands=list(operands),
                                       attributes=attributes or {}, ip=ir.InsertionPoint(self.anchor))

    def int(self, v: int) -> ir.Value:
        with self.location:
            attr = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), v)
        return self.op("torch.constant.int", [], [ir.Type.parse("!torch.int")], {"value": attr}).result

    def bool(self, v: bool) -> ir.Value:
        with self.location:
            attr = ir.BoolAttr.get(v)
        return self.op("torch.constant.bool", [], [ir.Type.parse("!torch.bool")], {"value": attr}).result

    def none(self) -> ir.Value:
        return self.op("torch.constant.none", [], [ir.Type.parse("!torch.none")]).result

    def float(self, v: float) -> ir.Value:
        with self.location:
            attr = ir.FloatAttr.get(ir.F64Type.get(), v)
        return self.op("torch.constant.float", [], [ir.Type.parse("!torch.float")], {"value": attr}).result

    def ints(self, values) -> ir.Value:
        return self.op("torch.prim.ListConstruct", [self.int(v) for v in values],
                       [ir.Type.parse("!torch.list<int>")]).result

    def literal(self, values, elem: str) -> ir.Value:
        """A 1-D constant tensor (`elem` i1 takes bools)."""
        text = ", ".join(str(v).lower() for v in values)
        with self.location:
            attr = ir.Attribute.parse(f"dense<[{text}]> : {tensor_type([len(values)], elem)}")
        return self.op("torch.vtensor.literal", [], [vtensor_type([len(values)], elem)], {"value": attr}).result

    def parameter(self, symbol: str, shape, elem: str) -> ir.Value:
        """The external parameter global `symbol` as a `!torch.vtensor`."""
        loaded = self.op("util.global.load", [], [tensor_type(shape, elem)],
                         {"global": ir.FlatSymbolRefAttr.get(symbol)}).result
        return self.op("torch_c.from_builtin_tensor", [loaded], [vtensor_type(shape, elem)]).result

    def aten(self, name: str, operands, shape, elem: str = "f32") -> ir.Value:
        return self.op(f"torch.aten.{name}", operands, [vtensor_type(shape, elem)]).result

    def unsqueeze(self, x: ir.Value, dim: int) -> ir.Value:
        shape = list(vtensor(x)[0])
        shape.insert(dim, 1)
        return self.aten("unsqueeze", [x, self.int(dim)], shape, vtensor(x)[1])

    def view(self, x: ir.Value, shape) -> ir.Value:
        return self.aten("view", [x, self.ints(shape)], shape, vtensor(x)[1])
