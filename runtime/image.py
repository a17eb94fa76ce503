"""Image files -> the vision module's pixels: decode with Pillow, upright, RGB, resize, rescale.

The steps and their numbers are those of transformers' Gemma 3n image processor (`SiglipImageProcessor`
with the settings of the checkpoints' `preprocessor_config.json`: 768 x 768, bilinear resampling, x 1/255,
no normalisation), run on the same Pillow operations, so the pixels are the processor's to float32
rounding:
  * EXIF orientation applied (as transformers' `load_image`);
  * transparency composited onto white, then RGB (as the processor's `convert_to_rgb`);
  * resized to exactly height x width (no aspect-ratio keeping, no crop: one image = one tile);
  * uint8 -> x * rescale_factor in float64 -> float32; (x - mean) / std only if the config normalises.
numpy and Pillow only: no torch at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

BILINEAR, BICUBIC = 2, 3  # Pillow's resampling filter numbers, as preprocessor_config.json writes them


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
    """The decoded, upright, RGB Pillow image of a file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: cannot decode the image ({e})") from None
    return to_rgb(image)


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
    else:
        image = to_rgb(image)
    resized = image.resize((spec.width, spec.height), resample=spec.resample)
    x = (np.asarray(resized, dtype=np.uint8).astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.mean is not None:
        x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
