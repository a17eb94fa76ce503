"""Fuzz the runtime's media readers: seeded mutations of a valid WAV, PNG and JPEG, each read the way a
prompt reads it (a WAV into log-mel features, an image into the vision encoder's pixels). Every case is
accepted or one line of AudioError / ImageError, within the harness's time and memory bounds, and the
files are left as they were."""

import io
import random
import wave
import zlib

import numpy as np
import pytest
from PIL import Image

from fuzz.harness import count, fuzz, mutate
from runtime.audio import AudioError, features_from_file
from runtime.image import ImageError, ImagePreprocessing, pixels

pytestmark = pytest.mark.fuzz


def run(tmp_path, name, valid: bytes, suffix: str, read, error, n: int, hot: int, seed: int = 0,
        fix=lambda data: data, **bounds):
    """`n` mutations of `valid` (the first `hot` bytes, its header, hit most), each `fix`ed, written to a file
    and given to `read`; the report must show no failure."""
    rng = random.Random(seed)
    paths = []
    for i in range(count(n)):
        paths.append(tmp_path / f"{name}-{i}{suffix}")
        paths[-1].write_bytes(fix(mutate(valid, rng, hot)))
    cases = [(f"{p.name} (seed {seed})", lambda p=p: read(p)) for p in paths]
    report = fuzz(name, cases, errors=(error,), unchanged=paths, **bounds)
    report.check()
    assert report.accepted and report.clean_errors  # the mutations reach both sides of the checks


def test_fuzz_wav(tmp_path):
    """Stereo 16-bit at 44.1 kHz, 0.4 s: mutations reach the rate (resampling), channels, encoding and
    chunk sizes."""
    t = np.arange(17_640) / 44_100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.cos(2 * np.pi * 660 * t)], axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44_100)
        w.writeframes(np.round(stereo * 20_000).astype("<i2").tobytes())
    run(tmp_path, "wav", out.getvalue(), ".wav", features_from_file, AudioError, n=300, hot=44, max_mb=64, max_s=5)


def image_bytes(kind: str) -> bytes:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :64]
    smooth = (np.sin(xx / 5.0) + np.cos(yy / 4.0))[..., None] * 60 + 128
    rgb = np.clip(smooth + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, kind)
    return out.getvalue()


def png_crcs(data: bytes) -> bytes:
    """The PNG with its chunks' CRCs recomputed where its chunk lengths allow, so that mutations get past
    Pillow's CRC check to the header fields and the decoder."""
    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        end = at + 8 + int.from_bytes(out[at:at + 4], "big")
        if end + 4 > len(out):
            break
        out[end:end + 4] = zlib.crc32(out[at + 4:end]).to_bytes(4, "big")
        at = end + 4
    return bytes(out)


SPEC = ImagePreprocessing(64, 64)


@pytest.mark.parametrize("kind,suffix,hot,fix", [("PNG", ".png", 64, png_crcs), ("JPEG", ".jpg", 640, lambda d: d)])
def test_fuzz_image(tmp_path, kind, suffix, hot, fix):
    """Pillow's own allocations are outside tracemalloc's view; the pixel bound (checked from the header)
    is what keeps them small, and test_media_bounds.py holds it to the process's peak RSS."""
    run(tmp_path, kind.lower(), image_bytes(kind), suffix, lambda p: pixels(p, SPEC), ImageError, n=300, hot=hot,
        fix=fix, max_mb=64, max_s=5)
