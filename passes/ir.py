"""Helpers over the MLIR Python bindings (IREE's context: torch, torch_c, util, linalg, tensor, arith)
for torch-dialect IR as the FX importer writes it."""

from __future__ import annotations

import re

from iree.compiler import ir

_VTENSOR = re.compile(r"!torch\.vtensor<\[([0-9,]*)\],(\w+)>")
_PARAM = re.compile(r'#stream\.parameter\.named<"([^"]*)"::"([^"]*)">')


def parse_module(text: str) -> ir.Module:
    return ir.Module.parse(text, ir.Context())


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

    def ints(self, values) -> ir.Value:
        return self.op("torch.prim.ListConstruct", [self.int(v) for v in values],
                       [ir.Type.parse("!torch.list<int>")]).result

    def aten(self, name: str, operands, shape, elem: str = "f32") -> ir.Value:
        return self.op(f"torch.aten.{name}", operands, [vtensor_type(shape, elem)]).result

    def unsqueeze(self, x: ir.Value, dim: int) -> ir.Value:
        shape = list(vtensor(x)[0])
        shape.insert(dim, 1)
        return self.aten("unsqueeze", [x, self.int(dim)], shape, vtensor(x)[1])

    def view(self, x: ir.Value, shape) -> ir.Value:
        return self.aten("view", [x, self.ints(shape)], shape, vtensor(x)[1])
