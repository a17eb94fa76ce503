"""Media inputs are bounded and validated before they are decoded: WAV headers (rate, channels, encoding,
sizes, duration) and image sizes are checked first, so a small hostile file is one clean error, quickly,
with little memory, and leaves the file as it was; a prompt's placeholders must match its images and audio
both ways, for text and token-id prompts, before any encoder runs."""

import io
import resource
import struct
import time
import tracemalloc
import wave
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from g3n_compile.checkpoint import resolve_checkpoint
from g3n_compile.checkpoint.tiny_random import AUDIO, TOKENS, VISION
import runtime.image
from runtime.audio import MAX_RATE, AudioError, LogMelSpec, features_from_file, load_audio, log_mel
from runtime.image import MAX_PIXELS, ImageError, ImagePreprocessing, pixels
from runtime.media import AUDIO as AUDIO_KIND
from runtime.media import IMAGE, MediaError, expand_text, placeholders, prompt_embeddings
from runtime.tokenizer import Tokenizer


def refused(call, error, expect: str, *files: Path, mb: float = 8, seconds: float = 2) -> str:
    """`call()` raises `error` with one line naming the file and saying `expect`, within `seconds` and `mb`
    MB (numpy's and Python's allocations, and the process's peak RSS, which sees Pillow's), leaving
    `files` unchanged; returns the message."""
    before = {f: f.read_bytes() for f in files}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(error) as e:
            call()
        elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1e3
    message = str(e.value)
    assert expect in message and "\n" not in message, message
    assert all(str(f) in message for f in files), message
    assert elapsed < seconds and peak < mb and grown < max(mb, 64), (elapsed, peak, grown)
    assert all(f.read_bytes() == data for f, data in before.items())
    return message


# ---- WAV files -------------------------------------------------------------------------------------


def wav_bytes(rate=16_000, channels=1, bits=16, tag=1, body=bytes(2000), data_size=None, block=None) -> bytes:
    """A WAV file whose header says whatever the test needs, whatever the body."""
    block = channels * bits // 8 if block is None else block
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    size = len(body) if data_size is None else data_size
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("rate", [2_000_003, 2**32 - 1, 999, MAX_RATE + 1, 0])
def test_absurd_sample_rates(tmp_path, rate):
    """2 KB claiming 2,000,003 Hz grew past 5.7 GB (the resampler's bank), 2^32-1 Hz was a MemoryError."""
    path = write(tmp_path / "rate.wav", wav_bytes(rate=rate))
    refused(lambda: features_from_file(path), AudioError, f"sample rate of {rate} Hz; supported: 1000 to 384000 Hz",
            path)


@pytest.mark.parametrize("channels", [0, 33, 65535])
def test_channel_counts(tmp_path, channels):
    path = write(tmp_path / "channels.wav", wav_bytes(channels=channels, block=0))
    refused(lambda: load_audio(path), AudioError, f"declares {channels} channels; supported: 1 to 32", path)


@pytest.mark.parametrize("bits,tag,expect", [(12, 1, "12-bit PCM"), (0, 1, "0-bit PCM"), (16, 3, "16-bit float"),
                                             (8, 0x55, "8-bit format tag 0x0055"), (65535, 1, "65535-bit PCM")])
def test_sample_widths(tmp_path, bits, tag, expect):
    path = write(tmp_path / "width.wav", wav_bytes(bits=bits, tag=tag, block=2))
    refused(lambda: load_audio(path), AudioError, f"unsupported WAV encoding ({expect}", path)


def test_inconsistent_block_size(tmp_path):
    path = write(tmp_path / "block.wav", wav_bytes(channels=2, block=3))
    refused(lambda: load_audio(path), AudioError, "block size 3 for 2 channels of 2 bytes", path)


@pytest.mark.parametrize("cut,expect", [(0, "not a WAV file"), (11, "not a WAV file"), (16, "'fmt ' chunk"),
                                        (24, "'fmt ' chunk"), (36, "'data' chunk"), (40, "'data' chunk"),
                                        (43, "'data' chunk")])
def test_truncated_headers(tmp_path, cut, expect):
    path = write(tmp_path / "cut.wav", wav_bytes()[:cut])
    refused(lambda: load_audio(path), AudioError, expect, path)


def test_data_chunk_beyond_the_file(tmp_path):
    path = write(tmp_path / "short.wav", wav_bytes(body=bytes(100), data_size=32_000))
    refused(lambda: load_audio(path), AudioError, "declares 32000 bytes of samples but the file holds 100", path)


def test_three_hour_header_on_a_short_body(tmp_path):
    """The header alone decides: nothing as large as what it claims is allocated."""
    path = write(tmp_path / "claims.wav", wav_bytes(rate=48_000, channels=2, data_size=3 * 3600 * 48_000 * 4))
    refused(lambda: features_from_file(path), AudioError, "declares 2073600000 bytes of samples", path)


def test_three_hour_file_is_refused_before_it_is_read(tmp_path):
    """10.8 MB of real samples (1 kHz, 8-bit): refused from the header, without reading them (it passed
    4.2 GB before the length was checked)."""
    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(1000)
        w.writeframes(bytes([128]) * 3 * 3600 * 1000)
    assert path.stat().st_size > 10_000_000
    refused(lambda: features_from_file(path), AudioError, "the clip is 10800.00 s long; a clip is at most 30 s", path,
            mb=1)


def test_the_length_bound_is_exact(tmp_path):
    """30 s is accepted, one sample more (at the 16 kHz it becomes) is not."""
    path = write(tmp_path / "30s.wav", wav_bytes(rate=8_000, bits=8, body=bytes([128]) * 240_000))
    assert len(load_audio(path)) == 480_000
    path = write(tmp_path / "over.wav", wav_bytes(rate=8_000, bits=8, body=bytes([128]) * 240_001))
    refused(lambda: load_audio(path), AudioError, "a clip is at most 30 s", path)


def test_awkward_rates_resample_in_bounded_memory(tmp_path):
    """383999 Hz shares no factor with 16 kHz: an exact filter per output phase would be 16000 x 1619
    coefficients (200 MB, and a GB in temporaries); the bank stays 2 MB and the tone stays a tone."""
    rate = 383_999
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    path = write(tmp_path / "odd.wav", wav_bytes(rate=rate, body=np.round(tone * 32767).astype("<i2").tobytes()))
    tracemalloc.start()
    try:
        y = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)
    assert len(y) == 16_000 and np.abs(y - ref)[200:-200].max() < 1e-4
    assert peak < 40, peak


def test_unreadable_audio_paths(tmp_path, monkeypatch):
    assert str(tmp_path) in refused(lambda: load_audio(tmp_path), AudioError, "cannot read (Is a directory)")
    refused(lambda: load_audio(tmp_path / "none.wav"), AudioError, "cannot read (No such file or directory)")
    path = write(tmp_path / "locked.wav", wav_bytes())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    refused(lambda: load_audio(path), AudioError, "cannot read (Permission denied)")


def test_sample_arrays_get_the_same_bounds():
    """Samples given through the API: the 30 s bound before any copy, mono floats only, finite values."""
    spec, long = LogMelSpec(), np.zeros(10_000_000)
    refused(lambda: log_mel(long, spec), AudioError, "the clip is 625.00 s long; a clip is at most 30 s")
    refused(lambda: log_mel(np.zeros((16_000, 2)), spec), AudioError, "1-D array of float samples")
    refused(lambda: log_mel(np.zeros(16_000, np.int16), spec), AudioError, "got int16")
    refused(lambda: log_mel(np.array([0.0, np.inf] * 8000), spec), AudioError, "NaN or infinite")


# ---- images ----------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB, with an empty image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def jpeg_bytes(width=256, height=192) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "JPEG", quality=90)
    return out.getvalue()


SPEC = ImagePreprocessing(64, 64)


@pytest.mark.parametrize("width,height", [(100_000, 100_000),  # Pillow's own refusal (over twice its limit)
                                          (10_000, 10_000),  # Pillow would only warn
                                          (9_000, 9_000),  # below Pillow's warning, over g3n's bound
                                          (MAX_PIXELS + 1, 1)])
def test_decompression_bombs(tmp_path, width, height, recwarn):
    path = write(tmp_path / "bomb.png", png_header(width, height))
    refused(lambda: pixels(path, SPEC), ImageError, "too large to decode safely", path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_jpeg_header_claiming_a_huge_size(tmp_path):
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    path = write(tmp_path / "huge.jpg", bytes(data))
    refused(lambda: pixels(path, SPEC), ImageError, "too large to decode safely", path)


def test_an_image_at_the_bound_is_accepted(tmp_path):
    path = write(tmp_path / "edge.png", png_header(MAX_PIXELS, 1))
    with pytest.raises(ImageError, match="cannot decode the image"):  # accepted by size; its stream is empty
        pixels(path, SPEC)


def test_truncated_and_corrupt_images(tmp_path):
    jpeg = jpeg_bytes()
    path = write(tmp_path / "cut.jpg", jpeg[:len(jpeg) // 2])
    refused(lambda: pixels(path, SPEC), ImageError, "cannot decode the image (image file is truncated", path)
    png = io.BytesIO()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(png, "PNG")
    data = bytearray(png.getvalue())
    stream = data.index(b"IDAT") + 4
    data[stream:stream + 8] = bytes(8)  # a corrupt image stream under a valid header
    path = write(tmp_path / "corrupt.png", bytes(data))
    refused(lambda: pixels(path, SPEC), ImageError, "cannot decode the image", path)
    path = write(tmp_path / "text.jpg", b"this is not an image")
    refused(lambda: pixels(path, SPEC), ImageError, "not an image format Pillow can read", path)


def test_unreadable_image_paths(tmp_path, monkeypatch):
    refused(lambda: pixels(tmp_path, SPEC), ImageError, "not a file (a directory)")
    refused(lambda: pixels(tmp_path / "none.png", SPEC), ImageError, "no such file")
    refused(lambda: pixels(np.zeros((8, 8, 3)), SPEC), ImageError, "a file path or a Pillow image, not ndarray")
    path = write(tmp_path / "locked.jpg", jpeg_bytes())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runtime.image, "_File", denied)  # chmod cannot lock root out
    refused(lambda: pixels(path, SPEC), ImageError, "cannot read (Permission denied)")


# ---- placeholders ----------------------------------------------------------------------------------


class Model:
    """What media.py reads of a compiled folder (tiny-random's token ids and soft-token counts); its
    encoders return zeros and record that they ran."""

    hidden_size = 8

    def __init__(self, prompt_tokens=TOKENS):
        self.manifest = SimpleNamespace(prompt_tokens=prompt_tokens)
        self.encoded = []

    def encoder(self, kind):
        if kind == "vision":
            return SimpleNamespace(soft_tokens=VISION.soft_tokens, preprocessing=ImagePreprocessing(32, 32)), None
        return SimpleNamespace(soft_tokens=AUDIO.soft_tokens, features=LogMelSpec(), frames=2997), None

    def token_embedding(self, token):
        return np.ones(self.hidden_size, np.float32) if token >= TOKENS.eoi_token_id else None

    def encode(self, kind, *inputs):
        self.encoded.append(kind)
        return np.zeros(((VISION if kind == "vision" else AUDIO).soft_tokens, self.hidden_size), np.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(resolve_checkpoint("tiny-random"), bos_token_id=2)


def raw_prompt_ids(model, tokenizer, text, images=(), audios=()):
    """A raw text prompt's ids as generate() makes them: each kind given expanded, then tokenized."""
    for kind, items in ((IMAGE, images), (AUDIO_KIND, audios)):
        if items:
            text = expand_text(text, placeholders(model, kind), len(items), tokenizer.id_to_token)
    return tokenizer.encode(text)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    image = write(folder / "picture.jpg", jpeg_bytes(40, 30))
    clip = write(folder / "clip.wav", wav_bytes(body=bytes(16_000)))
    return image, clip


@pytest.mark.parametrize("text,kind,found", [("<image_soft_token> A caption:", "image", 1),
                                             ("<audio_soft_token> Transcribe:", "audio", 1),
                                             ("<image_soft_token><image_soft_token> Compare:", "image", 2)])
def test_raw_text_placeholders_without_media(tokenizer, text, kind, found):
    """This ran with rc 0, the placeholder embedded as a bare token."""
    model = Model()
    ids = raw_prompt_ids(model, tokenizer, text)
    with pytest.raises(MediaError, match=f"the prompt has {found} {kind} placeholders? .* but no {kind} was given"):
        prompt_embeddings(model, ids, [], [])


def test_token_id_prompts_without_media(media):
    model = Model()
    image_run = [TOKENS.boi_token_id] + [TOKENS.image_token_id] * VISION.soft_tokens + [TOKENS.eoi_token_id]
    with pytest.raises(MediaError, match=f"{VISION.soft_tokens} image placeholders"):
        prompt_embeddings(model, [2, *image_run, 300], [], [])
    audio_run = [TOKENS.boa_token_id] + [TOKENS.audio_token_id] * AUDIO.soft_tokens + [TOKENS.eoa_token_id]
    with pytest.raises(MediaError, match="no audio was given"):  # the image is there, the clip is not
        prompt_embeddings(model, [2, *image_run, *audio_run], [media[0]], [])
    assert model.encoded == []


def test_media_without_placeholders(tokenizer, media):
    image, clip = media
    model = Model()
    with pytest.raises(MediaError, match="0 <image_soft_token> placeholders for 1 image"):
        raw_prompt_ids(model, tokenizer, "A caption:", images=[image])
    with pytest.raises(MediaError, match="1 <audio_soft_token> placeholder for 2 audios"):
        raw_prompt_ids(model, tokenizer, "<audio_soft_token> Transcribe:", audios=[clip, clip])
    with pytest.raises(MediaError, match="image placeholders .* must come in 1 run .* found 0"):  # token ids
        prompt_embeddings(model, tokenizer.encode("A caption:"), [image], [])
    ids = raw_prompt_ids(model, tokenizer, "<image_soft_token> A caption:", images=[image])
    with pytest.raises(MediaError, match="audio placeholders .* must come in 1 run"):  # the image's run, no clip's
        prompt_embeddings(model, ids, [image], [clip])
    assert model.encoded == []  # counts are checked before any encoder runs


def test_matching_prompts_run(tokenizer, media):
    image, clip = media
    model = Model()
    ids = raw_prompt_ids(model, tokenizer, "<image_soft_token><audio_soft_token> Both:", [image], [clip])
    embeds, mask = prompt_embeddings(model, ids, [image], [clip])
    assert model.encoded == ["vision", "audio"] and embeds.shape == (len(ids), model.hidden_size)
    assert mask.sum() == sum(t >= TOKENS.eoi_token_id for t in ids)
    text_only = Model(prompt_tokens=None)  # a folder without multimodal tokens: nothing to match
    assert prompt_embeddings(text_only, tokenizer.encode("Hi"), [], []) == (None, None)
