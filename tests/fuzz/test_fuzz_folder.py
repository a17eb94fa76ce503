"""Fuzz loading a compiled folder: seeded byte mutations of g3n.json, structured ones (an entry at any depth
dropped, retyped or nudged by one), and mutations of model.irpa around its header. Each case loads the folder
with `runtime.load` and generates two tokens, or is one line of ModelError/ManifestError, within the harness's
bounds; the mutated file is restored after each case, and no file of the folder changes."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest

from fuzz.harness import count, fuzz, mutate
from g3n_compile.compile import compile_model
from runtime import load
from runtime.abi import ManifestError
from runtime.archive import ArchiveReader
from runtime.module import ModelError

pytestmark = pytest.mark.fuzz
ERRORS = (ModelError, ManifestError)
# What a structured mutation puts in place of an entry: wrong types, zero, negative, huge, non-finite.
REPLACEMENTS = ("text", "none", True, None, [], {}, [1, 2], 0, -1, 2 ** 31, 2 ** 63, 1e308, float("nan"), 0.5)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-folder") / "tiny"
    compile_model("tiny-random", "cpu", out, max_context=64, chunk=16, log=lambda *_: None)
    return out


@pytest.fixture
def folder(compiled, tmp_path):
    return shutil.copytree(compiled, tmp_path / "tiny")


def run(name: str, folder, file: str, cases: int, mutation) -> object:
    """`cases` cases: `folder`'s `file` holds `mutation(its bytes, a seeded Random)` (made in the case, so that
    only one mutated archive is in memory) while the folder loads and runs."""
    good = (folder / file).read_bytes()

    def case(i: int):
        def call():
            (folder / file).write_bytes(mutation(good, random.Random(f"{name} {i}")))
            try:
                load(folder).generate([2, 3], max_new_tokens=2)
            finally:
                (folder / file).write_bytes(good)
        return call

    report = fuzz(name, [(f"{name} #{i}", case(i)) for i in range(count(cases))], ERRORS,
                  unchanged=[p for p in folder.iterdir() if p.is_file()])
    report.check()
    return report


def entries(node, at=()):
    """Every key/index path into a JSON document."""
    yield at
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from entries(child, at + (key,))


def structured(doc, rng: random.Random) -> bytes:
    """`doc` with one entry, at any depth, dropped, replaced by a REPLACEMENTS value, or (a number) nudged by one."""
    doc = copy.deepcopy(doc)
    at = rng.choice([p for p in entries(doc) if p])
    parent = doc
    for key in at[:-1]:
        parent = parent[key]
    value = parent[at[-1]]
    roll = rng.random()
    if roll < 0.25:
        del parent[at[-1]]
    elif roll < 0.5 and type(value) in (int, float):
        parent[at[-1]] = value + rng.choice((-1, 1))
    else:
        parent[at[-1]] = rng.choice(REPLACEMENTS)
    return json.dumps(doc).encode()


def test_fuzz_manifest_bytes(folder):
    run("g3n.json bytes", folder, "g3n.json", 300, mutate)


def test_fuzz_manifest_structure(folder):
    report = run("g3n.json structure", folder, "g3n.json", 300, lambda good, rng: structured(json.loads(good), rng))
    assert report.clean_errors > report.cases // 2  # most entries matter: the mutations reach the checks


def test_fuzz_archive_header(folder):
    """The header, entry table and names (before the first tensor's bytes) are hit most."""
    header = min(offset for offset, _ in ArchiveReader(folder / "model.irpa").entries.values())
    run("model.irpa header", folder, "model.irpa", 100, lambda good, rng: mutate(good, rng, hot=header))
