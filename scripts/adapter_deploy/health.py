"""The operator's 5-sentence health check: the gate that keeps a bad adapter off a service.

Pass rules per sentence (case-insensitive): the output is non-empty, contains at least one
`any_of` substring (when given) and every `all_of` substring (when given), and arrived within
the latency limit. A model may bring its own sentence file: a JSON list of
`{"input": str, "any_of": [str, ...], "all_of": [str, ...]}` (both lists optional).

`check_release()` is what the deployer calls in-process; `run_health_check()` checks an engine
that is already serving. A release that cannot even be loaded is a failed check with a reason.

Transcription models (params.yaml `task: transcription`, e.g. Whisper) are checked on short
reference clips instead: a clip file is a JSON list of
`{"audio": "clip1.wav", "any_of": [...], "all_of": [...]}` (audio paths relative to the clip
file), judged by the same rules; `check_release(..., task="transcription")` and
`run_transcription_check()` run it, with the same result shape (`input` is the clip's name).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.errors import AdapterDeployError, UsageError

log = logging.getLogger(__name__)

DEFAULT_LATENCY_LIMIT_S = 5.0


@dataclass(frozen=True)
class HealthSentence:
    input: str
    any_of: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()

    def expected(self) -> str:
        """The rule in words, for failure messages."""
        parts = []
        if self.any_of:
            parts.append("any of " + ", ".join(f'"{s}"' for s in self.any_of))
        if self.all_of:
            parts.append("all of " + ", ".join(f'"{s}"' for s in self.all_of))
        return " and ".join(parts) or "non-empty output"


DEFAULT_SENTENCES: tuple[HealthSentence, ...] = (
    HealthSentence("Good morning, welcome to the service.", any_of=("buen", "servicio")),
    HealthSentence(
        "The atonement of Christ provides redemption for sinners.", any_of=("expiaci", "redenci")
    ),
    HealthSentence("The apostle James wrote about faith and works.", any_of=("jacobo", "santiago")),
    HealthSentence(
        "By grace you have been saved through faith, not of works.", all_of=("gracia", "fe")
    ),
    HealthSentence("Amen."),
)


@dataclass
class SentenceResult:
    input: str
    output: str
    latency_s: float
    passed: bool
    reason: str  # "" when passed
    expected: str


@dataclass
class HealthResult:
    all_passed: bool
    timestamp: str
    latency_p50: float | None
    latency_p95: float | None
    results: list[SentenceResult] = field(default_factory=list)
    release: dict[str, str] | None = None  # what the engine reported it loaded
    error: str | None = None  # set when the release could not be loaded at all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self) -> list[str]:
        """One line per failing sentence, as the deploy log prints them (the operator's plan)."""
        if self.error:
            return [f"release did not load: {self.error}"]
        return [
            f"Sentence {i} failed: {r.reason}"
            for i, r in enumerate(self.results, 1)
            if not r.passed
        ]


def judge(sentence: HealthSentence, output: str, latency_s: float, limit_s: float) -> str:
    """The reason `output` fails `sentence`, or "" when it passes."""
    text = output.lower()
    got = f'got "{output}"'
    if not output.strip():
        return "expected non-empty output, got nothing"
    if sentence.any_of and not any(s.lower() in text for s in sentence.any_of):
        return f"expected {sentence.expected()} in output, {got}"
    missing = [s for s in sentence.all_of if s.lower() not in text]
    if missing:
        lacking = ", ".join(f'"{s}"' for s in missing)
        return f"expected {sentence.expected()} in output (missing {lacking}), {got}"
    if latency_s >= limit_s:
        return f"took {latency_s:.2f} s, limit {limit_s:.2f} s"
    return ""


def load_sentences(path: str | Path) -> tuple[HealthSentence, ...]:
    """Read a model's own sentence file (JSON list), reporting every bad entry at once."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(
            f"sentence file {path} is unreadable ({err})",
            fix="give a JSON list of {input, any_of, all_of}",
        ) from err
    if not isinstance(raw, list) or not raw:
        raise UsageError(
            f"sentence file {path} is not a non-empty JSON list",
            fix="give a JSON list of {input, any_of, all_of}",
        )
    sentences, problems = [], []
    for i, item in enumerate(raw, 1):
        try:
            sentences.append(_sentence(item))
        except (TypeError, ValueError) as err:
            problems.append(f"entry {i}: {err}")
    if problems:
        raise UsageError(
            f"sentence file {path} is invalid: " + "; ".join(problems),
            fix="each entry needs a string input and lists of strings",
        )
    return tuple(sentences)


def _sentence(item: Any) -> HealthSentence:
    if not isinstance(item, dict) or not isinstance(item.get("input"), str):
        raise TypeError("needs a string 'input'")
    unknown = set(item) - {"input", "any_of", "all_of"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    lists = {}
    for key in ("any_of", "all_of"):
        value = item.get(key, [])
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise TypeError(f"'{key}' must be a list of non-empty strings")
        lists[key] = tuple(value)
    return HealthSentence(item["input"], **lists)


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: with 5 samples p95 is the slowest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run_health_check(
    engine: Any,
    sentences: tuple[HealthSentence, ...] | None = None,
    latency_limit: float = DEFAULT_LATENCY_LIMIT_S,
) -> HealthResult:
    """Translate every sentence with `engine` and judge each answer."""
    sentences = sentences or DEFAULT_SENTENCES
    cases = [(s.input, s.input, s) for s in sentences]
    return _judge_all(engine, engine.translate, cases, latency_limit)


def _judge_all(
    engine: Any,
    ask: Callable[[Any], Any],
    cases: list[tuple[str, Any, HealthSentence]],
    latency_limit: float,
) -> HealthResult:
    """Ask each case's query, judge the answer by its rule; one result for all."""
    # One untimed call first: the first generation pays one-time costs (kernel compilation,
    # caches) that a serving engine has already paid; the limit is about steady serving.
    ask(cases[0][1])
    results = []
    for label, query, rule in cases:
        answer = ask(query)
        reason = judge(rule, answer.text, answer.latency_s, latency_limit)
        results.append(
            SentenceResult(
                label, answer.text, round(answer.latency_s, 4), not reason, reason, rule.expected()
            )
        )
    latencies = [r.latency_s for r in results]
    loaded = getattr(engine, "loaded", None)
    return HealthResult(
        all_passed=all(r.passed for r in results),
        timestamp=utc_now(),
        latency_p50=round(statistics.median(latencies), 4),
        latency_p95=_percentile(latencies, 0.95),
        results=results,
        release=loaded.to_dict() if loaded is not None else None,
    )


def check_release(
    adapter_dir: str | Path,
    base_model: str | Path | None,
    engine_kind: str = "auto",
    sentences: tuple[HealthSentence, ...] | None = None,
    latency_limit: float = DEFAULT_LATENCY_LIMIT_S,
    task: str = "translation",
) -> HealthResult:
    """Load the release at `adapter_dir` in a fresh engine and health-check it.

    Never raises for a bad release: a missing, empty or corrupt adapter comes back as a failed
    result whose `error` says why (the deployer logs it and aborts).

    With `task="transcription"` the release is a Whisper adapter and `sentences` holds its
    reference clips: a tuple of `HealthClip` or the path of a clip file (there is no default
    clip set; without one the check fails).
    """
    if task == "transcription":
        return _check_transcription(adapter_dir, base_model, engine_kind, sentences, latency_limit)
    if task != "translation":
        raise UsageError(f"unknown task {task!r}", fix="use translation or transcription")
    from adapter_deploy.engines.factory import make_engine

    try:
        engine = make_engine(engine_kind, adapter_path=adapter_dir, base_model=base_model)
    except AdapterDeployError as err:
        return load_failure(err.one_line())
    except Exception as err:  # fail closed: an unexpected load error is still a failed check
        log.debug("loading %s failed", adapter_dir, exc_info=True)
        return load_failure(f"{type(err).__name__}: {err}")
    try:
        return run_health_check(engine, sentences, latency_limit)
    except Exception as err:  # an engine that crashes while translating fails the check
        log.debug("health check of %s crashed", adapter_dir, exc_info=True)
        return load_failure(f"inference failed: {type(err).__name__}: {err}")


def load_failure(reason: str) -> HealthResult:
    """A check that could not run: the release did not load (or crashed), with why."""
    return HealthResult(False, utc_now(), None, None, error=reason)


# --- transcription (Whisper) ------------------------------------------------------------------


@dataclass(frozen=True)
class HealthClip:
    """A reference clip and the substrings its transcription must contain."""

    audio: Path
    any_of: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.audio).name

    def expected(self) -> str:
        return HealthSentence(self.name, self.any_of, self.all_of).expected()


def load_clips(path: str | Path) -> tuple[HealthClip, ...]:
    """Read a clip file (JSON list), reporting every bad entry (and missing audio) at once."""
    path = Path(path)
    fix = "give a JSON list of {audio, any_of, all_of} (audio relative to the file)"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"clip file {path} is unreadable ({err})", fix=fix) from err
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"clip file {path} is not a non-empty JSON list", fix=fix)
    clips, problems = [], []
    for i, item in enumerate(raw, 1):
        try:
            if not isinstance(item, dict) or not isinstance(item.get("audio"), str):
                raise TypeError("needs a string 'audio'")
            rule = _sentence(
                {"input": item["audio"], **{k: v for k, v in item.items() if k != "audio"}}
            )
            audio = path.parent / item["audio"]
            if not audio.is_file():
                raise ValueError(f"audio file {audio} is missing")
            clips.append(HealthClip(audio, rule.any_of, rule.all_of))
        except (TypeError, ValueError) as err:
            problems.append(f"entry {i}: {err}")
    if problems:
        raise UsageError(f"clip file {path} is invalid: " + "; ".join(problems), fix=fix)
    return tuple(clips)


def run_transcription_check(
    engine: Any,
    clips: tuple[HealthClip, ...],
    latency_limit: float = DEFAULT_LATENCY_LIMIT_S,
) -> HealthResult:
    """Transcribe every clip with `engine` (a WhisperEngine) and judge each answer."""
    if not clips:
        raise UsageError("no reference clips given", fix="give a clip file")
    cases = [(c.name, c.audio, HealthSentence(c.name, c.any_of, c.all_of)) for c in clips]
    return _judge_all(engine, engine.transcribe, cases, latency_limit)


def _check_transcription(
    adapter_dir: str | Path,
    base_model: str | Path | None,
    engine_kind: str,
    clips: Any,
    latency_limit: float,
) -> HealthResult:
    """check_release for a Whisper release: never raises for a bad release or clip set."""
    from adapter_deploy.engines.factory import make_engine

    try:
        if clips is None:
            raise UsageError(
                "no reference clips for a transcription check",
                fix="name a clip file (models.<m>.sentences in params.yaml or --sentences)",
            )
        if isinstance(clips, str | Path):
            clips = load_clips(clips)
        engine = make_engine(
            engine_kind, adapter_path=adapter_dir, base_model=base_model, task="transcription"
        )
    except AdapterDeployError as err:
        return load_failure(err.one_line())
    except Exception as err:  # fail closed
        log.debug("loading %s failed", adapter_dir, exc_info=True)
        return load_failure(f"{type(err).__name__}: {err}")
    try:
        return run_transcription_check(engine, tuple(clips), latency_limit)
    except Exception as err:  # an engine that crashes while transcribing fails the check
        log.debug("health check of %s crashed", adapter_dir, exc_info=True)
        return load_failure(f"inference failed: {type(err).__name__}: {err}")
