"""Fuzz loading a compiled folder: seeded byte mutations of g3n.json, structured ones (an entry at any depth
dropped, retyped or nudged by one), and mutations of model.irpa around its header. Each case loads the folder
with `runtime.load` and generates two tokens, or is one line of ModelError/ManifestError, within the harness's
bounds; the mutated file is restored after each case, and no file of the folder changes."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from fuzz.harness import count, fuzz, mutate, mutate_json
from runtime import load
from runtime.abi import ManifestError
from runtime.archive import ArchiveReader
from runtime.module import ModelError

pytestmark = pytest.mark.fuzz
ERRORS = (ModelError, ManifestError)


@pytest.fixture
def folder(tiny_out, tmp_path):
    return shutil.copytree(tiny_out, tmp_path / "tiny")


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






def test_fuzz_manifest_bytes(folder):
    run("g3n.json bytes", folder, "g3n.json", 300, mutate)


def test_fuzz_manifest_structure(folder):
    report = run("g3n.json structure", folder, "g3n.json", 300, lambda good, rng: mutate_json(json.loads(good), rng))
    assert report.clean_errors > report.cases // 2  # most entries matter: the mutations reach the checks


def test_fuzz_archive_header(folder):
    """The header, entry table and names (before the first tensor's bytes) are hit most."""
    header = min(offset for offset, _ in ArchiveReader(folder / "model.irpa").entries.values())
    run("model.irpa header", folder, "model.irpa", 100, lambda good, rng: mutate(good, rng, hot=header))
