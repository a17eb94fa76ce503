"""torch.export the decoder's cached step into `prefill` and `decode`, import to torch-dialect MLIR.

Module ABI (recorded in g3n.json by the pipeline):
    prefill(input_ids i64[1, C], per_layer_rows f32[1, C, L*P], start i64[1], length i64[1],
            embeds f32[1, C, H], embeds_mask i1[1, C])                                     -> logits f32[1, 1, V]
    decode (input_ids i64[1, 1], per_layer_rows f32[1, 1, L*P], start i64[1])                -> logits f32[1, 1, V]
`embeds` replaces the token embedding where `embeds_mask` is True: the image/audio soft tokens and the
embedders' rows of multimodal token ids, which the runtime places (a text prompt passes a False mask).
The KV caches are module globals (`util.global mutable`), read and written in place by both
functions, so they stay on the device between calls and no call copies a whole cache. Every weight is
an external parameter (`#stream.parameter.named<"model"::NAME>`), so the module holds code only. The
PLE table is not in the module at all: the runtime gathers its rows on the host.

Uses IREE's bundled copy of torch-mlir's FX importer: its context also holds IREE's `util` and
`stream` dialects, which the parameter and global ops need (toolchain notes §4).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .model import Gemma3nTextModel

PARAM_SCOPE = "model"


@dataclass
class ExportedModule:
    mlir: str
    parameters: list[str]  # names (model parameter names) the module loads from the archive
    cache_shapes: list[tuple[int, ...]]
    chunk: int


class _Step(nn.Module):
    """model.step with flat tensor arguments, as torch.export wants them; prefill also takes `length`,
    `embeds` and `embeds_mask`."""

    def __init__(self, model: Gemma3nTextModel, prefill: bool):
        super().__init__()
        self.model, self.prefill = model, prefill

    def forward(self, input_ids, per_layer_rows, start, *rest):
        if self.prefill:
            length, embeds, embeds_mask, *caches = rest
            logits, new_caches = self.model.step(input_ids, per_layer_rows, start, length, caches, embeds, embeds_mask)
        else:
            logits, new_caches = self.model.step(input_ids, per_layer_rows, start, torch.ones_like(start), list(rest))
        return (logits, *new_caches)


def _export(model: Gemma3nTextModel, tokens: int, max_context: int, prefill: bool):
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    c = model.config
    rows = c.num_hidden_layers * c.hidden_size_per_layer_input
    # Distinct tensors for every argument: aliased example inputs get wired to one placeholder.
    args = [torch.zeros(1, tokens, dtype=torch.int64), torch.zeros(1, tokens, rows), torch.zeros(1, dtype=torch.int64)]
    if prefill:
        args += [torch.ones(1, dtype=torch.int64), torch.zeros(1, tokens, c.hidden_size),
                 torch.zeros(1, tokens, dtype=torch.bool)]
    args += model.init_caches(1, max_context)
    program = torch.export.export(_Step(model, prefill), tuple(args), strict=False)
    return program.run_decompositions(get_decomposition_table())


def export_text_model(model: Gemma3nTextModel, chunk: int, max_context: int, log=print) -> ExportedModule:
    import time

    from iree.compiler import ir
    from iree.compiler.extras.fx_importer import FxImporter

    # The frozen importer only finds buffers in the state dict (toolchain notes P1).
    for m in model.modules():
        m._non_persistent_buffers_set.clear()
    hooks = _ExternalParameters()
    parameter_names = {n for n, _ in model.named_parameters()}
    importer = FxImporter(context=ir.Context(), hooks=hooks)
    for name, tokens in (("prefill", chunk), ("decode", 1)):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # torch.export's own deprecation chatter, not actionable here
            warnings.simplefilter("ignore", FutureWarning)
            program = _export(model, tokens, max_context, prefill=name == "prefill")
        weights = {k.removeprefix("model."): v for k, v in program.state_dict.items()}
        hooks.names_by_id = {id(v): k for k, v in weights.items() if k in parameter_names}
        importer.import_frozen_program(program, func_name=f"{name}_step")
        log(f"  exported {name} ({tokens} token{'s' * (tokens > 1)}) in {time.perf_counter() - t0:.1f}s")
    shapes = model.cache_shapes(1, max_context)
    mlir = _caches_as_globals(str(importer.module), shapes)
    return ExportedModule(mlir, sorted(hooks.globals), shapes, chunk)


class _ExternalParameters:
    """FX importer hook: every named weight becomes a `util.global` bound to an archive parameter
    (it mirrors iree-turbine's parameter externalisation)."""

    def __init__(self):
        self.names_by_id: dict[int, str] = {}
        self.globals: dict[str, str] = {}

    def prepare_module(self, module_op):
        self.body = module_op.regions[0].blocks[0]

    def resolve_literal(self, gni, literal, info=None):
        from iree.compiler import ir
        from iree.compiler.dialects import util as util_d
        from iree.compiler.extras.fx_importer import TORCH_DTYPE_TO_MLIR_TYPE_ASM

        name = self.names_by_id.get(id(literal)) if isinstance(literal, torch.Tensor) else None
        if name is None:
            return None  # small constants (rope frequencies) stay inline
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


def _tensor_type(shape, elem="f32") -> str:
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>"


def _vtensor_type(shape, elem="f32") -> str:
    return f"!torch.vtensor<[{','.join(map(str, shape))}],{elem}>"


def _caches_as_globals(mlir: str, cache_shapes: list[tuple[int, ...]]) -> str:
    """Make the caches module state: the imported `<fn>_step(args..., caches...) -> (logits, caches...)`
    become private, and public `<fn>(args...) -> logits` wrappers load the cache globals, call the
    step and store the updated caches back."""
    n = len(cache_shapes)
    # Each cache gets a different splat: IREE 3.13 gives mutable globals with identical splat initial
    # values one shared buffer, so k and v caches would alias. The initial contents are never read
    # (a slot is masked until written).
    globals_ = "\n".join(f"  util.global private mutable @kv_cache_{i} = dense<{i}.0> : {_tensor_type(s)}"
                         for i, s in enumerate(cache_shapes))
    wrappers = []
    for fn in ("prefill", "decode"):
        m = re.search(rf"func\.func @{fn}_step\((.*?)\) -> \((.*?)\)", mlir)
        arg_types = re.findall(r"%\w+: (!torch\.vtensor<\[[^\]]*\],\w+>)", m.group(1))
        result_types = re.findall(r"!torch\.vtensor<\[[^\]]*\],\w+>", m.group(2))
        inputs = arg_types[: len(arg_types) - n]
        lines = [f"  func.func @{fn}({', '.join(f'%a{i}: {t}' for i, t in enumerate(inputs))}) -> {result_types[0]} {{"]
        call_args = [f"%a{i}" for i in range(len(inputs))]
        for i, s in enumerate(cache_shapes):
            lines.append(f"    %g{i} = util.global.load @kv_cache_{i} : {_tensor_type(s)}")
            lines.append(f"    %c{i} = torch_c.from_builtin_tensor %g{i} : {_tensor_type(s)} -> {_vtensor_type(s)}")
            call_args.append(f"%c{i}")
        lines.append(f"    %r:{n + 1} = func.call @{fn}_step({', '.join(call_args)}) : "
                     f"({', '.join(arg_types)}) -> ({', '.join(result_types)})")
        for i, s in enumerate(cache_shapes):
            lines.append(f"    %b{i} = torch_c.to_builtin_tensor %r#{i + 1} : {_vtensor_type(s)} -> {_tensor_type(s)}")
            lines.append(f"    util.global.store %b{i}, @kv_cache_{i} : {_tensor_type(s)}")
        lines += [f"    return %r#0 : {result_types[0]}", "  }"]
        wrappers.append("\n".join(lines))
        mlir = mlir.replace(f"func.func @{fn}_step(", f"func.func private @{fn}_step(", 1)
    resources = mlir.find("\n{-#")  # inlined constants are printed after the module
    body, trailer = (mlir[:resources], mlir[resources:]) if resources >= 0 else (mlir, "")
    end = body.rstrip().rfind("}")
    return body[:end] + globals_ + "\n" + "\n".join(wrappers) + "\n}\n" + trailer
