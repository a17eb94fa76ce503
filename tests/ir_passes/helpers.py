"""What the pass tests share: FileCheck over a pass's output, running IR fragments compiled for the CPU, and
exporting small PyTorch modules the way the model is exported."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import iree.compiler as ic
import iree.runtime as rt
import numpy as np
import torch

from g3n_compile.archive import write_archive
from g3n_compile.checkpoint.tiny_random import CONFIG
from g3n_compile.export.program import EntryPoint, export_module
from passes import PassContext
from runtime.abi import text_functions
from targets import cpu

FIXTURES = Path(__file__).with_name("fixtures")
PARAMETER = re.compile(r'#stream\.parameter\.named<"model"::"([^"]+)">')


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def filecheck(output: str, checks: str | Path, prefix: str = "CHECK", tmp_path: Path | None = None) -> None:
    """LLVM FileCheck semantics (the `filecheck` package, as xDSL uses): `checks` is a fixture file name, or the
    text, holding `// CHECK...` lines with `prefix`; assertion error with FileCheck's report if `output` fails."""
    tool = shutil.which("filecheck") or str(Path(sys.executable).with_name("filecheck"))
    path = FIXTURES / checks if isinstance(checks, str) and not checks.lstrip().startswith("//") else None
    if path is None:
        path = Path(tmp_path or FIXTURES) / "checks.txt"
        path.write_text(checks)
    done = subprocess.run([tool, str(path), f"--check-prefix={prefix}"], input=output, capture_output=True, text=True)
    assert done.returncode == 0, f"FileCheck ({prefix}) failed:\n{done.stdout}{done.stderr}"


def count(text: str, op: str) -> int:
    return len(re.findall(rf"\b{re.escape(op)}\b", text))


def parameter_names(mlir: str) -> list[str]:
    return PARAMETER.findall(mlir)


def run_compiled(mlir: str, tmp_path, inputs, weights: dict | None = None, quant: str = "none", function: str = "main"):
    """`function` of `mlir` compiled for this CPU, its parameters (if any) from `weights`, run on `inputs`."""
    vmfb = tmp_path / "m.vmfb"
    ic.compile_str(mlir, output_file=str(vmfb), input_type="torch", extra_args=cpu.compile_flags(quant=quant))
    config = rt.Config("local-task")
    modules = []
    if weights:
        write_archive(tmp_path / "w.irpa", list(weights), weights.__getitem__, log=lambda *_: None)
        index = rt.ParameterIndex()
        index.load(str(tmp_path / "w.irpa"))
        modules.append(rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")))
    modules += [rt.create_hal_module(config.vm_instance, config.device), rt.VmModule.mmap(config.vm_instance, str(vmfb))]
    context = rt.VmContext(config.vm_instance, modules=modules)
    main = rt.FunctionInvoker(context, config.device, modules[-1].lookup_function(function))
    return [np.array(r.to_host()) for r in main(*inputs)]


def export_layer(layer: torch.nn.Module, weights: dict, examples: dict) -> str:
    """`layer` exported as the model is (the export's own recipe, its weights external parameters named
    `layers.0.<name>`), one function `<name>_step` per entry `name: example inputs` of `examples`."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(weights["layers.0." + name])
    entries = [EntryPoint(f"{name}_step", layer, args) for name, args in examples.items()]
    return export_module(entries, lambda key: "layers.0." + key).mlir


def compare_compiled(before: str, after: str, tmp_path, ctx, weights: dict, examples: dict) -> None:
    """Both modules compiled, every function run on `examples` (name: inputs): equal within f32 reassociation."""
    source = ctx.derived.getter(weights.__getitem__)
    fused_weights = {n: source(n) for n in parameter_names(after)}
    for name, inputs in examples.items():
        inputs = [x.numpy() for x in inputs]
        want = run_compiled(before, tmp_path, inputs, weights, function=f"{name}_step")
        got = run_compiled(after, tmp_path, inputs, fused_weights, function=f"{name}_step")
        for w, a in zip(want, got):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


def context(target=cpu, chunk: int = 3, max_context: int = 64, **options):
    """A PassContext for IR made at tiny-random's config: prefill of `chunk` tokens and decode."""
    functions = text_functions(chunk, CONFIG.num_hidden_layers * CONFIG.hidden_size_per_layer_input,
                               CONFIG.hidden_size, CONFIG.vocab_size)
    return PassContext(CONFIG, target, functions, max_context, **options)
