"""Run g3n's passes over the exported module, in dependency order, and check that each found what it must.

Each pass declares the passes it must follow (`after`); networkx orders them (ties keep registration
order). A disabled pass is skipped; disabling one that an enabled pass needs (`requires`) is an
error. A pass is a list of patterns (passes/ir.py); it reports the sites each pattern rewrote, and says
from the model's config how many there must be (`expected`: layers x sites per layer and function). A
count that differs means the IR is not in the form the pass was written for (a change in the model, the
export or an earlier pass), so the compile stops with the pass, the pattern and both counts, rather than
leave a slower module without a word; `--disable-pass` is the explicit way out. The pipeline collects the
statistics for g3n.json, and the IR can be written out after any pass for inspection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from iree.compiler import ir

from runtime.abi import Function
from runtime.errors import UserError

from .ir import Pattern, apply_patterns, erase_dead, erase_unused_parameters, parse_module
from .params import DerivedParameters


class PassError(UserError, ValueError):
    """A pass request that cannot be honoured (unknown pass, broken dependency), or a pass that did not find
    what the model says it must."""


@dataclass
class PassContext:
    config: object                  # the model's TextConfig
    target: object                  # the target module (targets.cpu, ...): its SUPPORTS
    functions: dict[str, Function]  # the module ABI's text functions (runtime/abi.py)
    max_context: int                # positions the KV caches hold
    quant: str = "none"             # "none" | "int4"
    group_size: int = 32
    arch: str = ""                  # the target's architecture (its --*-arch/--cpu-features value)
    weight_dtype: str = "float32"   # the text weights' dtype in the module
    enabled: frozenset[str] = frozenset()  # the passes this pipeline runs (set by run_passes)
    derived: DerivedParameters = field(default_factory=DerivedParameters)

    def one_token_functions(self) -> list[Function]:
        return [f for f in self.functions.values() if f.arg("input_ids").shape[1] == 1]

    def describe(self) -> str:
        c, functions = self.config, ", ".join(f"{f.name} [{f.arg('input_ids').shape[1]} tokens]"
                                              for f in self.functions.values())
        return f"{c.num_hidden_layers} layers; functions {functions}; {self.weight_dtype} weights"


class Pass:
    """One pass: `name`, a docstring (the IR matched and the IR left), `after`/`requires` (pass names),
    `applies(ctx)`, its `patterns(ctx)` and the sites each must find, `expected(ctx)`. `run` applies the patterns;
    a pass with work around them (declarations, clean-up) extends it."""

    name: str = ""
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        return True

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        raise NotImplementedError

    def expected(self, ctx: PassContext) -> dict[str, int]:
        raise NotImplementedError

    def run(self, module: ir.Module, ctx: PassContext) -> dict[str, int]:
        return apply_patterns(module, self.patterns(ctx), ctx)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


def ordered(passes: list[type[Pass]]) -> list[type[Pass]]:
    graph = nx.DiGraph()
    index = {p.name: i for i, p in enumerate(passes)}
    graph.add_nodes_from(index)
    for p in passes:
        for before in p.requires:
            if before not in index:
                raise PassError(f"pass {p.name} requires unknown pass {before}")
        for before in p.after + p.requires:
            if before in index:  # `after` only orders passes that are both present
                graph.add_edge(before, p.name)
    if not nx.is_directed_acyclic_graph(graph):
        raise PassError(f"pass order has a cycle: {nx.find_cycle(graph)}")
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in nx.lexicographical_topological_sort(graph, key=index.get)]


def check_pass_names(passes: list[type[Pass]], disabled=(), dump_after=()) -> None:
    """Every name given to --disable-pass and --dump-ir-after is a pass (checked before the export)."""
    names = {p.name for p in passes}
    for name in list(disabled) + [n for n in dump_after if n != "all"]:
        if name not in names:
            raise PassError(f"unknown pass {name!r} (available: {', '.join(sorted(names))})")


def run_passes(mlir: str, ctx: PassContext, passes: list[type[Pass]], disabled=(), dump_after=(),
               dump_dir: Path | None = None, log=print, check_sites: bool = True) -> tuple[str, list[dict]]:
    """Apply `passes` (minus `disabled`) to module text `mlir`; returns the new text and per-pass stats.
    `dump_after`: pass names (or "all") after which the IR is written to `dump_dir`. `check_sites` compares each
    pass's sites with `expected` (off only for IR that is not a whole exported model: tests on fragments)."""
    check_pass_names(passes, disabled, dump_after)
    for p in passes:
        missing = [r for r in p.requires if r in disabled]
        if p.name not in disabled and p.applies(ctx) and missing:
            raise PassError(f"pass {p.name} requires {', '.join(missing)}, which is disabled")
    ctx.enabled = frozenset(p.name for p in passes if p.name not in disabled and p.applies(ctx))
    module = parse_module(mlir)
    report = []
    for i, p in enumerate(ordered(passes)):
        entry = {"name": p.name, "enabled": p.name in ctx.enabled}
        if entry["enabled"]:
            t0 = time.perf_counter()
            with module.context:
                instance = p()
                entry["stats"] = instance.run(module, ctx)
                if check_sites:
                    _check_sites(p.name, entry["stats"], instance.expected(ctx), ctx)
                erase_dead(module)
                dropped = erase_unused_parameters(module)
            if dropped:
                entry["stats"]["parameters_dropped"] = len(dropped)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            log(f"  pass {p.name}: " + ", ".join(f"{k} {v}" for k, v in entry["stats"].items()))
        report.append(entry)
        if dump_dir is not None and ("all" in dump_after or p.name in dump_after):
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / f"{i:02d}-{p.name}.mlir").write_text(str(module))
    return str(module), report


def _check_sites(name: str, found: dict, expected: dict[str, int], ctx: PassContext) -> None:
    wrong = [f"{pattern}: {found.get(pattern, 0)} sites, {count} expected" for pattern, count in expected.items()
             if found.get(pattern, 0) != count]
    if wrong:
        raise PassError(f"pass {name} did not find the IR it rewrites ({'; '.join(wrong)}; for {ctx.describe()}): "
                        f"the exported module is not in the form the pass expects. Compile with --disable-pass {name} "
                        f"to go without it, and report this.")
