"""gguf-lora's base: sent, staged and checked once per endpoint, before the LoRA on it.

The base is a release of `<model>-gguf-base` on the endpoint (convert/gguf_lora.py): it travels
and is verified by sha256 like any release, then passes its own pre-check, load + generate (its
`generate.json`: plain inputs, any non-empty answer passes; a base alone is not expected to
translate the adapter's sentences), and is recorded as verified. It is never activated, so no
service serves it as a model of its own; each LoRA release names it by version id. An endpoint
that holds it verified already gets nothing sent: every later cycle ships only the LoRA. It is
staged every time all the same, as any present release is: the endpoint re-checks its files
(a damaged copy is sent again and checked again) and, where it trusts a key, its signature
(a base staged before `make trust`, or signed by a key since removed, is signed now).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapter_deploy import protocol as p
from adapter_deploy.common.errors import HealthCheckFailed
from adapter_deploy.convert.gguf_lora import GENERATE_CHECK
from adapter_deploy.deploy.plan import ModelOutcome, Release, engine_kind

if TYPE_CHECKING:
    from adapter_deploy.deploy.steps import EndpointRun


def ensure_base(run: EndpointRun, base: Release, out: ModelOutcome) -> bool:
    """The base on the endpoint, verified; False (and `out` aborted) when it fails its check.
    Runs after the LoRA's transfer: the bytes it sends add to that figure."""
    assert run.session
    view = run.session.call(p.Hello(models=[base.model]))["models"][base.model]
    kept = base.version_id in view["releases"] and base.version_id not in view["bad"]
    verified = kept and view.get("verified") == base.version_id
    sent = ModelOutcome(base.model, base.version_id)
    staged = run.transfer(base, sent)  # never skipped: Stage is where its signature is checked
    out.bytes_sent += sent.bytes_sent
    if verified and staged == "present":
        run.say(base.model, "base", f"{base.version_id} already verified ({sent.bytes_sent} B)")
        return True
    result = run.session.call(
        p.Health(
            model=base.model,
            version_id=base.version_id,
            base_model=None,
            engine=engine_kind(run.params, run.ep),
            latency_limit=run.params.health_check.latency_limit_s,
            sentences=_check_file(run, base),
        )
    )
    out.health["base_pre_activation"] = result
    if not result["all_passed"]:
        failures = [f"{r['input']!r}: {r['reason']}" for r in result.get("results", [])
                    if not r["passed"]]  # fmt: skip
        reason = result.get("error") or "; ".join(failures)
        out.status, out.exit_code = "aborted", HealthCheckFailed.exit_code
        out.error = f"GGUF base {base.version_id} failed its load + generate check: {reason}"
        return False
    run.session.call(p.Record(model=base.model, verified=base.version_id, health_status="healthy"))
    out.phases.append("base")
    run.say(base.model, "base", f"{base.version_id} verified (load + generate)")
    return True


def _check_file(run: EndpointRun, base: Release) -> str:
    """The base release's own generation check, as a path on the endpoint."""
    release = f"{run.ep.adapter_dir.rstrip('/')}/{base.model}/releases/{base.version_id}"
    return run.conn.remote_path(f"{release}/{GENERATE_CHECK}")
