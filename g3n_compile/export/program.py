"""The one export recipe: PyTorch entry points -> torch.export -> torch-mlir's decompositions -> torch-dialect MLIR,
every named weight an external parameter, so the module holds code only.

Uses IREE's bundled copy of torch-mlir's FX importer: its context also holds IREE's `util` and `stream` dialects,
which the parameter ops need. A weight becomes `util.global private @param_<name> = #stream.parameter.named<
"model"::"<name>">`, loaded where it is used; small constants (rope frequencies) stay inline.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from iree.compiler import ir
from iree.compiler.dialects import util as util_d
from iree.compiler.extras.fx_importer import TORCH_DTYPE_TO_MLIR_TYPE_ASM, FxImporter
from torch import nn
from torch_mlir.extras.fx_decomp_util import get_decomposition_table

from runtime.abi import Function

PARAM_SCOPE = "model"
TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32, "bool": torch.bool}


@dataclass
class EntryPoint:
    """One function of the module: `module.forward` traced at `args` (distinct tensors: torch.export wires aliased
    example inputs to one placeholder, silently)."""

    name: str
    module: nn.Module
    args: tuple[torch.Tensor, ...]


@dataclass
class Exported:
    mlir: str
    parameters: list[str]  # the archive names the module loads


def example_args(function: Function) -> tuple[torch.Tensor, ...]:
    """Zeros of the shape and dtype of each of `function`'s arguments, each a tensor of its own."""
    return tuple(torch.zeros(a.shape, dtype=TORCH_DTYPES[a.dtype]) for a in function.args)


def trace(entry: EntryPoint) -> torch.export.ExportedProgram:
    """`entry` through torch.export and torch-mlir's decompositions: the program the importer reads."""
    # The frozen importer finds buffers only in the state dict.
    for m in entry.module.modules():
        m._non_persistent_buffers_set.clear()
    with warnings.catch_warnings():  # torch.export's own deprecation chatter, not actionable here
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(entry.module, entry.args, strict=False)
        return program.run_decompositions(get_decomposition_table())


def export_module(entry_points: list[EntryPoint], parameter_name: Callable[[str], str] = lambda key: key,
                  log=None) -> Exported:
    """The entry points as one torch-dialect module. `parameter_name` maps a state-dict key of an entry point's
    module to the weight's archive name; keys that are not parameters (buffers) stay inline."""
    hooks = _ExternalParameters()
    importer = FxImporter(context=ir.Context(), hooks=hooks)
    for entry in entry_points:
        t0 = time.perf_counter()
        program = trace(entry)
        parameters = {n for n, _ in entry.module.named_parameters()}
        hooks.names_by_id = {id(v): parameter_name(k) for k, v in program.state_dict.items() if k in parameters}
        importer.import_frozen_program(program, func_name=entry.name)
        if log:
            log(f"  exported {entry.name} in {time.perf_counter() - t0:.1f}s")
    return Exported(str(importer.module), sorted(hooks.globals))


class _ExternalParameters:
    """FX importer hook: every named weight becomes a `util.global` bound to an archive parameter (as
    iree-turbine externalises parameters)."""

    def __init__(self):
        self.names_by_id: dict[int, str] = {}
        self.globals: dict[str, str] = {}

    def prepare_module(self, module_op):
        self.body = module_op.regions[0].blocks[0]

    def resolve_literal(self, gni, literal, info=None):
        name = self.names_by_id.get(id(literal)) if isinstance(literal, torch.Tensor) else None
        if name is None:
            return None
        tensor_type = ir.Type.parse(f"tensor<{'x'.join(map(str, literal.shape))}x"
                                    f"{TORCH_DTYPE_TO_MLIR_TYPE_ASM[literal.dtype]}>")
        symbol = "param_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
        if name not in self.globals:
            util_d.GlobalOp(symbol, tensor_type, sym_visibility="private",
                            initial_value=ir.Attribute.parse(
                                f'#stream.parameter.named<"{PARAM_SCOPE}"::"{name}"> : {tensor_type}'),
                            inlining_policy=ir.Attribute.parse("#util.inline.never"),
                            ip=ir.InsertionPoint.at_block_begin(self.body))
            self.globals[name] = symbol
        loaded = util_d.GlobalLoadOp(tensor_type, symbol).result
        return ir.Operation.create("torch_c.from_builtin_tensor", results=[gni._cc.tensor_to_vtensor_type(literal)],
                                   operands=[loaded]).result
