"""torch.export the decoder's cached step as the module ABI's `prefill` and `decode` (runtime/abi.py).

`<fn>_step(args..., caches...) -> (logits, caches...)` is exported per function; `_caches_as_globals` then makes
the caches module state: the KV caches are module globals (`util.global mutable`), read and written in place
by public `<fn>(args...) -> logits` wrappers, so they stay on the device between calls and no call copies a
whole cache. `embeds` replaces the token embedding where `embeds_mask` is True: the image/audio soft tokens and
the embedders' rows of multimodal token ids, which the runtime places (a text prompt passes a False mask). The
PLE table is not in the module at all: the runtime gathers its rows on the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from runtime.abi import Function, KvCache, step_symbol, text_functions

from ..model.text import Gemma3nTextModel
from .program import EntryPoint, example_args, export_module


@dataclass
class ExportedText:
    mlir: str
    parameters: list[str]  # names (model parameter names) the module loads from the archive
    functions: dict[str, Function]
    cache_shapes: list[tuple[int, ...]]


class _Step(nn.Module):
    """model.step with the ABI's arguments, then the caches, as flat tensors (what torch.export wants)."""

    def __init__(self, model: Gemma3nTextModel, function: Function):
        super().__init__()
        self.model, self.names = model, [a.name for a in function.args]

    def forward(self, *args):
        a = dict(zip(self.names, args))
        caches = list(args[len(self.names):])
        length = a["length"] if "length" in a else torch.ones_like(a["start"])
        logits, new_caches = self.model.step(a["input_ids"], a["per_layer_rows"], a["start"], length, caches,
                                             a.get("embeds"), a.get("embeds_mask"))
        return (logits, *new_caches)


def export_text_model(model: Gemma3nTextModel, chunk: int, max_context: int, log=print) -> ExportedText:
    c = model.config
    functions = text_functions(chunk, c.num_hidden_layers * c.hidden_size_per_layer_input, c.hidden_size,
                               c.vocab_size)
    entry_points = []
    for function in functions.values():
        entry_points.append(EntryPoint(step_symbol(function.name), _Step(model, function),
                                       (*example_args(function), *model.init_caches(1, max_context))))
    exported = export_module(entry_points, lambda key: key.removeprefix("model."), log=log)
    shapes = model.cache_shapes(1, max_context)
    return ExportedText(_caches_as_globals(exported.mlir, list(functions), shapes), exported.parameters, functions,
                        shapes)


def _tensor_type(shape, elem="f32") -> str:
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>"


def _vtensor_type(shape, elem="f32") -> str:
    return f"!torch.vtensor<[{','.join(map(str, shape))}],{elem}>"


def _caches_as_globals(mlir: str, functions: list[str], cache_shapes: list[tuple[int, ...]]) -> str:
    """Make the caches module state: the imported `<fn>_step(args..., caches...) -> (logits, caches...)`
    become private, and public `<fn>(args...) -> logits` wrappers load the cache globals, call the
    step and store the updated caches back."""
    n = len(cache_shapes)
    # Each cache gets a different splat: IREE 3.13 gives mutable globals with identical splat initial
    # values one shared buffer, so k and v caches would alias. The initial contents are never read
    # (a slot is masked until written).
    globals_ = "\n".join(f"  util.global private mutable @{KvCache.global_name(i)} = dense<{i}.0> : {_tensor_type(s)}"
                         for i, s in enumerate(cache_shapes))
    wrappers = []
    for fn in functions:
        step = step_symbol(fn)
        m = re.search(rf"func\.func @{step}\((.*?)\) -> \((.*?)\)", mlir)
        arg_types = re.findall(r"%\w+: (!torch\.vtensor<\[[^\]]*\],\w+>)", m.group(1))
        result_types = re.findall(r"!torch\.vtensor<\[[^\]]*\],\w+>", m.group(2))
        inputs = arg_types[: len(arg_types) - n]
        lines = [f"  func.func @{fn}({', '.join(f'%a{i}: {t}' for i, t in enumerate(inputs))}) -> {result_types[0]} {{"]
        call_args = [f"%a{i}" for i in range(len(inputs))]
        for i, s in enumerate(cache_shapes):
            lines.append(f"    %g{i} = util.global.load @{KvCache.global_name(i)} : {_tensor_type(s)}")
            lines.append(f"    %c{i} = torch_c.from_builtin_tensor %g{i} : {_tensor_type(s)} -> {_vtensor_type(s)}")
            call_args.append(f"%c{i}")
        lines.append(f"    %r:{n + 1} = func.call @{step}({', '.join(call_args)}) : "
                     f"({', '.join(arg_types)}) -> ({', '.join(result_types)})")
        for i, s in enumerate(cache_shapes):
            lines.append(f"    %b{i} = torch_c.to_builtin_tensor %r#{i + 1} : {_vtensor_type(s)} -> {_tensor_type(s)}")
            lines.append(f"    util.global.store %b{i}, @{KvCache.global_name(i)} : {_tensor_type(s)}")
        lines += [f"    return %r#0 : {result_types[0]}", "  }"]
        wrappers.append("\n".join(lines))
        mlir = mlir.replace(f"func.func @{step}(", f"func.func private @{step}(", 1)
    resources = mlir.find("\n{-#")  # inlined constants are printed after the module
    body, trailer = (mlir[:resources], mlir[resources:]) if resources >= 0 else (mlir, "")
    end = body.rstrip().rfind("}")
    return body[:end] + globals_ + "\n" + "\n".join(wrappers) + "\n}\n" + trailer
