"""The vision path exports (torch.export, strict=False), compiles for llvm-cpu with its weights as external
parameters, and the compiled module matches eager PyTorch."""

import iree.compiler as ic
import iree.runtime as rt
import numpy as np
import pytest
import torch

from g3n_compile.archive import write_archive
from g3n_compile.export.encoders import export_encoder
from g3n_compile.export.program import PARAM_SCOPE
from g3n_compile.model.vision_config import TINY_IMAGE_SIZE
from reference import CONFIGS
from runtime.image import ImagePreprocessing
from targets import cpu
from vision_reference import random_model, tiny_config


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision-export")
    model = random_model(tiny_config(CONFIGS["hf-test"].hidden_size), seed=6)
    exported = export_encoder("vision", model, ImagePreprocessing(height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE))
    params = dict(model.named_parameters())
    write_archive(tmp / "model.irpa", exported.parameters, lambda n: params[n], log=lambda *_: None)
    (tmp / "vision.mlir").write_text(exported.mlir)
    ic.compile_file(str(tmp / "vision.mlir"), output_file=str(tmp / "vision.vmfb"), input_type="torch",
                    extra_args=cpu.compile_flags())
    config = rt.Config(cpu.DRIVER)
    index = rt.ParameterIndex()
    index.load(str(tmp / "model.irpa"))
    modules = [rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope=PARAM_SCOPE)),
               rt.create_hal_module(config.vm_instance, config.device),
               rt.VmModule.mmap(config.vm_instance, str(tmp / "vision.vmfb"))]
    context = rt.VmContext(config.vm_instance, modules=modules)
    encode = rt.FunctionInvoker(context, config.device, modules[-1].lookup_function(exported.abi.function))
    return model, exported, encode


def test_every_weight_the_image_path_uses_is_an_external_parameter(compiled):
    model, exported, _ = compiled
    # The hard-token table and its norm are not on the image path.
    unused = {"embed_vision.embedding.weight", "embed_vision.hard_embedding_norm.weight"}
    assert set(exported.parameters) == {n for n, _ in model.named_parameters()} - unused
    assert "dense_resource" not in exported.mlir


def test_compiled_matches_eager(compiled):
    model, exported, encode = compiled
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        pixels = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=gen)
        got = np.array(encode(pixels.numpy()).to_host())
        with torch.no_grad():
            ref = model(pixels).numpy()
        assert got.shape == ref.shape == (1, exported.abi.soft_tokens, CONFIGS["hf-test"].hidden_size)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
