"""User mistakes end in one clear `error:` line and a non-zero exit, never a traceback."""

import dataclasses
import json
import shutil

import pytest

import g3n_compile.compile as driver
from g3n_compile.cli import main as g3n_compile
from g3n_compile.compile import compile_model
from runtime.cli import main as g3n_run
from targets import vulkan


def one_error(capsys, prog) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith(f"{prog}: error:")]
    assert lines, err
    assert not any("Traceback" in line for line in err)
    return lines[0]


def test_compile_missing_folder(tmp_path, capsys):
    assert g3n_compile(["--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) != 0
    assert "no such checkpoint folder" in one_error(capsys, "g3n-compile")


def test_compile_non_checkpoint_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert g3n_compile(["--model", str(tmp_path), "-o", str(tmp_path / "o")]) != 0
    assert "no config.json" in one_error(capsys, "g3n-compile")


def test_compile_truncated_safetensors(tmp_path, capsys):
    from g3n_compile.checkpoint import resolve_checkpoint
    ckpt = shutil.copytree(resolve_checkpoint("tiny-random"), tmp_path / "ckpt")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert g3n_compile(["--model", str(ckpt), "-o", str(tmp_path / "o")]) != 0
    assert "truncated" in one_error(capsys, "g3n-compile")


def test_compile_unknown_target_and_bad_context(tmp_path, capsys):
    assert g3n_compile(["--target", "tpu", "-o", str(tmp_path / "o")]) != 0
    assert "unknown target 'tpu'" in one_error(capsys, "g3n-compile")
    assert g3n_compile(["--max-context", "100000", "-o", str(tmp_path / "o")]) != 0
    assert "max_position_embeddings" in one_error(capsys, "g3n-compile")


def test_run_not_an_output_folder(tmp_path, capsys):
    assert g3n_run([str(tmp_path), "--prompt", "hi"]) != 0
    assert "not a g3n output folder" in one_error(capsys, "g3n-run")


@pytest.mark.parametrize("version", [None, 2])
def test_run_folder_of_another_abi(tiny_out, tmp_path, capsys, version):
    """A folder written before the ABI was versioned (no `abi_version`), or by a newer g3n, says recompile."""
    old = shutil.copytree(tiny_out, tmp_path / "old")
    manifest = json.loads((old / "g3n.json").read_text())
    manifest.pop("abi_version")
    if version is not None:
        manifest["abi_version"] = version
    (old / "g3n.json").write_text(json.dumps(manifest))
    assert g3n_run([str(old), "--prompt", "hi"]) != 0
    assert "recompile the folder with g3n-compile" in one_error(capsys, "g3n-run")


def test_run_vmfb_irpa_mismatch(tiny_out, tmp_path, capsys):
    other = tmp_path / "other"
    compile_model("tiny-random", "cpu", other, max_context=64, chunk=16, log=lambda *_: None)
    mixed = shutil.copytree(tiny_out, tmp_path / "mixed")
    shutil.copyfile(other / "model.irpa", mixed / "model.irpa")
    assert g3n_run([str(mixed), "--prompt", "hi"]) != 0
    assert "does not belong" in one_error(capsys, "g3n-run")
    shutil.copyfile(tiny_out / "model.irpa", mixed / "model.irpa")
    (mixed / "cpu.vmfb").write_bytes((mixed / "cpu.vmfb").read_bytes()[:-10] + b"0123456789")
    assert g3n_run([str(mixed), "--prompt", "hi"]) != 0
    assert "does not match g3n.json" in one_error(capsys, "g3n-run")


def test_run_prompt_longer_than_context(tiny_out, capsys):
    assert g3n_run([str(tiny_out), "--raw", "--prompt", "hello " * 200]) != 0
    assert "context is 64" in one_error(capsys, "g3n-run")


def test_run_input_ids_out_of_vocabulary(tiny_out, capsys):
    assert g3n_run([str(tiny_out), "--input-ids", "2,17,999999"]) != 0
    assert "out of the vocabulary" in one_error(capsys, "g3n-run")


def test_run_stops_cleanly_at_the_context_limit(tiny_out, capsys):
    assert g3n_run([str(tiny_out), "--input-ids", ",".join(["5"] * 60), "--ignore-eos", "--max-new-tokens", "50",
                    "--json"]) == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert result["stop_reason"] == "context" and len(result["input_ids"]) + len(result["output_ids"]) == 65


def test_prompt_and_chat_generate_text(tiny_out, capsys):
    assert g3n_run([str(tiny_out), "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0.8",
                    "--top-k", "20", "--top-p", "0.9", "--seed", "1", "--repetition-penalty", "1.1"]) == 0
    captured = capsys.readouterr()
    assert "prompt tokens" in captured.err and captured.out.strip()


def test_a_target_that_cannot_take_a_tower_stops_before_the_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vulkan, "SUPPORTS", dataclasses.replace(vulkan.SUPPORTS, encoders=("audio",)))
    assert g3n_compile(["--target", "vulkan", "--max-context", "64", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert ("g3n-compile: error: the vulkan target cannot take the checkpoint's vision encoder" in err
            and "--skip-encoder vision" in err and "exporting" not in err), err
    assert not (tmp_path / "o").exists()


def test_an_encoder_that_fails_to_compile_stops_the_compile(tmp_path, monkeypatch, capsys):
    """No module silently without its medium: the failure names the encoder, the target and the way out."""
    real = driver._iree_compile

    def fail_audio(mlir, vmfb, flags):
        if vmfb.name.endswith("-audio.vmfb"):
            raise driver.CompileError("iree-compile failed for cpu-audio.vmfb: error: failed to translate")
        real(mlir, vmfb, flags)

    monkeypatch.setattr(driver, "_iree_compile", fail_audio)
    assert g3n_compile(["--target", "cpu", "--max-context", "64", "--chunk", "16", "-o", str(tmp_path / "o")]) == 1
    line = one_error(capsys, "g3n-compile")
    assert "the audio encoder does not compile for cpu (--cpu-features host)" in line
    assert "error: failed to translate" in line and "pass --skip-encoder audio" in line
    assert not (tmp_path / "o").exists()
