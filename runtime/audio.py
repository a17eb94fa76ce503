"""Audio input for Gemma 3n, in numpy: read a WAV file, mix it to mono, resample it to 16 kHz, and turn
it into the log-mel features the audio encoder takes.

The features equal transformers' `Gemma3nAudioFeatureExtractor` for one clip (the tests hold them to
1e-5): the clip is zero-padded to a multiple of 128 samples, cut into 513-sample frames every 160
samples, pre-emphasised (HTK flavour, leaving 512 samples), Hann-windowed, zero-padded to a 1024-point
FFT; the magnitudes go through 128 triangular HTK-mel filters (125-7600 Hz) and a natural log floored
at 1e-5. The arithmetic is float32 where transformers' is, so the features match bit for bit in
practice, not only to rounding.

A clip is at most 30 s (480000 samples: the 188 audio tokens the model's prompt reserves). Longer
audio is refused, not silently cut as transformers does: split it and send the pieces as separate clips.

Files: WAV in PCM (8, 16, 24, 32 bit), IEEE float (32, 64 bit) or WAVE_FORMAT_EXTENSIBLE holding
either, at 1 to 384 kHz, with 1 to 32 channels. The header is validated (and the clip's length checked)
before a sample is read, and samples are read a block at a time, so what a file can make the reader
allocate is bounded by what 30 s of valid audio needs. Other formats (FLAC, MP3, Ogg, compressed WAV)
are refused with a message saying how to convert them: decoding them needs a native codec library,
which the runtime does not depend on.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

SAMPLE_RATE = 16_000


class AudioError(UserError, ValueError):
    """Audio that g3n cannot use; the message names the file (or says what is wrong with the samples)."""


# ---- reading WAV files ----------------------------------------------------------------------------

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_OTHER_FORMATS = {b"fLaC": "FLAC", b"OggS": "Ogg", b"ID3": "MP3", b"\xff\xfb": "MP3", b"\xff\xf3": "MP3",
                  b"\xff\xf2": "MP3", b"FORM": "AIFF"}
_CONVERT = "convert it to WAV first, e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.wav`"
# What a header may declare. Each bound keeps what is read, converted and resampled small before any
# sample is touched: the rates span telephone audio to the fastest studio converters, and the channels
# any surround or ambisonic layout.
MIN_RATE, MAX_RATE, MAX_CHANNELS = 1_000, 384_000, 32
MAX_SECONDS = 30  # 480000 samples at 16 kHz: what the 188 audio tokens of a prompt hold
_READ_BYTES = 1 << 20  # samples are converted and mixed this many bytes at a time


@dataclass(frozen=True)
class _Wav:
    """What a WAV header says about its samples."""

    rate: int
    channels: int
    tag: int  # _PCM or _FLOAT
    width: int  # bytes per sample
    data_offset: int
    frames: int

    @property
    def block(self) -> int:
        return self.channels * self.width


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The file's samples as float32 in [-1, 1], mixed down to mono (the channel mean) and resampled
    to `sample_rate`. The header is checked first (rate, channels, encoding, sizes, and a duration of at
    most `max_seconds`), so a bad file is refused before its samples are read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            wav = _read_header(f, os.fstat(f.fileno()).st_size)
            if -(-wav.frames * sample_rate // wav.rate) > max_seconds * sample_rate:  # resampled length, exactly
                raise AudioError(f"the clip is {wav.frames / wav.rate:.2f} s long; a clip is at most {max_seconds:g} s "
                                 "(split it and send the pieces as separate clips)")
            mono = _read_mono(f, wav)
    except AudioError as e:
        raise AudioError(f"{path}: {e}") from None
    except OSError as e:
        raise AudioError(f"{path}: cannot read ({e.strerror or e})") from None
    return resample(mono, wav.rate, sample_rate).astype(np.float32)


def _read_header(f, file_size: int) -> _Wav:
    """The RIFF/WAVE header of an open file, validated; reads the chunk headers and 'fmt ', skips the rest."""
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        kind = next((name for magic, name in _OTHER_FORMATS.items() if riff.startswith(magic)), None)
        if kind:
            raise AudioError(f"{kind} audio is not supported: {_CONVERT}")
        raise AudioError(f"not a WAV file (no RIFF/WAVE header); {_CONVERT}")
    fmt, data = None, None  # the 'fmt ' chunk's first bytes; the 'data' chunk's (offset, size)
    while fmt is None or data is None:
        head = f.read(8)
        if len(head) < 8:
            break
        chunk_id, size = head[:4], struct.unpack("<I", head[4:])[0]
        end = f.tell() + size + (size & 1)  # chunks are word-aligned
        if chunk_id == b"fmt ":
            fmt = f.read(min(size, 26))  # 26: up to the extensible sub-format's tag
        elif chunk_id == b"data":
            data = f.tell(), size
        f.seek(end)
    if fmt is None or len(fmt) < 16:
        raise AudioError("WAV file without a valid 'fmt ' chunk (truncated or corrupt)")
    if data is None:
        raise AudioError("WAV file without a 'data' chunk (truncated or corrupt)")
    tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the format tag
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"WAV header declares a sample rate of {rate} Hz; supported: {MIN_RATE} to {MAX_RATE} Hz "
                         f"(corrupt header?); {_CONVERT}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"WAV header declares {channels} channels; supported: 1 to {MAX_CHANNELS} (corrupt header?); "
                         f"{_CONVERT}")
    if not (tag == _PCM and bits in (8, 16, 24, 32) or tag == _FLOAT and bits in (32, 64)):
        kind = {_PCM: "PCM", _FLOAT: "float"}.get(tag, f"format tag 0x{tag:04x}")
        raise AudioError(f"unsupported WAV encoding ({bits}-bit {kind}; supported: 8/16/24/32-bit PCM, "
                         f"32/64-bit float); {_CONVERT}")
    if block != channels * (bits // 8):
        raise AudioError(f"WAV header is inconsistent (block size {block} for {channels} channels of "
                         f"{bits // 8} bytes)")
    wav = _Wav(rate, channels, tag, bits // 8, data[0], data[1] // block)
    if wav.frames == 0:
        raise AudioError("the file holds no samples")
    if data[0] + wav.frames * block > file_size:
        raise AudioError(_truncated(wav, file_size - data[0]))
    return wav


def _truncated(wav: _Wav, available: int) -> str:
    return (f"the WAV header declares {wav.frames * wav.block} bytes of samples but the file holds {max(available, 0)} "
            "(truncated, or written by a tool that did not finish it); re-save it as a complete WAV")


def _read_mono(f, wav: _Wav) -> np.ndarray:
    """The header's frames, read and mixed to mono a block at a time: float64 [frames]."""
    mono = np.empty(wav.frames, dtype=np.float64)
    step = max(1, _READ_BYTES // wav.block)
    f.seek(wav.data_offset)
    for start in range(0, wav.frames, step):
        n = min(step, wav.frames - start)
        raw = f.read(n * wav.block)
        if len(raw) < n * wav.block:  # the file shrank since its size was read
            raise AudioError(_truncated(wav, start * wav.block + len(raw)))
        mono[start:start + n] = _decode(raw, wav).mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError("the file has NaN or infinite samples")
    return mono


def _decode(raw: bytes, wav: _Wav) -> np.ndarray:
    """Whole frames of samples -> float64 [frames, channels]; integer PCM scaled to [-1, 1): 8-bit is
    unsigned, wider is signed little-endian."""
    if wav.tag == _FLOAT:
        values = np.frombuffer(raw, dtype=f"<f{wav.width}")
    elif wav.width == 1:
        values = (np.frombuffer(raw, dtype="u1").astype(np.float64) - 128.0) / 128.0
    elif wav.width == 3:  # no numpy dtype: place the 3 bytes in the top of an int32
        wide = np.zeros((len(raw) // 3, 4), dtype=np.uint8)
        wide[:, 1:] = np.frombuffer(raw, dtype="u1").reshape(-1, 3)
        values = wide.view("<i4")[:, 0].astype(np.float64) / 2.0**31
    else:
        values = np.frombuffer(raw, dtype=f"<i{wav.width}").astype(np.float64) / 2.0 ** (8 * wav.width - 1)
    return values.astype(np.float64, copy=False).reshape(-1, wav.channels)


# ---- resampling -----------------------------------------------------------------------------------

_MAX_BANK = 1 << 18  # filter coefficients (2 MB): bounds the resampler's memory for every pair of rates


def resample(x: np.ndarray, from_rate: int, to_rate: int, zero_crossings: int = 32, kaiser_beta: float = 8.6
             ) -> np.ndarray:
    """Band-limited resampling: each output sample is the input convolved with a Kaiser-windowed sinc,
    evaluated at the output instant. The sinc's cutoff is the lower of the two Nyquist frequencies
    (less 5% when downsampling, so the transition band lies below the new Nyquist); `zero_crossings`
    of it on either side and beta 8.6 give about 80 dB of stopband rejection. Samples outside the
    clip count as zero.

    The filter for each fractional phase of the output instant comes from a bank of at most
    `_MAX_BANK` coefficients: one filter per phase where the rates' reduced ratio has few phases (8, 22.05,
    44.1, 48 kHz...), otherwise (e.g. 44101 Hz: 16000 phases) filters at evenly spaced phases, linearly
    interpolated, whose error is far below the stopband's."""
    if from_rate == to_rate:
        return np.asarray(x, dtype=np.float64)
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g  # output n sits at input time n * down / up
    cutoff = 0.5 * (0.95 * up / down if up < down else 1.0)  # cycles per input sample
    half = int(math.ceil(zero_crossings / (2 * cutoff)))  # filter half-width in input samples
    taps = np.arange(-half, half + 1)
    phases = min(up, max(1, _MAX_BANK // len(taps)))
    # Filter p is for the output instant p/phases of an input sample after the input sample it starts
    # from; the extra row (one sample on) is the upper neighbour interpolation needs.
    delta = np.arange(phases + 1)[:, None] / phases - taps[None, :]  # output instant minus input sample time
    bank = 2 * cutoff * np.sinc(2 * cutoff * delta) * np.i0(kaiser_beta * np.sqrt(np.clip(1 - (delta / (half + 1)) ** 2, 0, 1)))
    bank /= bank.sum(axis=1, keepdims=True)  # unit gain at DC for every phase
    n_out = (len(x) * up + down - 1) // down
    position = np.arange(n_out, dtype=np.int64) * down
    base, phase = position // up, position % up
    row, frac = np.divmod(phase * phases, up)  # phase / up = (row + frac / up) / phases
    weight = frac / up
    padded = np.concatenate([np.zeros(half), np.asarray(x, dtype=np.float64), np.zeros(half + 1)])
    out = np.zeros(n_out)
    for j, t in enumerate(taps):
        h = bank[row, j] if phases == up else bank[row, j] + weight * (bank[row + 1, j] - bank[row, j])
        out += h * padded[base + t + half]
    return out


# ---- log-mel features -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMelSpec:
    """The feature extractor's settings: transformers' `Gemma3nAudioFeatureExtractor` defaults, which
    the Gemma 3n checkpoints use (`preprocessor_config.json`)."""

    feature_size: int = 128  # mel bins
    sampling_rate: int = SAMPLE_RATE
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True  # twice the next power of two of the frame length
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    pad_to_multiple_of: int = 128  # samples (transformers pads each clip so)
    max_samples: int = MAX_SECONDS * SAMPLE_RATE  # 480000

    @classmethod
    def from_preprocessor_config(cls, raw: dict) -> "LogMelSpec":
        """From a checkpoint's `preprocessor_config.json`; keys it does not use are ignored."""
        if raw.get("dither", 0.0):
            raise AudioError(f"preprocessor_config.json: dither={raw['dither']!r} is not supported (expected 0: "
                             "it adds random noise to every clip)")
        if raw.get("padding_value", 0.0) != 0.0:
            raise AudioError(f"preprocessor_config.json: padding_value={raw['padding_value']!r} is not supported "
                             "(expected 0.0)")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if raw.get(k) is not None}
        for key in ("per_bin_mean", "per_bin_stddev"):
            if key in known:
                known[key] = tuple(np.asarray(known[key], dtype=np.float64).reshape(-1).tolist())  # stored [1, 1, bins]
                if len(known[key]) != known.get("feature_size", cls.feature_size):
                    raise AudioError(f"preprocessor_config.json: {key} has {len(known[key])} entries, "
                                     f"expected one per mel bin")
        return cls(**known)

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n

    def num_frames(self, samples: int) -> int:
        """Feature frames for a clip of `samples` samples (after padding to `pad_to_multiple_of`)."""
        padded = -(-samples // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return max(0, (padded - self.frame_length - 1) // self.hop_length + 1)

    @property
    def max_frames(self) -> int:
        """Frames of the longest clip (2997 for 30 s): the encoder's fixed input length."""
        return self.num_frames(self.max_samples)


def mel_filters(spec: LogMelSpec) -> np.ndarray:
    """Triangular filters on the HTK mel scale, without area normalisation: [fft_length/2 + 1, mel bins]."""
    n_bins = spec.fft_length // 2 + 1
    bin_hz = np.arange(n_bins, dtype=np.float32) * (spec.sampling_rate / spec.fft_length)
    low, high = (2595.0 * math.log10(1.0 + f / 700.0) for f in (spec.min_frequency, spec.max_frequency))
    edges_hz = 700.0 * (10 ** (np.linspace(low, high, spec.feature_size + 2) / 2595.0) - 1.0)
    widths = np.diff(edges_hz)
    above = edges_hz[None, :] - bin_hz[:, None]  # how far each filter edge lies above each FFT bin
    rising = -above[:, :-2] / widths[:-1]
    falling = above[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(samples: np.ndarray, spec: LogMelSpec = LogMelSpec(), padded_length: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Features of one mono clip at `spec.sampling_rate`: (float32 [frames, mel bins], bool [frames]
    True where the frame starts inside the clip). The clip is zero-padded to `padded_length` samples
    first, as transformers pads every clip of a batch to the longest; alone (the default), every frame
    starts inside the clip."""
    x = np.asarray(samples)
    if x.ndim != 1 or x.dtype.kind != "f":  # a stereo [n, 2] or integer array would be read wrongly, not refused
        raise AudioError(f"a clip is a 1-D array of float samples in [-1, 1] at {spec.sampling_rate} Hz (mono); got "
                         f"{x.dtype} with shape {x.shape}")
    seconds = len(x) / spec.sampling_rate
    if len(x) > spec.max_samples:  # before any copy of the samples
        raise AudioError(f"the clip is {seconds:.2f} s long; a clip is at most {spec.max_samples / spec.sampling_rate:g} s "
                         "(split it and send the pieces as separate clips)")
    x = x.astype(np.float32, copy=False)
    total = max(len(x), min(padded_length, spec.max_samples))
    frames_total = spec.num_frames(total)
    if frames_total == 0:
        raise AudioError(f"the clip is {seconds * 1000:.1f} ms long; it must be at least "
                         f"{spec.frame_length_ms:g} ms (one frame)")
    if not np.isfinite(x).all():
        raise AudioError("the clip has NaN or infinite samples")
    padded = np.zeros(-(-total // spec.pad_to_multiple_of) * spec.pad_to_multiple_of, dtype=np.float32)
    padded[:len(x)] = x
    if spec.input_scale_factor != 1.0:
        padded = padded * spec.input_scale_factor

    # Frames of frame_length + 1 samples: pre-emphasis eats one.
    frames = np.lib.stride_tricks.sliding_window_view(padded, spec.frame_length + 1)[::spec.hop_length]
    p = spec.preemphasis
    if p > 0 and spec.preemphasis_htk_flavor:  # the first sample is scaled by (1 - p) instead of dropped
        frames = np.concatenate([frames[:, :1] * (1.0 - p), frames[:, 1:-1] - p * frames[:, :-2]], axis=1)
    elif p > 0:
        frames = frames[:, 1:] - p * frames[:, :-1]
    else:
        frames = frames[:, :-1]
    n = np.arange(spec.frame_length, dtype=np.float32)
    window = 0.5 * (1 - np.cos(2 * np.pi * n / spec.frame_length))  # periodic Hann, float32
    magnitude = np.abs(np.fft.rfft(frames * window, n=spec.fft_length, axis=-1))
    features = np.log(np.maximum(magnitude @ mel_filters(spec), spec.mel_floor))
    if spec.per_bin_mean is not None:
        features = features - np.asarray(spec.per_bin_mean)
    if spec.per_bin_stddev is not None:
        features = features / np.asarray(spec.per_bin_stddev)
    mask = np.arange(frames_total) * spec.hop_length < len(x)
    return features.astype(np.float32), mask


def features_from_file(path: str | Path, spec: LogMelSpec = LogMelSpec()) -> tuple[np.ndarray, np.ndarray]:
    """`log_mel` of a WAV file; errors name the file."""
    samples = load_audio(path, spec.sampling_rate, spec.max_samples / spec.sampling_rate)
    try:
        return log_mel(samples, spec)
    except AudioError as e:
        raise AudioError(f"{path}: {e}") from None


def pad_to_frames(features: np.ndarray, mask: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A clip's features and mask as the fixed-shape encoder input: [1, frames, bins] float32 with zero
    frames after the clip, and [1, frames] bool, False there. The encoder ignores masked frames, so the
    result does not depend on `frames`."""
    n = features.shape[0]
    if n > frames:
        raise AudioError(f"the clip has {n} feature frames, more than the encoder's {frames}")
    padded = np.zeros((1, frames, features.shape[1]), dtype=np.float32)
    padded[0, :n] = features
    valid = np.zeros((1, frames), dtype=bool)
    valid[0, :n] = mask
    return padded, valid
