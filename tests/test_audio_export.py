"""The audio tower + embedder through torch.export, IREE's FX importer (weights as external parameters)
and iree-compile for llvm-cpu, against eager and transformers; fed by the runtime's own features."""

import numpy as np
import pytest
import torch

from audio_reference import CONFIGS, hf_audio, hf_soft_tokens, save_multimodal_checkpoint
from g3n_compile.archive import write_archive
from g3n_compile.export.program import EntryPoint, example_args, export_module, trace
from loaders import load_audio_model
from runtime.abi import audio_function
from runtime.audio import log_mel, pad_to_frames

FRAMES = 400  # 4 s: 25 conformer steps, 3 attention chunks, 7 soft tokens before padding
CFG = CONFIGS["tiny-random"]
FUNCTION = audio_function(FRAMES, CFG.input_feat_size, CFG.soft_tokens, CFG.text_hidden_size)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio-export")
    encoder, embedder = hf_audio(CFG, seed=11)
    model = load_audio_model(save_multimodal_checkpoint(CFG, encoder, embedder, tmp / "ckpt"))
    entry = EntryPoint(FUNCTION.name, model, example_args(FUNCTION))
    return encoder, embedder, model, entry, trace(entry), tmp


def clips():
    """Runtime features of a full 4 s clip and a 1.3 s one, as the encoder module takes them."""
    rng = np.random.default_rng(0)
    t = np.arange(64_000) / 16_000
    speechy = (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    for samples in (speechy[:63_900], speechy[:20_800]):
        features, mask = log_mel(samples)
        assert len(features) <= FRAMES
        yield features, mask, pad_to_frames(features, mask, FRAMES)


def test_exported_program_matches_eager(built):
    encoder, embedder, model, _, program, tmp = built
    program = program.module()
    for _, _, (features, mask) in clips():
        x, m = torch.from_numpy(features), torch.from_numpy(mask)
        with torch.no_grad():
            assert (program(x, m) - model(x, m)).abs().max().item() <= 1e-5


def test_compiled_cpu_module_matches_transformers(built):
    import iree.compiler as ic
    import iree.runtime as rt

    from targets.cpu import compile_flags

    encoder, embedder, model, entry, _, tmp = built
    exported = export_module([entry])
    assert "#stream.parameter.named" in exported.mlir
    params = dict(model.named_parameters())
    assert set(exported.parameters) == set(params)  # every weight comes from the archive
    write_archive(tmp / "model.irpa", exported.parameters, lambda n: params[n], log=lambda *_: None)
    vmfb = tmp / "audio.vmfb"
    ic.compile_str(exported.mlir, output_file=str(vmfb), input_type="torch", extra_args=compile_flags())
    assert vmfb.stat().st_size < 1_000_000  # code only

    config = rt.Config("local-task")
    index = rt.ParameterIndex()
    index.load(str(tmp / "model.irpa"))
    modules = [rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")),
               rt.create_hal_module(config.vm_instance, config.device), rt.VmModule.mmap(config.vm_instance, str(vmfb))]
    audio = rt.FunctionInvoker(rt.VmContext(config.vm_instance, modules=modules), config.device,
                               modules[-1].lookup_function(FUNCTION.name))
    for features, mask, (x, m) in clips():
        out = np.array(audio(x, m).to_host())
        with torch.no_grad():
            ref = hf_soft_tokens(CFG, encoder, embedder, torch.from_numpy(features)[None],
                                 torch.from_numpy(mask)[None]).numpy()
        assert out.shape == ref.shape == (1, CFG.soft_tokens, CFG.text_hidden_size)
        err = np.abs(out - ref).max()
        assert err <= 1e-4, f"compiled audio module differs from transformers by {err}"
