"""Threads that ran MLX clear their streams before they end.

MLX 0.32 leaves a thread's streams to the program; one left at exit aborts the process now and
then ("terminate called without an active exception", exit -6) after its work succeeded: about
1 stop in 10 of an MLX service here. The abort itself is a race, so these tests check the
cause deterministically: which threads clear their streams, recorded by a stand-in for
`mlx.core` (the real clear_streams is run by every MLX service test's clean stop).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import types

import pytest
from adapter_deploy.service.state import Control, Service, ServiceConfig


@pytest.fixture
def cleared(monkeypatch) -> list[str]:
    """Names of the threads that called mlx.core.clear_streams()."""
    names: list[str] = []
    stub = types.SimpleNamespace(
        clear_streams=lambda: names.append(threading.current_thread().name)
    )
    monkeypatch.setitem(sys.modules, "mlx.core", stub)
    return names


def test_a_stopping_service_clears_the_engine_threads_streams(cleared, tmp_path):
    service = Service(ServiceConfig(adapter_dir=tmp_path), Control())
    engine_thread = service.executor.submit(lambda: threading.current_thread().name).result()
    service.close()
    assert engine_thread in cleared


def test_every_process_that_loads_the_runner_clears_the_main_threads_streams_at_exit():
    """At exit, not when run() returns: MLX on a thread fails once its streams are cleared, and
    a process may go on after run() (a test, a script calling another's main)."""
    probe = (
        "import sys, threading, types\n"
        "stub = lambda: print('cleared on', threading.current_thread().name)\n"
        "sys.modules['mlx.core'] = types.SimpleNamespace(clear_streams=stub)\n"
        "import adapter_deploy.common.runner\n"
        "print('work done')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["work done", "cleared on MainThread"]
