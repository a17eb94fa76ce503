"""runtime.audio: WAV reading, resampling and log-mel features vs transformers' Gemma3nAudioFeatureExtractor."""

import struct
import wave

import numpy as np
import pytest

from runtime.audio import (AudioError, LogMelSpec, features_from_file, load_audio, log_mel, pad_to_frames,
                           resample)

TOL = 1e-5


def hf_extractor(**kw):
    from transformers import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor(**kw)


def signal(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return {"noise": 0.3 * rng.standard_normal(n),
            "chirp": 0.5 * np.sin(2 * np.pi * (100 + 3000 * t / max(t[-1], 1e-3)) * t),
            "silence": np.zeros(n),
            "near-silence": 1e-6 * rng.standard_normal(n),  # mel energies around the 1e-5 floor
            "clipped": np.clip(3 * rng.standard_normal(n), -1, 1)}[kind].astype(np.float32)


KINDS = ["noise", "chirp", "silence", "near-silence", "clipped"]


# one frame .. 30 s; the 30 s clip for the two signals that fill every mel bin
@pytest.mark.parametrize("kind,n", [(k, n) for k in KINDS for n in (513, 700, 8000, 80_037)]
                         + [("noise", 480_000), ("chirp", 480_000)])
def test_features_match_transformers(kind, n):
    x = signal(kind, n)
    ref = hf_extractor()([x], return_tensors="np")
    features, mask = log_mel(x)
    assert features.dtype == np.float32 and features.shape == ref["input_features"][0].shape
    assert np.abs(features - ref["input_features"][0]).max() <= TOL
    assert (mask == ref["input_features_mask"][0]).all()


def test_batch_padding_and_mask_match_transformers():
    """transformers pads every clip of a batch to the longest: `padded_length` gives the same frames and mask."""
    clips = [signal("noise", 4000, 1), signal("chirp", 9999), signal("noise", 1234, 2)]
    ref = hf_extractor()(clips, return_tensors="np")
    for i, x in enumerate(clips):
        features, mask = log_mel(x, padded_length=9999)
        assert np.abs(features - ref["input_features"][i]).max() <= TOL
        assert (mask == ref["input_features_mask"][i]).all()
    assert not ref["input_features_mask"][0].all()  # the padding really is masked


def test_transformers_golden_values():
    """Golden values from transformers' tests/models/gemma3n/test_modeling_gemma3n.py
    (Gemma3nAudioModelTest.setUp / test_feature_extractor): 32 mel bins, a 440 Hz sine of 8000 samples
    and 4000 samples of np.random.seed(0) noise, padded to the longest."""
    spec = LogMelSpec(feature_size=32)
    np.random.seed(0)
    sine = np.sin(2 * np.pi * 440 * np.linspace(0, 1, 8000)).astype(np.float32)
    noise = np.random.randn(4000).astype(np.float32)
    features, _ = log_mel(sine, spec)
    assert features.shape == (48, 32)
    np.testing.assert_allclose(features[0, :5], [-5.733152, -5.337127, -4.916284, -4.378989, -3.7622747],
                               rtol=1e-5, atol=1e-5)
    _, mask = log_mel(noise, spec, padded_length=8000)
    assert mask.shape == (48,) and mask[21:26].tolist() == [True, True, True, True, False]


def test_preprocessor_config_round_trip():
    """A checkpoint's preprocessor_config.json (as transformers writes it) gives the same features."""
    kw = dict(feature_size=64, min_frequency=60.0, max_frequency=7000.0, preemphasis=0.9,
              per_bin_mean=list(np.linspace(-3, 1, 64)), per_bin_stddev=list(np.linspace(1, 3, 64)))
    hf = hf_extractor(**kw)
    spec = LogMelSpec.from_preprocessor_config(hf.to_dict())
    assert spec.feature_size == 64 and spec.preemphasis == 0.9
    x = signal("noise", 5000)
    assert np.abs(log_mel(x, spec)[0] - hf([x], return_tensors="np")["input_features"][0]).max() <= TOL
    assert LogMelSpec.from_preprocessor_config(hf_extractor().to_dict()) == LogMelSpec()
    with pytest.raises(AudioError, match="dither"):
        LogMelSpec.from_preprocessor_config({**hf.to_dict(), "dither": 1e-4})


def test_clip_length_limits():
    spec = LogMelSpec()
    assert spec.max_frames == 2997 and spec.num_frames(480_000) == 2997
    with pytest.raises(AudioError, match=r"30.01 s long; a clip is at most 30 s \(split it"):
        log_mel(np.zeros(480_160, np.float32))
    with pytest.raises(AudioError, match="at least 32 ms"):
        log_mel(np.zeros(300, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        log_mel(np.full(1000, np.nan, np.float32))


def test_pad_to_frames():
    features, mask = log_mel(signal("noise", 5000))
    x, valid = pad_to_frames(features, mask, 2997)
    assert x.shape == (1, 2997, 128) and valid.shape == (1, 2997)
    assert (x[0, :len(features)] == features).all() and (x[0, len(features):] == 0).all()
    assert valid[0].sum() == len(features)
    with pytest.raises(AudioError, match="more than the encoder's 10"):
        pad_to_frames(features, mask, 10)


# ---- resampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,freq", [(44_100, 1000.0), (48_000, 3000.0), (8_000, 440.0), (22_050, 5000.0)])
def test_resampling_keeps_a_tone(rate, freq):
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * freq * t), rate, 16_000)
    assert len(y) == 16_000
    ref = np.sin(2 * np.pi * freq * np.arange(16_000) / 16_000)
    assert np.abs(y - ref)[200:-200].max() < 1e-4  # away from the clip's edges


@pytest.mark.parametrize("rate,freq", [(44_100, 12_000.0), (48_000, 8_500.0)])
def test_resampling_removes_what_16k_cannot_hold(rate, freq):
    """A tone above 8 kHz must vanish, not alias into the audible band."""
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * freq * t), rate, 16_000)
    assert np.abs(y)[200:-200].max() < 1e-3


# ---- WAV files -------------------------------------------------------------------------------------


def write_wav(path, frames: np.ndarray, rate: int, width: int):
    """Integer PCM through the stdlib writer: frames [n, channels] in [-1, 1]."""
    scale = 2 ** (8 * width - 1)
    ints = np.clip(np.round(frames * scale), -scale, scale - 1).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1)) if width == 3 \
            else ints.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return ints / scale


def write_raw_wav(path, fmt_tag: int, bits: int, channels: int, rate: int, data: bytes, extensible_tag=None):
    """A WAV file with any format tag (float, extensible, compressed...), written by hand."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible_tag else fmt_tag, channels, rate, rate * block, block, bits)
    if extensible_tag:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", extensible_tag) + bytes(14)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\0"
    chunks += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_wav_values(tmp_path, width):
    x = np.random.default_rng(width).uniform(-0.9, 0.9, (1000, 1))
    expected = write_wav(tmp_path / "a.wav", x, 16_000, width)
    got = load_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.shape == (1000,)
    assert np.abs(got - expected[:, 0]).max() < 1e-6


@pytest.mark.parametrize("bits,tag,extensible", [(32, 3, False), (64, 3, False), (32, 3, True), (16, 1, True)])
def test_float_and_extensible_wav(tmp_path, bits, tag, extensible):
    x = np.random.default_rng(0).uniform(-1, 1, (500, 2))
    data = (x.astype(f"<f{bits // 8}") if tag == 3 else np.round(x * 32767).astype("<i2")).tobytes()
    write_raw_wav(tmp_path / "f.wav", tag, bits, 2, 16_000, data, extensible_tag=tag if extensible else None)
    expected = x.mean(axis=1) if tag == 3 else np.round(x * 32767).mean(axis=1) / 32768
    assert np.abs(load_audio(tmp_path / "f.wav") - expected).max() < 1e-6


def test_stereo_44k_wav_becomes_the_16k_mono_signal(tmp_path):
    rate, seconds = 44_100, 2
    t = np.arange(rate * seconds) / rate
    left, right = 0.6 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 440 * t + 0.5)
    write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), rate, 2)
    y = load_audio(tmp_path / "s.wav")
    assert len(y) == 16_000 * seconds
    t16 = np.arange(len(y)) / 16_000
    ref = (0.6 * np.sin(2 * np.pi * 440 * t16) + 0.2 * np.sin(2 * np.pi * 440 * t16 + 0.5)) / 2
    assert np.abs(y - ref)[200:-200].max() < 1e-4  # 16-bit quantisation is 1.5e-5


def test_features_from_a_file_match_transformers(tmp_path):
    x = signal("chirp", 24_000)
    decoded = write_wav(tmp_path / "c.wav", x[:, None], 16_000, 2)[:, 0].astype(np.float32)
    features, mask = features_from_file(tmp_path / "c.wav")
    assert np.abs(features - hf_extractor()([decoded], return_tensors="np")["input_features"][0]).max() <= TOL


@pytest.mark.parametrize("content,expect", [
    (b"", "not a WAV file"),
    (b"fLaC\0\0\0\x22" + bytes(40), "FLAC audio is not supported: convert it to WAV first"),
    (b"ID3\x04" + bytes(40), "MP3 audio is not supported"),
    (b"hello, I am a text file", "not a WAV file (no RIFF/WAVE header)"),
    (b"RIFF\x24\0\0\0WAVEfmt ", "without a valid 'fmt ' chunk"),
])
def test_unreadable_files(tmp_path, content, expect):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError) as e:
        load_audio(path)
    assert expect in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(tmp_path / "missing.wav")
    write_raw_wav(tmp_path / "alaw.wav", 6, 8, 1, 8000, bytes(100))
    with pytest.raises(AudioError, match=r"unsupported WAV encoding \(8-bit format tag 0x0006"):
        load_audio(tmp_path / "alaw.wav")
    write_raw_wav(tmp_path / "empty.wav", 1, 16, 1, 16_000, b"")
    with pytest.raises(AudioError, match="holds no samples"):
        load_audio(tmp_path / "empty.wav")
    write_wav(tmp_path / "long.wav", np.zeros((16_000 * 31, 1)), 16_000, 2)
    with pytest.raises(AudioError, match=r"long.wav: the clip is 31.00 s long; a clip is at most 30 s"):
        features_from_file(tmp_path / "long.wav")
