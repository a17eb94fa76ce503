"""runtime/image.py vs transformers' Gemma 3n image processor (its Pillow backend) on files of many kinds."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from runtime.image import BILINEAR, ImageError, ImagePreprocessing, pixels

# What Gemma 3n's preprocessor_config.json sets (the rest are the SigLIP processor's defaults).
GEMMA3N_PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 768, "width": 768},
                        "resample": BILINEAR, "do_rescale": True, "rescale_factor": 1 / 255,
                        "do_normalize": False, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                        "do_convert_rgb": True}


def _noise(h, w, channels, seed):
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so that resampling filters differ visibly
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 7.0) + np.cos(yy / 5.0))[..., None] * 60 + 128
    return np.clip(base + rng.normal(0, 40, (h, w, channels)), 0, 255).astype(np.uint8)


def _write_images(folder):
    """Files in the modes and formats people pass: RGB JPEG, RGBA PNG with transparency, greyscale,
    palette with a transparent index, 16-bit greyscale, a JPEG rotated by its EXIF tag, a small image
    (upsampled) and a wide one (squashed)."""
    files = {}
    files["rgb.jpg"] = Image.fromarray(_noise(300, 400, 3, 0))
    rgba = _noise(256, 256, 4, 1)
    rgba[:100, :, 3] = 0  # fully transparent band: must become white
    files["rgba.png"] = Image.fromarray(rgba, "RGBA")
    files["grey.png"] = Image.fromarray(_noise(200, 150, 1, 2)[..., 0], "L")
    palette = Image.fromarray(_noise(120, 160, 3, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    files["palette.png"] = palette
    files["deep.png"] = Image.fromarray(_noise(90, 90, 1, 4)[..., 0].astype(np.uint16) * 257)
    files["small.png"] = Image.fromarray(_noise(17, 23, 3, 5))
    files["wide.webp"] = Image.fromarray(_noise(100, 1000, 3, 6))
    for name, image in files.items():
        image.save(folder / name)
    rotated = Image.fromarray(_noise(240, 320, 3, 7))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rotated.save(folder / "rotated.jpg", exif=exif)
    return sorted(files) + ["rotated.jpg"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return folder, _write_images(folder)


def _transformers(path, config):
    from PIL import ImageOps
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)  # what transformers' load_image does to a file
    return processor(images=upright, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("size", [768, 512, 256])
def test_pixels_match_transformers(images, size):
    folder, names = images
    config = dict(GEMMA3N_PREPROCESSOR, size={"height": size, "width": size})
    spec = replace(ImagePreprocessing.from_hf_dict(GEMMA3N_PREPROCESSOR), height=size, width=size)
    assert spec == ImagePreprocessing(height=size, width=size)  # the defaults are Gemma 3n's
    for name in names:
        ours = pixels(folder / name, spec)
        ref = _transformers(folder / name, config)
        assert ours.shape == ref.shape == (1, 3, size, size) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-6, name
        assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_normalising_config_and_other_filters_match_transformers(images):
    folder, names = images
    config = {"size": {"height": 96, "width": 128}, "resample": 3, "image_mean": [0.4, 0.5, 0.6],
              "image_std": [0.2, 0.3, 0.25]}  # do_normalize by default, as SigLIP does
    spec = ImagePreprocessing.from_hf_dict(config)
    assert spec.mean == (0.4, 0.5, 0.6)
    for name in names:
        ref = _transformers(folder / name, config)
        assert np.abs(pixels(folder / name, spec) - ref).max() <= 1e-6, name


def test_exif_orientation_and_transparency(images):
    folder, _ = images
    upright = pixels(folder / "rotated.jpg", ImagePreprocessing(height=320, width=240))
    assert upright.shape == (1, 3, 320, 240)
    band = pixels(folder / "rgba.png", ImagePreprocessing(height=256, width=256))[0, :, :90]
    assert band.min() == 1.0  # fully transparent pixels read as white


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "text.png").write_text("this is not an image")
    good = tmp_path / "good.png"
    Image.fromarray(_noise(64, 64, 3, 0)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    cases = {tmp_path / "nowhere.jpg": "no such file", tmp_path: "not a file",
             tmp_path / "text.png": "not an image format Pillow can read", tmp_path / "cut.png": "cannot decode"}
    for path, expect in cases.items():
        with pytest.raises(ImageError) as e:
            pixels(path)
        assert expect in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ImageError, match="size"):
        ImagePreprocessing.from_hf_dict({"size": {"shortest_edge": 224}})
