"""Fuzz the checkpoint preflight (`Checkpoint` + `check_checkpoint`): seeded mutations of a safetensors header,
of config.json (bytes, and structured: keys dropped, wrong types, huge, negative and non-finite numbers) and of
the shard index. Each case is accepted or one line of CheckpointError/SafetensorsError/ConfigError, within the
harness's time and memory bounds, and no checkpoint file changes."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch

from fuzz.harness import count, fuzz, mutate, mutate_json
from g3n_compile.checkpoint import Checkpoint, CheckpointError, resolve_checkpoint
from g3n_compile.checkpoint.preflight import check_checkpoint
from g3n_compile.checkpoint.safetensors import SafetensorsError, SafetensorsFile, write_safetensors
from g3n_compile.model.config import ConfigError

pytestmark = pytest.mark.fuzz
ERRORS = (CheckpointError, SafetensorsError, ConfigError)
INDEX = "model.safetensors.index.json"


@pytest.fixture
def tiny(tmp_path):
    return shutil.copytree(resolve_checkpoint("tiny-random"), tmp_path / "tiny")


def check_with(folder, name: str, data: bytes):
    """A case: `folder`'s file `name` holds `data`; the preflight must leave it so."""
    def call():
        (folder / name).write_bytes(data)
        try:
            check_checkpoint(Checkpoint(folder))
        finally:
            assert (folder / name).read_bytes() == data, f"{name} was changed by the check"
    return call


def others(folder, name: str):
    return [p for p in folder.iterdir() if p.is_file() and p.name != name]






def test_fuzz_safetensors_header(tmp_path):
    specs = {f"t{i}": (dtype, shape) for i, (dtype, shape) in enumerate(
        [(torch.float32, (4, 3)), (torch.bfloat16, (5,)), (torch.float16, (2, 2, 2)), (torch.int8, (7,)),
         (torch.float32, ()), (torch.float32, (0, 4)), (torch.bool, (3,)), (torch.int64, (2,))] * 2)}
    good = tmp_path / "good.safetensors"
    write_safetensors(good, specs, lambda n: torch.zeros(specs[n][1], dtype=specs[n][0]), metadata={"format": "pt"})
    valid = good.read_bytes()
    hot = 8 + int.from_bytes(valid[:8], "little")
    rng = random.Random(0)

    def case(data: bytes):
        path = tmp_path / "case.safetensors"

        def call():
            path.write_bytes(data)
            try:
                SafetensorsFile(path).close()
            finally:
                assert path.read_bytes() == data, "the file was changed by the reader"
        return call

    report = fuzz("safetensors header", [(f"case {i}", case(mutate(valid, rng, hot=hot))) for i in range(count(400))],
                  errors=ERRORS, unchanged=[good])
    report.check()
    assert report.clean_errors > report.cases // 2


def test_fuzz_config_bytes(tiny):
    valid = (tiny / "config.json").read_bytes()
    rng = random.Random(1)
    cases = [(f"case {i}", check_with(tiny, "config.json", mutate(valid, rng))) for i in range(count(200))]
    report = fuzz("config.json bytes", cases, errors=ERRORS, unchanged=others(tiny, "config.json"))
    report.check()


def test_fuzz_config_structured(tiny):
    doc = json.loads((tiny / "config.json").read_text())
    rng = random.Random(2)
    cases = [(f"case {i}", check_with(tiny, "config.json", mutate_json(doc, rng))) for i in range(count(150))]
    report = fuzz("config.json structured", cases, errors=ERRORS, unchanged=others(tiny, "config.json"))
    report.check()
    assert report.accepted and report.clean_errors


def test_fuzz_shard_index(tiny):
    valid = (tiny / INDEX).read_bytes()
    doc = json.loads(valid)
    files = sorted(set(doc["weight_map"].values()))
    rng = random.Random(3)

    def redirect() -> bytes:
        """One tensor (or all of one shard's) sent elsewhere: the other shard, a missing file, outside the folder."""
        d = copy.deepcopy(doc)
        target = rng.choice([*files, "missing.safetensors", "../" + files[0], f"/{files[0]}", "", ".", "sub/x"])
        names = [rng.choice(sorted(d["weight_map"]))] if rng.random() < 0.5 else \
            [n for n, f in d["weight_map"].items() if f == rng.choice(files)]
        d["weight_map"].update({n: target for n in names})
        return json.dumps(d).encode()

    cases = [mutate(valid, rng) for _ in range(count(100))] + [mutate_json(doc, rng) for _ in range(count(50))] \
        + [redirect() for _ in range(count(50))]
    report = fuzz("shard index", [(f"case {i}", check_with(tiny, INDEX, data)) for i, data in enumerate(cases)],
                  errors=ERRORS, unchanged=others(tiny, INDEX))
    report.check()
