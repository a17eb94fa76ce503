"""g3n-bench end to end on tiny-random: complete, self-consistent JSON and tables (never timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest

from g3n_compile.bench.cli import main
from g3n_compile.bench.roofline import kv_bytes_read
from g3n_compile.bench.report import _kernel, markers
from g3n_compile.model.config import E2B, E4B
from g3n_compile.bench.kernel import measure_kernel, prefill_shapes
from runtime.archive import ArchiveReader
from targets.int4_kernel.build import host_isas

PROMPTS, CONTEXTS, STEPS = [4, 8], [0, 20], 3


def test_kv_bytes_match_the_architecture():
    # At S = 4096, bf16, E2B reads 24 sliding layers' 512 positions and 6 full layers' 4096 (KV-shared layers read
    # their source's cache: every layer counts), 2 KV heads x 256 x k and v = 2048 bytes per position.
    assert kv_bytes_read(E2B, 4096, 2) == 24 * 2048 * 512 + 6 * 2048 * 4096
    assert kv_bytes_read(E4B, 4096, 2) == 28 * 2048 * 512 + 7 * 2048 * 4096
    assert kv_bytes_read(E2B, 0, 4) == 0
    assert kv_bytes_read(E2B, 100, 4) == 30 * 4096 * 100  # below the window every layer reads every position


def test_bench_on_tiny_random(tmp_path):
    doc = tmp_path / "benchmarks.md"
    (begin, end), (other_begin, other_end) = markers("tiny-random"), markers("e2b")
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{begin}\nold tables\n{end}\n\nprose after\n\n"
                   f"{other_begin}\nE2B tables\n{other_end}\n")
    out = tmp_path / "results.json"
    rc = main(["--model", "tiny-random", "--variants", "f32", "--prompts", ",".join(map(str, PROMPTS)),
               "--contexts", ",".join(map(str, CONTEXTS)), "--decode-tokens", str(STEPS), "--chunk", "8",
               "--bandwidth-gib", "0.03125", "--work", str(tmp_path / "work"), "--json", str(out),
               "--markdown", str(doc), "--plot", str(tmp_path / "bench.png")])
    assert rc == 0
    results = json.loads(out.read_text())

    assert results["bandwidth"]["gb_per_s"] > 0 and results["bandwidth"]["method"]
    assert results["settings"]["max_context"] == max(max(PROMPTS) + 1, max(CONTEXTS) + STEPS)
    assert {"g3n", "torch", "iree-base-runtime"} <= set(results["versions"])
    runs = results["runs"]
    assert [(r["engine"], r["variant"]) for r in runs] == [("g3n", "f32"), ("pytorch-eager", "f32"),
                                                            ("transformers", "f32")]
    for r in runs:
        assert "skipped" not in r, r
        assert [p["tokens"] for p in r["prefill"]] == PROMPTS
        assert all(p["ttft_s"] > 0 and p["tokens_per_s"] > 0 for p in r["prefill"])
        assert [d["context"] for d in r["decode"]] == CONTEXTS
        for d in r["decode"]:
            assert d["tokens_per_s"] == pytest.approx(1e3 / d["step_ms_median"])
            assert d["bytes_per_token"] > r["weight_bytes"] or d["context"] == 0
            assert d["roofline_fraction"] == pytest.approx(d["tokens_per_s"] / d["roofline_tokens_per_s"])
            assert d["roofline_tokens_per_s"] == pytest.approx(results["bandwidth"]["gb_per_s"] * 1e9 / d["bytes_per_token"])
        assert r["peak_rss_bytes"] >= r["peak_anon_bytes"] > 0

    g3n = runs[0]
    folder = next((tmp_path / "work").iterdir())
    assert g3n["sizes"] == {"vmfb_bytes": (folder / "cpu.vmfb").stat().st_size,
                            "irpa_bytes": (folder / "model.irpa").stat().st_size}
    # What a decode token reads: the archive minus the PLE table (and the archive id), which eager holds too,
    # and minus the audio/vision encoders and the multimodal token table.
    entries = ArchiveReader(folder / "model.irpa").entries
    assert g3n["weight_bytes"] == sum(n for name, (_, n) in entries.items()
                                      if name not in ("embed_tokens_per_layer.weight", "g3n.archive_id",
                                                      "multimodal_token_embeddings")
                                      and not name.startswith(("audio_tower.", "embed_audio.", "vision_tower.",
                                                               "embed_vision.")))
    assert g3n["compile"]["timings_s"]["total"] > 0 and g3n["compile"]["peak_rss_bytes"] > 0
    assert g3n["compile"]["reused"] is False
    profile = g3n["profile"]
    assert profile["dispatches"] > 0 and profile["step_ms"] > 0
    assert math.isclose(sum(k["share"] for k in profile["by_kind"]), 1.0, rel_tol=1e-6)
    assert sum(k["count"] for k in profile["by_kind"]) == profile["dispatches"]
    assert {"matmul", "mmt4d"} & {k["kind"] for k in profile["by_kind"]}  # plain or data-tiled

    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n") and "\nprose after\n" in text
    assert "old tables" not in text and text.count(begin) == 1 and text.count(end) == 1
    assert text.rstrip().endswith(f"{other_begin}\nE2B tables\n{other_end}")  # another model's section is kept
    tables = [line for line in text.splitlines() if line.startswith("| engine |")]
    assert len(tables) == 3  # decode, prefill, memory/size/compile
    decode_table = text.split("### Decode")[1].split("###")[0]
    assert len([line for line in decode_table.splitlines() if line.startswith("| ") and "engine" not in line]) == 3
    assert "### One decode step of g3n f32" in text

    try:
        import matplotlib  # noqa: F401  (the plot is an optional extra)
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        pass

    # A second run keeps the compiled module and reports the figures measured when it was built.
    rc = main(["--model", "tiny-random", "--variants", "f32", "--prompts", "4", "--contexts", "20", "--decode-tokens",
               str(STEPS), "--chunk", "8", "--bandwidth-gib", "0.03125", "--work", str(tmp_path / "work"),
               "--baselines", "none", "--no-profile", "--json", str(out)])
    again = json.loads(out.read_text())["runs"]
    assert rc == 0 and [r["engine"] for r in again] == ["g3n"]
    assert again[0]["compile"] == {**g3n["compile"], "reused": True}


def test_bench_errors(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert main(["--model", "tiny-random", "--prompts", "4", "--contexts", "0", "--decode-tokens", "2",
                 "--chunk", "64"]) == 1
    assert "--chunk 64 must be between 1 and the module's context (5 =" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--variants", "int8"])
    assert "unknown variant" in capsys.readouterr().err


def test_kernel_bench_shapes_are_the_models_int4_linears():
    # E2B: q 8x256, k/v 2x256 each, LAuReL rank 64, MLP 8192, the last 10 layers KV-shared.
    assert sorted(prefill_shapes(E2B)) == [("mlp.down", 2048, 8192, 30), ("mlp.gate/up", 8192, 2048, 60),
                                           ("o", 2048, 2048, 30), ("q/k/v/laurel-left", 3136, 2048, 20),
                                           ("q/laurel-left (KV-shared layers)", 2112, 2048, 10)]


@pytest.mark.skipif(not host_isas(), reason="no int4 kernel variant for this CPU (x86-64 only)")
def test_kernel_bench_measures_the_linked_kernel():
    from g3n_compile.checkpoint.tiny_random import CONFIG

    k = measure_kernel(CONFIG, chunk=8, threads=1, log=lambda _: None)
    shapes = prefill_shapes(CONFIG)
    assert k["isa"] == host_isas()[0] and [(p["name"], p["n"], p["k"]) for p in k["prefill"]] == [s[:3] for s in shapes]
    assert k["decode"]["gb_per_s"] > 0 and all(p["gop_per_s"] > 0 for p in k["prefill"])
    assert k["prefill_gop_per_token"] == pytest.approx(sum(2 * n * kk * c for _, n, kk, c in shapes) / 1e9)
    seconds = sum(2 * p["n"] * p["k"] * p["calls_per_token"] / (p["gop_per_s"] * 1e9) for p in k["prefill"])
    assert k["prefill_ceiling_tokens_per_s"] == pytest.approx(1 / seconds)
    assert ("peak_gop_per_s" in k) == (k["isa"] == "avx512vnni")
    section = "\n".join(_kernel(k, 10.0, []))
    assert f"{k['prefill_ceiling_tokens_per_s']:.0f} tok/s" in section and "GB/s** of weights" in section
