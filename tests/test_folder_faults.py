"""A damaged or hand-edited compiled folder is one ModelError line when loaded, never a traceback, a crash or
silently wrong output: g3n.json checked against the typed ABI and for consistency, model.irpa's header and
host-read tables, the .vmfb's structure and signatures, and --device names.

Measured on tiny-random's cpu.vmfb (IREE 3.13), its sha256 in g3n.json edited to match each time: of 20 random
bit flips loaded unchecked, 4 crashed the process (SIGSEGV, SIGILL), 1 ran with other logits, 4 were IREE
errors (one a UnicodeDecodeError) and 11 changed nothing; with the module's CRC-32s checked, 100 of 100 are
one "damaged" line. Of 60 flips in the ZIP structure outside the entries' data, 29 are caught and 31 change
nothing IREE reads (identical logits). Not caught: a module rebuilt on purpose, e.g. of the same checkpoint
with another --max-context (same signatures, caches of another size): code whose hash g3n.json records is
trusted.
"""

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import iree.compiler as ic
import iree.runtime as rt
import numpy as np
import pytest

import targets
from runtime import load
from runtime.archive import ArchiveReader
from runtime.device import available
from runtime.module import CompiledModel, ModelError

ROOT = Path(__file__).resolve().parents[1]
PLE = "embed_tokens_per_layer.weight"


@pytest.fixture
def folder(tiny_out, tmp_path):
    return shutil.copytree(tiny_out, tmp_path / "tiny")


def load_error(folder, **kw) -> str:
    """The one-line ModelError that loading `folder` gives."""
    with pytest.raises(ModelError) as e:
        CompiledModel(folder, **kw)
    message = str(e.value)
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


def edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "g3n.json").read_text())
    edit(manifest)
    (folder / "g3n.json").write_text(json.dumps(manifest))


def put(path: str, value):
    """An edit that sets (or, with DROP, removes) the entry at dotted `path` (numbers index lists)."""
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key) if isinstance(node, list) else key]
        last = int(last) if isinstance(node, list) else last
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return edit


DROP = object()
# (edit, what the error names): missing keys, wrong types at each level, inconsistent numbers.
MANIFEST_FAULTS = {
    "missing config": (put("config", DROP), "missing config"),
    "config null": (put("config", None), "config: expected an object"),
    "missing config key": (put("config.vocab_size", DROP), "config: missing vocab_size"),
    "string for a number": (put("config.hidden_size", "128"), "config.hidden_size: expected int, got '128'"),
    "negative number": (put("config.num_key_value_heads", -2), "config.num_key_value_heads: -2 is negative"),
    "zero size": (put("config.head_dim", 0), "config.head_dim: must be positive"),
    "edited max_context": (put("max_context", 128), "kv_cache.layers[2].slots is 64; expected 128"),
    "smaller max_context": (put("max_context", 32), "kv_cache.layers[2].slots is 64; expected 32"),
    "edited prefill_chunk": (put("prefill_chunk", 8), "functions.prefill.args[0] is input_ids int64[1, 16]"),
    "chunk past the context": (put("prefill_chunk", 65), "prefill_chunk is 65; expected 1..max_context"),
    "float for an int": (put("max_context", 64.0), "max_context: expected int, got 64.0"),
    "bool for an int": (put("prefill_chunk", True), "prefill_chunk: expected int, got True"),
    "per_layer_rows shape": (put("per_layer_rows.shape", [512, 95]), "per_layer_rows.shape is (512, 95)"),
    "per_layer_rows rank": (put("per_layer_rows.shape", [512, 96, 1]), "per_layer_rows.shape: expected 2 items"),
    "table dtype": (put("per_layer_rows.dtype", "int8"), "per_layer_rows.dtype is 'int8'"),
    "argument dtype": (put("functions.decode.args.0.dtype", "int32"), "functions.decode.args[0] is input_ids int32"),
    "missing function": (put("functions.decode", DROP), "functions is ['prefill']"),
    "cache layer null": (put("kv_cache.layers.1", None), "kv_cache.layers[1]: expected an object"),
    "cache layer kind": (put("kv_cache.layers.0.kind", "full_attention"), "kv_cache.layers[0].kind"),
    "shared cache source": (put("kv_cache.shared.4", 2), "kv_cache.shared.4 is 2"),
    "null targets": (put("targets", None), "targets: expected an object, got NoneType"),
    "unknown target file": (put("targets.cpu.file", "nothing.vmfb"), "nothing.vmfb: missing"),
    "target file outside": (put("targets.cpu.file", "../cpu.vmfb"), "expected a .vmfb name in the folder"),
    "target hash": (put("targets.cpu.sha256", "abc"), "targets.cpu.sha256: not a sha256 digest"),
    "stop token": (put("stop_token_ids", [1, 9999]), "stop_token_ids[1] is 9999"),
    "null token id": (put("tokenizer.bos_token_id", None), "tokenizer.bos_token_id: expected int, got None"),
    "quantization": (put("quantization", 4), "quantization: expected \"none\""),
    "encoder frames": (put("encoders.audio.frames", 100), "encoders.audio.args[0] is features float32[1, 2997"),
    "encoder swapped": (lambda m: m["encoders"].update(audio=m["encoders"]["vision"]),
                        "encoders.audio: holds the fields of a VisionEncoder"),
    "not finite": (put("encoders.audio.features.mel_floor", float("nan")), "mel_floor: nan is not a finite number"),
    "unknown key": (put("extra", 1), "top level: unknown fields ['extra']"),
    "no parameters": (put("parameters", None), "lists no parameter archive"),
    "abi version as text": (put("abi_version", "1"), "with module ABI '1'"),
    "top level list": (lambda m: m.clear(), "not a g3n module manifest"),
}


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_manifest_fault_is_one_line(folder, fault):
    edit, expected = MANIFEST_FAULTS[fault]
    edit_manifest(folder, edit)
    message = load_error(folder)
    assert expected in message and "g3n-compile" in message, message


@pytest.mark.parametrize("text", ["", "{", "\xff", "[" * 100_000, '{"x": ' + "9" * 5000 + "}"])
def test_manifest_not_json(folder, text):
    (folder / "g3n.json").write_bytes(text.encode("latin-1"))
    message = load_error(folder)
    assert "g3n.json" in message and ("not valid JSON" in message or "not a g3n module manifest" in message), message


def test_edited_max_context_never_runs(folder):
    """The fault that made long prompts return zeros: the module's caches hold 64 positions."""
    edit_manifest(folder, put("max_context", 256))
    with pytest.raises(ModelError, match="max_context"):
        load(folder)


# ---- model.irpa -----------------------------------------------------------------------------------------


def rewrite_archive(folder, change) -> None:
    """model.irpa rewritten with its entries passed through `change` (a dict name -> bytes, edited in place)."""
    reader = ArchiveReader(folder / "model.irpa")
    entries = {name: reader.bytes(name) for name in reader.entries}
    change(entries)
    index = rt.ParameterIndex()
    for name, data in entries.items():
        index.add_buffer(name, np.frombuffer(data, np.uint8) if data else np.zeros(0, np.uint8))
    (folder / "model.irpa").unlink()
    index.create_archive_file(str(folder / "model.irpa"))


ARCHIVE_FAULTS = {
    "empty": (lambda data: b"", "not a complete g3n parameter archive"),
    "header only": (lambda data: data[:64], "not a complete g3n parameter archive"),
    "truncated": (lambda data: data[:len(data) // 2], "file segment out of range"),
    "random bytes": (lambda data: np.random.default_rng(0).bytes(len(data)), "magic"),
    "another kind of file": (lambda data: b"PK\x03\x04" + data[4:], "magic"),
    "entry past the end": (lambda data: data[:16] + (2 ** 40).to_bytes(8, "little") + data[24:],
                           "not a complete g3n parameter archive"),
}


@pytest.mark.parametrize("fault", ARCHIVE_FAULTS)
def test_archive_fault_is_one_line(folder, fault):
    damage, expected = ARCHIVE_FAULTS[fault]
    path = folder / "model.irpa"
    path.write_bytes(damage(path.read_bytes()))
    message = load_error(folder)
    assert "model.irpa" in message and expected in message, message


@pytest.mark.parametrize("change, expected", [
    (lambda e: e.update({PLE: e[PLE][:-4]}), f"entry {PLE} holds 196604 bytes, not the 196608"),
    (lambda e: e.pop(PLE), f"no entry {PLE}"),
    (lambda e: e.update({"multimodal_token_embeddings": b""}), "entry multimodal_token_embeddings holds 0 bytes"),
    (lambda e: e.pop("g3n.archive_id"), "does not belong to cpu.vmfb (archive id missing"),
    (lambda e: e.update({"g3n.archive_id": b"\n\xff"}), "does not belong to cpu.vmfb (archive id unreadable"),
])
def test_archive_entries_are_checked(folder, change, expected):
    rewrite_archive(folder, change)
    message = load_error(folder)
    assert expected in message, message


def test_another_folders_archive(folder, tmp_path):
    other = shutil.copytree(folder, tmp_path / "other")
    rewrite_archive(other, lambda e: e.update({"g3n.archive_id": b"0" * 32}))
    shutil.copyfile(other / "model.irpa", folder / "model.irpa")
    assert "does not belong to cpu.vmfb (archive id 00000000" in load_error(folder)


# ---- the .vmfb --------------------------------------------------------------------------------------------


def swap_module(folder, data: bytes, name: str = "cpu.vmfb") -> None:
    """`name` replaced by `data`, its sha256 in g3n.json edited to match (the hash check is passed)."""
    (folder / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(folder, put("targets.cpu.sha256" if name == "cpu.vmfb"
                              else f"targets.cpu.encoders.{name[4:-5]}.sha256", digest))


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def part(data: bytes, suffix: str) -> range:
    """Where the .vmfb's ZIP entry whose name ends with `suffix` keeps its bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entry = next(e for e in z.infolist() if e.filename.endswith(suffix))
    name, extra = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name + extra
    return range(start, start + entry.file_size)


@pytest.mark.parametrize("damage, expected", [
    (lambda data: b"", "not a complete IREE module"),
    (lambda data: data[:100], "not a complete IREE module"),
    (lambda data: data[:-1000], "not a complete IREE module"),
    (lambda data: np.random.default_rng(1).bytes(len(data)), "not a complete IREE module"),
    (lambda data: b"\0" * 64 + data, "not a valid IREE module"),  # ZIP allows this; IREE reads from byte 0
    (lambda data: flipped(data, part(data, ".so")[1000]), "damaged (its part cpu_"),  # the CPU executable
    (lambda data: flipped(data, part(data, "module.fb")[5000]), "damaged (its part module.fb"),  # the bytecode
])
def test_damaged_module_is_one_line(folder, damage, expected):
    data = (folder / "cpu.vmfb").read_bytes()
    swap_module(folder, damage(data))
    message = load_error(folder)
    assert "cpu.vmfb" in message and expected in message, message


def test_flipped_executable_does_not_crash(folder):
    """Flips in the executable, which unchecked crashed the process or changed the logits (module doc). In a
    child process, so that a regression fails this test instead of ending the run."""
    data = (folder / "cpu.vmfb").read_bytes()
    executable = part(data, ".so")
    cases = []
    for i in range(8):
        case = shutil.copytree(folder, folder.parent / f"flip{i}")
        swap_module(case, flipped(data, executable[i * len(executable) // 8]))
        cases.append(str(case))
    script = textwrap.dedent("""
        import sys
        from runtime.module import CompiledModel, ModelError
        for case in sys.argv[1:]:
            try:
                CompiledModel(case).decode(3, 0)
                print("ran")
            except ModelError as e:
                print(e)
    """)
    run = subprocess.run([sys.executable, "-c", script, *cases], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == len(cases) and all("damaged (its part cpu_" in line for line in lines), lines


def test_encoder_module_of_the_text_is_one_line(folder):
    """The audio encoder's file holds the text module: no function `audio`."""
    swap_module(folder, (folder / "cpu.vmfb").read_bytes(), "cpu-audio.vmfb")
    model = CompiledModel(folder)
    with pytest.raises(ModelError, match="cpu-audio.vmfb: has no function audio"):
        model.encoder("audio")


def test_text_module_of_an_encoder_is_one_line(folder):
    swap_module(folder, (folder / "cpu-audio.vmfb").read_bytes())
    assert "cpu.vmfb: has no function prefill, decode (it has audio)" in load_error(folder)


SMALL = """
func.func @prefill(%ids: tensor<1x8xi64>, %rows: tensor<1x8x96xf32>, %start: tensor<1xi64>, %len: tensor<1xi64>,
                   %e: tensor<1x8x128xf32>, %m: tensor<1x8xi1>) -> tensor<1x8x96xf32> {
  %r = arith.mulf %rows, %rows : tensor<1x8x96xf32>
  return %r : tensor<1x8x96xf32>
}
func.func @decode(%ids: tensor<1x1xi64>, %rows: tensor<1x1x96xf32>, %start: tensor<1xi64>) -> tensor<1x1x96xf32> {
  %r = arith.mulf %rows, %rows : tensor<1x1x96xf32>
  return %r : tensor<1x1x96xf32>
}
"""


def small_module(target: str, tmp_path) -> bytes:
    """A module of another build: `prefill` takes chunks of 8, `decode` returns no logits."""
    module = targets.TARGETS[target]
    path = tmp_path / f"small-{target}.vmfb"
    ic.compile_str(SMALL, output_file=str(path), extra_args=module.compile_flags(module.DEFAULT_ARCH))
    return path.read_bytes()


def test_module_of_another_build_is_one_line(folder, tmp_path):
    swap_module(folder, small_module("cpu", tmp_path))
    model = CompiledModel(folder)  # the same function names: only a call can tell
    with pytest.raises(ModelError, match=r"its prefill does not take the inputs g3n.json describes \(.*expected 8 but have 16"):
        model.prefill([2, 3], 0)
    with pytest.raises(ModelError, match=r"its decode returns shapes \[\(1, 1, 96\)\], not the \[\(1, 1, 528\)\]"):
        model.decode(2, 0)


def test_module_of_another_target_is_one_line(folder, tmp_path):
    """A Vulkan module named as the folder's CPU module."""
    swap_module(folder, small_module("vulkan", tmp_path))
    assert "cpu.vmfb: compiled for IREE's vulkan devices, which the cpu device is not" in load_error(folder)


def test_cpu_module_named_as_vulkan_is_one_line(folder):
    """The folder's CPU module listed as its Vulkan one: on this machine's Vulkan device (if any) IREE refuses
    it, on the CPU the folder has no module; one line either way."""
    edit_manifest(folder, lambda m: m.update(targets={"vulkan": {**m["targets"]["cpu"], "driver": "vulkan"}}))
    assert "no module for cpu devices" in load_error(folder, device="cpu")
    load_error(folder)


# ---- --device ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, expected", [
    ("nonsense", "device 'nonsense': expected cpu, vulkan or cuda"),
    ("vulkan:one", "device 'vulkan:one': expected cpu, vulkan or cuda"),
    ("vulkan:7", "no vulkan device 7 here"),
    ("cpu:3", "no cpu device 3 here (1 found)"),
    ("cuda", "no cuda device here: IREE's cuda driver is unavailable"),
])
def test_device_faults_name_what_is_here(folder, device, expected):
    """The folder claims modules for every kind of device, so that each name reaches the device check."""
    if device == "cuda" and "cuda" in available():
        pytest.skip("this machine has a CUDA device")
    edit_manifest(folder, lambda m: m["targets"].update(
        {kind: {**m["targets"]["cpu"], "driver": kind} for kind in ("vulkan", "cuda")}))
    message = load_error(folder, device=device)
    assert expected in message and f"devices here: {', '.join(available())}" in message, message


def test_device_without_a_module_names_what_is_here(folder):
    message = load_error(folder, device="cuda")
    assert "no module for cuda devices (compiled: cpu (local-task); devices here: cpu" in message, message
