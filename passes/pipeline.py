"""Run g3n's passes over the exported module, in dependency order.

Each pass declares the passes it must follow (`after`); networkx orders them (ties keep registration
order). A disabled pass is skipped; disabling one that an enabled pass needs (`requires`) is an
error. Every pass reports statistics (sites matched, rewritten), which the pipeline collects for
g3n.json, and the IR can be written out after any pass for inspection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from iree.compiler import ir

from .ir import erase_dead, erase_unused_parameters, parse_module
from .params import DerivedParameters


class PassError(ValueError):
    """A pass request that cannot be honoured (unknown pass, broken dependency)."""


@dataclass
class PassContext:
    config: object                 # the model's TextConfig
    target: object                 # the target module (targets.cpu, ...): its SUPPORTS
    quant: str = "none"            # "none" | "int4"
    group_size: int = 32
    arch: str = ""                 # the target's architecture (its --*-arch/--cpu-features value)
    derived: DerivedParameters = field(default_factory=DerivedParameters)


class Pass:
    """One rewrite. Subclasses: `name`, a docstring (the IR matched and the IR left), `after`/`requires`
    (pass names), `applies(ctx)`, and `run(module, ctx) -> statistics`."""

    name: str = ""
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    @classmethod
    def applies(cls, ctx: PassContext) -> bool:
        return True

    def run(self, module: ir.Module, ctx: PassContext) -> dict[str, int]:
        raise NotImplementedError

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


def run_passes(mlir: str, ctx: PassContext, passes: list[type[Pass]], disabled=(), dump_after=(),
               dump_dir: Path | None = None, log=print) -> tuple[str, list[dict]]:
    """Apply `passes` (minus `disabled`) to module text `mlir`; returns the new text and per-pass stats.
    `dump_after`: pass names (or "all") after which the IR is written to `dump_dir`."""
    names = {p.name for p in passes}
    for name in list(disabled) + [n for n in dump_after if n != "all"]:
        if name not in names:
            raise PassError(f"unknown pass {name!r} (available: {', '.join(sorted(names))})")
    for p in passes:
        missing = [r for r in p.requires if r in disabled]
        if p.name not in disabled and p.applies(ctx) and missing:
            raise PassError(f"pass {p.name} requires {', '.join(missing)}, which is disabled")
    module = parse_module(mlir)
    report = []
    for i, p in enumerate(ordered(passes)):
        entry = {"name": p.name, "enabled": p.name not in disabled and p.applies(ctx)}
        if entry["enabled"]:
            t0 = time.perf_counter()
            with module.context:
                entry["stats"] = p().run(module, ctx)
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
