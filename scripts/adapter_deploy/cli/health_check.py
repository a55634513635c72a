"""Health-check one release with the 5-sentence smoke test (the operator's plan).

Usage:
    python scripts/health_check.py --model gemma_4b --adapter-dir DIR
        [--base-model PATH] [--engine auto|hf|mlx] [--sentences FILE]
        [--latency-limit S] [--task translation|transcription] [--json]

--adapter-dir takes a PEFT adapter dir, a converted MLX adapter dir (--engine mlx) or a
merged model dir (--engine hf). Without --base-model the adapter's adapter_config.json names
the base. With --params, the model's sentence file and the latency limit come from it.
--task transcription checks a Whisper adapter on reference clips: --sentences (or the
model's `sentences` in params.yaml) then names a clip file, a JSON list of
{"audio": "clip1.wav", "any_of": [...], "all_of": [...]}. The task defaults to the model's
`task` in params.yaml when --params is given, else translation.
Exit 0 when every sentence passes, 4 when any fails (also when the release does not load).
--json prints the whole result on stdout and nothing else; logs go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapter_deploy.common.errors import HealthCheckFailed
from adapter_deploy.common.names import printable
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.health import (
    DEFAULT_LATENCY_LIMIT_S,
    HealthResult,
    check_release,
    load_clips,
    load_sentences,
)


def build_parser():
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model name (as in params.yaml)")
    parser.add_argument("--adapter-dir", required=True, type=Path, help="release to check")
    parser.add_argument("--base-model", help="base model dir (default: from adapter_config)")
    parser.add_argument(
        "--engine",
        default=None,
        choices=["auto", "hf", "mlx"],
        help="inference engine (default: params health_check.engine or auto)",
    )
    parser.add_argument(
        "--sentences",
        type=Path,
        help="JSON sentence file (default: seed 5); for transcription the clip file",
    )
    parser.add_argument(
        "--task",
        choices=["translation", "transcription"],
        help="what the model does (default: params models.<model>.task, else translation)",
    )
    parser.add_argument("--latency-limit", type=float, help="seconds per sentence (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _settings(args) -> tuple[str, object, float, str]:
    """Engine kind, sentences, latency limit and task: flags, then --params, then defaults."""
    engine, sentences, limit = args.engine, args.sentences, args.latency_limit
    task = getattr(args, "task", None)
    if args.params:
        from adapter_deploy.config import load_params

        params = load_params(args.params)
        model = params.model(args.model)
        engine = engine or params.health_check.engine
        limit = limit if limit is not None else params.health_check.latency_limit_s
        if sentences is None and model.sentences:
            sentences = params.resolve(model.sentences)
        task = task or model.task
    task = task or "translation"
    load = load_clips if task == "transcription" else load_sentences
    loaded = load(sentences) if sentences else None
    limit = limit if limit is not None else DEFAULT_LATENCY_LIMIT_S
    return engine or "auto", loaded, limit, task


def report(result: HealthResult, model: str) -> None:
    """Human-readable summary on stdout; failing sentences named with expected vs got."""
    verdict = "PASSED" if result.all_passed else "FAILED"
    print(f"[HEALTH] {model}: {verdict}")
    for line in result.failures():
        print(f"[HEALTH] {printable(line)}")  # quotes the model's output
    if result.latency_p50 is not None:
        print(f"[HEALTH] latency p50 {result.latency_p50:.3f} s, p95 {result.latency_p95:.3f} s")


def main(args) -> int:
    engine, sentences, limit, task = _settings(args)
    result = check_release(args.adapter_dir, args.base_model, engine, sentences, limit, task=task)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        report(result, args.model)
    return 0 if result.all_passed else HealthCheckFailed.exit_code


def entry() -> None:
    run(main, build_parser())
