"""Image files -> the vision module's pixels: decode with Pillow, upright, RGB, resize, rescale.

The steps and their numbers are those of transformers' Gemma 3n image processor (`SiglipImageProcessor`
with the settings of the checkpoints' `preprocessor_config.json`: 768 x 768, bilinear resampling, x 1/255,
no normalisation), run on the same Pillow operations, so the pixels are the processor's to float32
rounding:
  * EXIF orientation applied (as transformers' `load_image`);
  * transparency composited onto white, then RGB (as the processor's `convert_to_rgb`);
  * resized to exactly height x width (no aspect-ratio keeping, no crop: one image = one tile);
  * uint8 -> x * rescale_factor in float64 -> float32; (x - mean) / std only if the config normalises.
A file's size is checked from its header before it is decoded (at most 8192 x 8192 pixels), and a file
that cannot be read or decoded is one ImageError line. numpy and Pillow only: no torch at run time.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, one_line

BILINEAR, BICUBIC = 2, 3  # Pillow's resampling filter numbers, as preprocessor_config.json writes them
# The largest image decoded (8192 x 8192), checked from the header: a 24-bit one takes 200 MB, and its
# upright RGB copies as much again. Below Pillow's own warning size, so Pillow never warns about an image
# accepted here.
MAX_PIXELS = 8192 * 8192


class ImageError(UserError, ValueError):
    """An image file that cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """How pixels are made; the defaults are Gemma 3n's."""

    height: int = 768
    width: int = 768
    resample: int = BILINEAR
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] | None = None  # normalise (x - mean) / std when set
    std: tuple[float, float, float] | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ImagePreprocessing":
        """From a `preprocessor_config.json`; keys it lacks take the SigLIP processor's class defaults."""
        size = d.get("size") or {"height": 224, "width": 224}
        if not isinstance(size, dict) or not {"height", "width"} <= size.keys():
            raise ImageError(f"preprocessor_config.json: size: expected {{'height': H, 'width': W}}, got {size!r}")
        normalise = d.get("do_normalize", True)
        return cls(height=size["height"], width=size["width"], resample=d.get("resample", BICUBIC),
                   rescale_factor=d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0,
                   mean=tuple(d.get("image_mean", (0.5,) * 3)) if normalise else None,
                   std=tuple(d.get("image_std", (0.5,) * 3)) if normalise else None)


def load_image(path: str | Path):
    """The decoded, upright, RGB Pillow image of a file. Its header's size is checked before anything is
    decoded: at most `MAX_PIXELS`."""
    path = Path(path)
    try:
        f = _File(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: not a file (a directory)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with f, warnings.catch_warnings():
            # Pillow warns (and above twice its limit refuses) by itself on huge sizes: one error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:  # g3n's bound, reported as Pillow's own refusal is
                    raise Image.DecompressionBombError(f"{width} x {height} pixels")
                image = ImageOps.exif_transpose(image)
                image.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(one_line(f"{path}: too large to decode safely ({e}); g3n decodes at most {MAX_PIXELS:,} "
                                  "pixels (8192 x 8192): downscale it first")) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(one_line(f"{path}: cannot decode the image ({e})")) from None
    return to_rgb(image)


class _File(io.BufferedReader):
    """A file whose reads never ask for more than it holds: Pillow reads as many bytes as a chunk header
    says (a PNG's IDAT length, say), and a buffered read allocates all it is asked for before reading."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self.size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self.size - self.tell()))
        return super().read(size)


def to_rgb(image):
    """RGB, with any transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def pixels(image, spec: ImagePreprocessing = ImagePreprocessing()) -> np.ndarray:
    """A Pillow image (or an image file) -> float32 [1, 3, height, width]."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    elif isinstance(image, Image.Image):
        image = to_rgb(image)
    else:
        raise ImageError(f"an image is a file path or a Pillow image, not {type(image).__name__}")
    resized = image.resize((spec.width, spec.height), resample=spec.resample)
    x = (np.asarray(resized, dtype=np.uint8).astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.mean is not None:
        x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
