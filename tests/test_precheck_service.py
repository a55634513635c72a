"""PRE-CHECK inside the running service (issue #28): the staged release is loaded beside the
active adapter on the service's own base over its control socket, live requests keep their
release, the shadow replay counts changed live answers, and without a service it falls back
to a separate process. A real service process on the tiny kit model (test_serve's Service),
once with the transformers engine (PEFT: a second named adapter) and once with MLX (mlx[cpu]:
the candidate's weights put into the serving LoRA layers for its check sentences only).
"""

from __future__ import annotations

import json
import stat
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from adapter_deploy.agent.precheck import precheck
from adapter_deploy.engines.control_client import CONTROL_SOCKET
from adapter_deploy.engines.service_client import service_status
from adapter_deploy.kit.net import free_port
from test_serve import JAMES, V1, V2, Service, add_release, flip

REGRESSED = "cycle3_20260103_dddddddd"
GOOD_MORNING = "Good morning, welcome to the service."


@pytest.fixture(scope="module", params=["cpu", "mlx"])
def svc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Any:
    """gemma_4b: V1 (good) active, V2 (good2) and REGRESSED staged; the service serves V1."""
    tmp = tmp_path_factory.mktemp(f"precheck-{request.param}")
    model_dir = tmp / "adapters" / "gemma_4b"
    add_release(model_dir, V1, kit.good)
    add_release(model_dir, V2, kit.good2)
    add_release(model_dir, REGRESSED, kit.regressed)
    flip(model_dir, V1)
    args = ["--adapter-dir", str(tmp / "adapters"), "--models", "gemma_4b"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--platform", request.param]
    args += ["--shadow-inputs", "5"]
    service = Service(tmp, args, free_port())
    service.wait(200)
    service.tmp, service.model_dir = tmp, model_dir
    yield service
    service.stop()


def live(svc: Service, text: str) -> tuple[str, str]:
    """One live /translate: (its X-Adapter-Version header, the answer's text)."""
    body = json.dumps({"model": "gemma_4b", "text": text}).encode()
    request = urllib.request.Request(
        svc.url + "/translate", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.headers["X-Adapter-Version"], json.loads(answer.read())["text"]


def check(svc: Service, version_id: str, adapter_dir: Path | None = None) -> dict[str, Any]:
    return precheck(
        adapter_dir or svc.model_dir.parent,
        "gemma_4b",
        svc.model_dir / "releases" / version_id,
        None,
        base_model=None,
        engine="hf",
        latency_limit=30.0,
        task="translation",
        in_service=True,
    )


def test_control_socket_is_private(svc: Service) -> None:
    mode = (svc.model_dir.parent / CONTROL_SOCKET).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_service_started_before_the_first_deploy_still_listens_for_pre_checks(
    tmp_path: Path, kit: Any
) -> None:
    """The demo and a fresh endpoint start the service before any deploy made its adapter
    dir: the socket must be there anyway, or every pre-check runs in a second process."""
    adapters = tmp_path / "not-yet" / "adapters"
    args = ["--adapter-dir", str(adapters), "--base-model", f"gemma_4b={kit.base}"]
    service = Service(tmp_path, [*args, "--platform", "cpu"], free_port())
    try:
        service.wait(200)
        mode = (adapters / CONTROL_SOCKET).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        assert service.stop() == 0, service.log.read_text()[-4000:]


def test_precheck_runs_in_the_service_and_replays_live_inputs(svc: Service) -> None:
    before = service_status(svc.url)
    for text in (JAMES, GOOD_MORNING, JAMES):
        assert live(svc, text)[0] == V1
    result = check(svc, V2)
    assert result["via"] == "service" and result["all_passed"], result
    assert result["release"]["version_id"] == V2
    after = service_status(svc.url)
    # no second base: no engine was built for the check, and V1 still serves
    assert after["base_loads"] == before["base_loads"] == 1
    assert after["models"]["gemma_4b"]["version_id"] == V1
    shadow = result["shadow"]
    assert shadow["active_version"] == V1 and shadow["compared"] >= 3
    # good2 answers James with "Jacobo" where good says "Santiago": those answers changed
    assert shadow["changed"] >= 2 and len(shadow["worst"]) <= 3
    worst = shadow["worst"][0]
    assert worst["input"] == JAMES and "Jacobo" in worst["candidate_output"]
    assert "Santiago" in live(svc, JAMES)[1]  # the candidate was dropped: V1 answers


def test_regressed_candidate_fails_while_live_requests_keep_the_active_release(svc) -> None:
    headers, stop = [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            headers.append(live(svc, JAMES))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result = check(svc, REGRESSED)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result["via"] == "service" and not result["all_passed"]
    failed = [r["input"] for r in result["results"] if not r["passed"]]
    assert failed == [JAMES]
    assert len(headers) >= 2
    assert all(version == V1 and "Santiago" in text for version, text in headers)
    assert service_status(svc.url)["base_loads"] == 1


@pytest.mark.parametrize("svc", ["cpu"], indirect=True)
def test_without_a_control_socket_it_runs_in_a_process(svc: Service, tmp_path: Path) -> None:
    result = check(svc, V2, adapter_dir=tmp_path)  # no service listens there
    assert result["via"] == "process" and result["all_passed"], result
    assert "control socket" in result["via_reason"] and "shadow" not in result
