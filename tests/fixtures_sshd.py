"""The session-wide real sshd on 127.0.0.1 (adapter_deploy.kit.sshd) as a pytest fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from adapter_deploy.kit.sshd import SSHD, SSHServer, running_sshd


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    if not os.path.exists(SSHD):
        pytest.fail("sshd missing: apt-get install openssh-server (see .ci/run)")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
