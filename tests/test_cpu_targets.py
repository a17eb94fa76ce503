"""CPU modules for CPUs other than the host (issue 18): compiled with `--cpu-features NAME` and run here.

CI's host has AVX-512; a CPU with AVX2 only (x86-64-v3, znver3) or only SSE2 (x86-64) makes IREE pick other
vector and data-tiling tile sizes, and IREE 3.13's DispatchCreation data tiling failed on modules g3n
exports (the audio encoder without AVX-512; prefill attention with one query head per KV head on every
CPU): targets/cpu.py says why and what g3n uses instead. A module compiled for an older CPU runs on an
AVX-512 host, so the x86-64-v3 and x86-64 builds are run and held to the host's: the same greedy tokens,
and the encoders' soft tokens within 1e-4 (relative to their largest magnitude).

Default tier: the two dispatches IREE failed on, compiled with g3n's flags for x86-64-v3, x86-64, znver3 and
the host; tiny-random (text, audio and vision) for x86-64-v3; a text model whose sliding layers' prefill
attention spans an odd number of keys (window 6 + chunk 128 = 134) for x86-64-v3. Slow tier: the same for
x86-64, tiny-random compiled for znver3 (Zen 3 code may not run on an Intel host), and text configs with
odd MLP widths and 2 or 4 AltUp streams.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from iree.compiler.tools.binaries import find_tool

from g3n_compile.compile import compile_model
from g3n_compile.model.config import FULL, SLIDING
from reference import _cfg, hf_model, save_checkpoint
from runtime import load
from runtime.abi import Manifest
from targets import cpu

TINY_CONTEXT, TINY_CHUNK = 64, 16
TEXT_CONTEXT, TEXT_CHUNK = 256, 128
NEW_TOKENS = 24
PROMPT = [2, 17, 30, 44, 9, 25, 3, 77, 12, 5, 61, 40, 12, 8, 89, 21, 31, 7, 56, 19, 11]  # ids every vocab here has

# Text configs at prefill chunks of 128: sliding layers' prefill attention spans window + 128 keys.
TEXT_CONFIGS = {
    # window 6: 134 keys; 2 KV heads of 1 query each; 4 AltUp streams
    "window-6": _cfg(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     intermediate_size=(48,) * 6, num_hidden_layers=6,
                     layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), sliding_window=6,
                     altup_num_inputs=4, num_kv_shared_layers=3,
                     activation_sparsity_pattern=(0.95, 0.0, 0.95, 0.0, 0.0, 0.0)),
    # odd MLP widths, window 5 (133 keys), 2 AltUp streams, 2 query heads per KV head
    "odd-widths-2-streams": _cfg(intermediate_size=(21, 37, 19, 45), sliding_window=5, altup_num_inputs=2),
    # odd MLP widths, window 11 (139 keys), 4 AltUp streams, one query head per KV head
    "odd-widths-4-streams": _cfg(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=(24, 41, 17, 33), sliding_window=11, altup_num_inputs=4),
}

slow = pytest.mark.slow


def _compile(model: str, out, arch: str, context: int, chunk: int) -> Manifest:
    return compile_model(model, "cpu", out, max_context=context, chunk=chunk, archs={"cpu": arch},
                         log=lambda *_: None)


def _greedy(folder) -> list[int]:
    llm = load(folder, device="cpu")
    return llm.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids


def soft_tokens(folder, device: str = "cpu") -> dict[str, np.ndarray]:
    """Both encoders' outputs on fixed random inputs (a 30 s clip's worth of features, half of it masked)."""
    model = load(folder, device=device).model
    audio, _ = model.encoder("audio")
    vision, _ = model.encoder("vision")
    rng = np.random.default_rng(18)
    features = rng.standard_normal((1, audio.frames, audio.features.feature_size)).astype(np.float32)
    mask = np.zeros((1, audio.frames), dtype=bool)
    mask[0, : audio.frames // 2] = True
    pixels = rng.random((1, 3, vision.image_size, vision.image_size)).astype(np.float32)
    return {"audio": model.encode("audio", features, mask), "vision": model.encode("vision", pixels)}


def assert_close(got: np.ndarray, want: np.ndarray, what: str):
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{what}: max difference {err:.1e} of max |value|")
    assert err <= 1e-4, f"{what}: {err:.2e} relative"


# ---- the two dispatches IREE 3.13's DispatchCreation data tiling failed on --------------------------

# prefill's attention scores (QK^T, a data-tiled batch matmul) masked by an i1 key mask before the softmax:
# "'linalg.pack' op expected padding_value has 'i8' but got: 'i1'" (on every x86 CPU)
MASKED_SCORES = """
func.func @masked_scores(%q: tensor<2x128x16xf32>, %k: tensor<2x134x16xf32>, %mask: tensor<134xi1>) -> tensor<2x128x134xf32> {
  %zero = arith.constant 0.0 : f32
  %min = arith.constant -3.40282347E+38 : f32
  %empty = tensor.empty() : tensor<2x128x134xf32>
  %init = linalg.fill ins(%zero : f32) outs(%empty : tensor<2x128x134xf32>) -> tensor<2x128x134xf32>
  %s = linalg.batch_matmul indexing_maps = [affine_map<(b, m, n, k) -> (b, m, k)>, affine_map<(b, m, n, k) -> (b, n, k)>,
                                            affine_map<(b, m, n, k) -> (b, m, n)>]
       ins(%q, %k : tensor<2x128x16xf32>, tensor<2x134x16xf32>) outs(%init : tensor<2x128x134xf32>) -> tensor<2x128x134xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(b, m, n) -> (n)>, affine_map<(b, m, n) -> (b, m, n)>,
                                        affine_map<(b, m, n) -> (b, m, n)>], iterator_types = ["parallel", "parallel", "parallel"]}
       ins(%mask, %s : tensor<134xi1>, tensor<2x128x134xf32>) outs(%empty : tensor<2x128x134xf32>) {
  ^bb0(%keep: i1, %score: f32, %out: f32):
    %v = arith.select %keep, %score, %min : f32
    linalg.yield %v : f32
  } -> tensor<2x128x134xf32>
  return %r : tensor<2x128x134xf32>
}
"""

# the audio conformer's residual sum after a 750-row matmul, and its clamp (two results):
# "One or more operations with large vector sizes (16384 bytes)" for AVX2 and SSE2, not for AVX-512
RESIDUAL_AND_CLAMP = """
func.func @residual_and_clamp(%x: tensor<1x750x64xf32>, %w: tensor<1x64x64xf32>, %res: tensor<1x750x64xf32>)
    -> (tensor<1x750x64xf32>, tensor<1x750x64xf32>) {
  %zero = arith.constant 0.0 : f32
  %lo = arith.constant -1.0e10 : f32
  %hi = arith.constant 1.0e10 : f32
  %empty = tensor.empty() : tensor<1x750x64xf32>
  %init = linalg.fill ins(%zero : f32) outs(%empty : tensor<1x750x64xf32>) -> tensor<1x750x64xf32>
  %m = linalg.batch_matmul ins(%x, %w : tensor<1x750x64xf32>, tensor<1x64x64xf32>) outs(%init : tensor<1x750x64xf32>)
       -> tensor<1x750x64xf32>
  %r:2 = linalg.generic {indexing_maps = [affine_map<(a, b, c) -> (a, b, c)>, affine_map<(a, b, c) -> (a, b, c)>,
                                          affine_map<(a, b, c) -> (a, b, c)>, affine_map<(a, b, c) -> (a, b, c)>],
                         iterator_types = ["parallel", "parallel", "parallel"]}
       ins(%m, %res : tensor<1x750x64xf32>, tensor<1x750x64xf32>) outs(%empty, %empty : tensor<1x750x64xf32>, tensor<1x750x64xf32>) {
  ^bb0(%a: f32, %b: f32, %o1: f32, %o2: f32):
    %sum = arith.addf %b, %a : f32
    %c = arith.maximumf %sum, %lo : f32
    %d = arith.minimumf %c, %hi : f32
    linalg.yield %sum, %d : f32, f32
  } -> (tensor<1x750x64xf32>, tensor<1x750x64xf32>)
  return %r#0, %r#1 : tensor<1x750x64xf32>, tensor<1x750x64xf32>
}
"""


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64", "znver3", "host"])
@pytest.mark.parametrize("source", [MASKED_SCORES, RESIDUAL_AND_CLAMP], ids=["masked-scores", "residual-and-clamp"])
def test_g3n_cpu_flags_compile_the_dispatches_issue_18_found(source, arch, tmp_path):
    mlir = tmp_path / "dispatch.mlir"
    mlir.write_text(source)
    command = [find_tool("iree-compile"), *cpu.compile_flags(arch), str(mlir), "-o", str(tmp_path / "m.vmfb")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[:2000]


# ---- tiny-random: text + audio + vision ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_host(tiny_out):
    """The session's tiny-random folder (conftest: host CPU, TINY_CONTEXT, TINY_CHUNK) and what it gives."""
    return tiny_out, _greedy(tiny_out), soft_tokens(tiny_out)


def _tiny_for(arch, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tiny-{arch}")
    manifest = _compile("tiny-random", out, arch, TINY_CONTEXT, TINY_CHUNK)
    target = manifest.targets["cpu"]
    assert target.arch == arch
    assert set(target.encoders) == {"audio", "vision"}, "an encoder did not compile"
    return out


# What a module for each CPU needs of the host (/proc/cpuinfo flags): a module for a CPU the host cannot
# run dies of SIGILL, taking pytest with it. x86-64 (SSE2) runs on every x86-64 host.
NEEDS = {"x86-64": set(), "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}}


def _host_runs(arch: str) -> None:
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    missing = NEEDS[arch] - flags
    assert not missing, f"this host cannot run {arch} code (it lacks {sorted(missing)}): run on one with AVX2"


@pytest.mark.parametrize("arch", ["x86-64-v3", pytest.param("x86-64", marks=slow)])
def test_tiny_random_for_another_cpu_runs_as_the_host_build(arch, tiny_host, tmp_path_factory):
    _host_runs(arch)
    host, host_tokens, host_soft = tiny_host
    out = _tiny_for(arch, tmp_path_factory)
    assert _greedy(out) == host_tokens
    soft = soft_tokens(out)
    for kind in ("audio", "vision"):
        assert_close(soft[kind], host_soft[kind], f"{arch} {kind} soft tokens")


@slow
def test_tiny_random_compiles_for_znver3(tmp_path_factory):
    """The issue's CPU (Zen 3: AVX2, no AVX-512): text and both encoders compile. Not run: its code may use
    AMD-only instructions (SSE4a), which an Intel host lacks."""
    _tiny_for("znver3", tmp_path_factory)


# ---- text configs at 128-token prefill chunks -----------------------------------------------------

@pytest.fixture(scope="module")
def text_checkpoints(tmp_path_factory):
    made = {}

    def make(name):
        if name not in made:
            cfg = TEXT_CONFIGS[name]
            made[name] = save_checkpoint(hf_model(cfg, seed=18), cfg, tmp_path_factory.mktemp(name) / "ckpt")
        return made[name]
    return make


@pytest.fixture(scope="module")
def text_host(text_checkpoints, tmp_path_factory):
    built = {}

    def build(name):
        if name not in built:
            out = tmp_path_factory.mktemp(f"{name}-host")
            _compile(str(text_checkpoints(name)), out, "host", TEXT_CONTEXT, TEXT_CHUNK)
            built[name] = _greedy(out)
        return built[name]
    return build


@pytest.mark.parametrize("name, arch", [
    ("window-6", "x86-64-v3"),
    pytest.param("window-6", "x86-64", marks=slow),
    pytest.param("odd-widths-2-streams", "x86-64-v3", marks=slow),
    pytest.param("odd-widths-4-streams", "x86-64-v3", marks=slow),
    pytest.param("odd-widths-4-streams", "x86-64", marks=slow),
])
def test_text_module_for_another_cpu_generates_as_the_host_build(name, arch, text_checkpoints, text_host,
                                                                  tmp_path_factory):
    _host_runs(arch)
    out = tmp_path_factory.mktemp(f"{name}-{arch}")
    _compile(str(text_checkpoints(name)), out, arch, TEXT_CONTEXT, TEXT_CHUNK)
    assert _greedy(out) == text_host(name)
