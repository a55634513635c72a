"""transformers + PEFT Whisper engine: speech in, text out (CPU here, CUDA where present).

`WhisperEngine(adapter_path, base_model=None)` serves a PEFT adapter dir on its Whisper base
(adapter_config.json's base_model_name_or_path unless `base_model` is given), a merged Whisper
dir, or the base alone (`adapter_path=None`). It is driven the way a real Whisper is: the
base's processor (`WhisperFeatureExtractor` -> input_features), `model.generate(...,
task="transcribe")` with Whisper's own prompt logic (language detection unless `language` is
given), then the tokenizer's decode.

`transcribe(audio_path)` reads a WAV file (stdlib `wave` + numpy: 8/16/32-bit PCM, any channel
count, resampled to the extractor's rate; `decode_wav` does the same for bytes, as the service
receives them, and `transcribe(samples)` takes them decoded) and returns
`Translation(text, latency_s)`;
`translate()` is the same call, so the engine fits the `Engine` protocol with an audio path as
its request. `reload()` has HFEngine's semantics: a no-op for the release already loaded, a new
PEFT adapter is loaded beside the serving one and checked before the switch, and a failed
reload leaves the old release serving (ReloadFailed).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import time
import warnings
import wave
from pathlib import Path
from typing import Any

import numpy as np

from adapter_deploy.common.errors import AdapterError, AudioTooLong, BadAudio, UsageError
from adapter_deploy.engines.base import (
    Translation,
)
from adapter_deploy.engines.peft_swap import PeftSwapEngine

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Whisper emits about 5 tokens per second of speech; the budget leaves room on top of that so
# a transcription is never cut before its expected words.
TOKENS_PER_SECOND = 8
MIN_NEW_TOKENS = 16


# Sample rates a real recording uses; anything else is a damaged header, and a rate of a few Hz
# would make resampling to 16 kHz allocate gigabytes.
MIN_RATE, MAX_RATE = 4_000, 192_000


def read_wav(path: str | Path, sample_rate: int = 16_000) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at `sample_rate` from a PCM WAV file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise UsageError(f"audio file {path} is missing", fix="check the clip file") from err
    except OSError as err:
        raise BadAudio(f"{path} is unreadable ({err})", fix="check the clip file") from err
    return decode_wav(data, sample_rate, name=str(path))


def decode_wav(
    data: bytes, sample_rate: int = 16_000, max_seconds: float | None = None, name: str = "audio"
) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at `sample_rate` from the bytes of a PCM WAV file.

    BadAudio for anything that is not an 8/16/32-bit PCM WAV with samples; AudioTooLong (checked
    before resampling, so a hostile header cannot make it allocate) over `max_seconds`.
    """
    fix = "send a PCM WAV file (16-bit, mono, 16 kHz is best)"
    try:
        with wave.open(io.BytesIO(data), "rb") as fh:
            channels, width, rate = fh.getnchannels(), fh.getsampwidth(), fh.getframerate()
            raw = fh.readframes(fh.getnframes())
    except (EOFError, wave.Error, struct.error, ValueError) as err:
        raise BadAudio(f"{name} is not a readable PCM WAV file ({err})", fix=fix) from err
    if width not in (1, 2, 4):
        raise BadAudio(f"{name}: {8 * width}-bit samples are not supported", fix=fix)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadAudio(f"{name}: sample rate {rate} Hz is not an audio rate", fix=fix)
    frames = len(raw) // (width * channels)  # a cut last frame is dropped
    if frames == 0:
        raise BadAudio(f"{name} holds no audio samples", fix=fix)
    if max_seconds is not None and frames / rate > max_seconds:
        raise AudioTooLong(frames / rate, max_seconds)
    raw = raw[: frames * width * channels]
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        n_out = max(1, round(len(samples) * sample_rate / rate))
        positions = np.arange(n_out) * (rate / sample_rate)
        samples = np.interp(positions, np.arange(len(samples)), samples)
    return samples.astype(np.float32)


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_whisper(path: str, device: str):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype="auto", use_safetensors=True)
        processor = AutoProcessor.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/... for a bad dir
        raise AdapterError(
            f"cannot load Whisper model {path} ({err})",
            fix="pass --base-model with a local Whisper model dir",
        ) from err
    return model.to(device).eval(), processor


class WhisperEngine(PeftSwapEngine):
    mlx_refusal = ("; Whisper runs on transformers only", "use the trainer's PEFT adapter dir")

    """Transcribe with transformers Whisper (+ PEFT); swap adapters without reloading the base."""

    def __init__(
        self,
        adapter_path: str | Path | None = None,
        base_model: str | Path | None = None,
        device: str | None = None,
        language: str | None = None,
    ) -> None:
        self.language = language
        self.processor: Any = None
        self._start(adapter_path, base_model, _device(device))

    @property
    def sample_rate(self) -> int:
        """The rate the model hears at (16 kHz for every real Whisper)."""
        return int(self.processor.feature_extractor.sampling_rate)

    @property
    def window_s(self) -> float:
        """The longest audio the model hears at once (30 s for a real Whisper)."""
        extractor = self.processor.feature_extractor
        return extractor.n_samples / extractor.sampling_rate

    def transcribe(self, audio: str | Path | np.ndarray) -> Translation:
        """The transcription of one WAV clip (a path, or samples already at `sample_rate`)
        and how long it took (file reading included)."""
        import torch

        with self._lock:
            start = time.perf_counter()
            extractor = self.processor.feature_extractor
            if isinstance(audio, np.ndarray):
                samples, name = audio, "audio"
            else:
                samples, name = read_wav(audio, extractor.sampling_rate), str(audio)
            if len(samples) > extractor.n_samples:
                log.warning("%s is longer than the model's window; it is cut", name)
            features = extractor(
                samples, sampling_rate=extractor.sampling_rate, return_tensors="pt"
            ).input_features.to(self.device, self.model.dtype)
            with torch.no_grad():
                out = self.model.generate(
                    input_features=features,
                    max_new_tokens=self._budget(len(samples) / extractor.sampling_rate),
                    do_sample=False,
                    task="transcribe",
                    language=self.language,
                )
            text = self.processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
            return Translation(text, time.perf_counter() - start)

    def translate(self, text: str) -> Translation:
        """The Engine protocol's request: for Whisper, `text` is the path of an audio clip."""
        return self.transcribe(text)

    def _budget(self, seconds: float) -> int:
        """New tokens for a clip: grows with its length, within the decoder's positions."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_target_positions", 448) - 4  # the forced prompt tokens
        return max(1, min(MIN_NEW_TOKENS + TOKENS_PER_SECOND * math.ceil(seconds), limit))

    def _load_base(self, name_or_path: str) -> tuple[Any, Any]:
        return _load_whisper(name_or_path, self.device)

    def _serve(self, model: Any, companion: Any) -> None:
        self.model, self.processor = model, companion
