"""A compile changes its output folder only when it has wholly succeeded: a mistyped option, a failed or
interrupted compile leave the folder byte for byte as it was, and a process that has the folder loaded
keeps running while it is recompiled (the files are replaced, never rewritten in place)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import g3n_compile.compile as driver
from g3n_compile.cli import main as g3n_compile
from g3n_compile.compile import CompileError, compile_model
from reference import CONFIGS, hf_model, save_checkpoint

CONFIG = "window-5"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A text-only checkpoint and a folder compiled from it (max context 64)."""
    tmp = tmp_path_factory.mktemp("atomic")
    cfg = CONFIGS[CONFIG]
    ckpt = save_checkpoint(hf_model(cfg, seed=3), cfg, tmp / "ckpt")
    out = tmp / "out"
    compile_model(str(ckpt), "cpu", out, max_context=64, chunk=16, log=lambda *_: None)
    return ckpt, out


def snapshot(folder):
    """Every file's name, inode, mode and bytes: what must not change."""
    return {p.name: (p.stat().st_ino, p.stat().st_mode, p.read_bytes()) for p in sorted(folder.iterdir())}


def leftovers(folder):
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.partial-")]


def test_typo_in_the_cpu_name_is_caught_before_any_work(built, capsys):
    ckpt, out = built
    before = snapshot(out)
    assert g3n_compile(["--model", str(ckpt), "--target", "cpu", "--cpu-features", "znver44", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "g3n-compile: error: --cpu-features 'znver44' is not a known cpu architecture (did you mean znver4" in err
    assert "exporting" not in err and "reading" not in err and "Traceback" not in err
    assert snapshot(out) == before and not leftovers(out)


@pytest.mark.parametrize("option", [["--disable-pass", "altup-fuson"], ["--dump-ir-after", "lauerl", "/tmp/x"]])
def test_unknown_pass_names_are_caught_before_the_export(built, option, capsys):
    ckpt, out = built
    assert g3n_compile(["--model", str(ckpt), "-o", str(out), *option]) == 1
    err = capsys.readouterr().err
    assert f"g3n-compile: error: unknown pass {option[1]!r}" in err
    assert "reading" not in err and "Traceback" not in err


@pytest.mark.parametrize("fault", [CompileError("iree-compile failed for cpu.vmfb: boom"),
                                   pytest.param(KeyboardInterrupt(), marks=pytest.mark.slow)])
def test_a_failed_or_interrupted_compile_leaves_the_folder_as_it_was(built, fault, monkeypatch):
    """Another build (max context 32: a new archive is written) that fails at its last step."""
    ckpt, out = built
    before = snapshot(out)

    def fail(*_):
        raise fault

    monkeypatch.setattr(driver, "_iree_compile", fail)
    with pytest.raises(type(fault)):
        compile_model(str(ckpt), "cpu", out, max_context=32, chunk=16, log=lambda *_: None)
    assert snapshot(out) == before and not leftovers(out)


READER = textwrap.dedent("""
    import json, sys
    from runtime import load
    llm = load(sys.argv[1])
    first = llm.generate([2, 5, 7, 9], max_new_tokens=12, ignore_eos=True).output_ids
    print("loaded", flush=True)
    sys.stdin.readline()  # the folder is recompiled meanwhile
    again = llm.generate([2, 5, 7, 9], max_new_tokens=12, ignore_eos=True).output_ids
    print(json.dumps([first, again]), flush=True)
""")


def test_a_loaded_folder_keeps_running_while_it_is_recompiled(built, tmp_path):
    ckpt, original = built
    out = shutil.copytree(original, tmp_path / "out")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(driver.__file__) + "/..")
    try:
        assert reader.stdout.readline().strip() == "loaded", reader.stderr.read()
        old_id = json.loads((out / "g3n.json").read_text())["parameters"]["archive_id"]
        compile_model(str(ckpt), "cpu", out, max_context=48, chunk=16, log=lambda *_: None)  # another build
        assert json.loads((out / "g3n.json").read_text())["parameters"]["archive_id"] != old_id
        stdout, stderr = reader.communicate("go\n", timeout=300)
    finally:
        reader.kill()
    assert reader.returncode == 0, stderr
    first, again = json.loads(stdout)
    assert first == again and len(first) == 12
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the archive is written like every other file


def test_output_paths_that_cannot_be_a_folder(built, tmp_path, capsys):
    ckpt, _ = built
    a_file = tmp_path / "a-file"
    a_file.write_text("precious")
    for out, expect in [(a_file, "is a file, not a folder"), (a_file / "sub", "is a file, so no folder can be made"),
                        ("/proc/g3n-out", "cannot")]:
        assert g3n_compile(["--model", str(ckpt), "--max-context", "64", "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert expect in err and "exporting" not in err and "Traceback" not in err, err
    assert a_file.read_text() == "precious"
