"""What a compromised endpoint sends back never reaches the operator's terminal, logs, tables,
git or chat as anything but inert text: ids and names in its answers are held to the
deployer's own rules (refused otherwise), and quoted text is escaped."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from adapter_deploy import protocol
from adapter_deploy.cli.render import render
from adapter_deploy.common import logs
from adapter_deploy.common.errors import UntrustedReply
from adapter_deploy.common.names import printable
from adapter_deploy.deploy.alerts import one_line
from adapter_deploy.deploy.records import _commit_message
from fixtures_repo import make_store, run_script, run_script_here, write_params

# What a hostile agent answers: a screen clear, a colour, a forged log line, rich markup.
HOSTILE = "cycle9_20260101_deadbeef\x1b[2J\x1b[31m\n2026-01-01T00:00:00.000Z INFO [link=x]ok[/]"

# A stand-in interpreter for a compromised endpoint: the real agent, with one answer changed.
FAKE_PYTHON = """#!{python}
import runpy, sys
from adapter_deploy.agent import operations

def status(self, req):
    return {{"models": {{"gemma_4b": {{"active_version": {hostile!r}}}}}}}

def hello(self, req):
    view = {{"active": None, "previous": None, "releases": [], "bad": {{}}, "verified": None}}
    return {{"models": {{{hostile!r}: view}}, "free_bytes": 1, "rsync": True}}

operations.EndpointSide.{op} = {op}
sys.argv = ["adapter_deploy.agent", *sys.argv[3:]]
runpy.run_module("adapter_deploy.agent", run_name="__main__", alter_sys=True)
"""


def _hostile_endpoint(tmp_path: Path, op: str) -> Path:
    """A params file with one local endpoint whose agent answers `op` with HOSTILE."""
    store = make_store(tmp_path)
    python = tmp_path / "hostile-python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, hostile=HOSTILE, op=op))
    python.chmod(0o755)
    (tmp_path / "endpoint").mkdir()
    endpoint = {
        "transport": "local",
        "adapter_dir": str(tmp_path / "endpoint"),
        "python": str(python),
        "platform": "cpu",
    }
    return write_params(store.params, store.adapters, {"mac-dev": endpoint})


def _assert_inert(text: str) -> None:
    assert "\x1b" not in text and "\nINFO" not in text and "\n2026-01-01" not in text, text


@pytest.mark.parametrize("op", ["status", "hello"])
def test_status_refuses_an_endpoint_that_answers_with_a_forged_id_or_name(tmp_path, op) -> None:
    params = _hostile_endpoint(tmp_path, op)
    proc = run_script_here("status.py", params=params, cwd=tmp_path)
    _assert_inert(proc.stdout + proc.stderr)
    assert "invalid" in proc.stdout + proc.stderr, proc
    assert proc.returncode == UntrustedReply.exit_code, proc


def test_the_refusal_reaches_a_real_terminal_line_escaped(tmp_path) -> None:
    """One real process: what the operator's terminal receives, byte for byte."""
    params = _hostile_endpoint(tmp_path, "hello")
    proc = run_script("status.py", params=params, cwd=tmp_path)
    _assert_inert(proc.stdout + proc.stderr)
    assert proc.returncode == UntrustedReply.exit_code, proc.stdout + proc.stderr
    assert "invalid model name" in proc.stdout + proc.stderr


def test_reply_check_takes_what_this_project_writes_and_refuses_the_rest() -> None:
    good = {
        "from": "cycle2_20260102_0badcafe",
        "to": None,
        "models": {"gemma_4b": {"releases": ["cycle1_20260101_deadbeef"], "bad": {}}},
        "verified": None,
        "error": "free text is allowed here, and escaped where shown",
    }
    assert protocol.check_reply("ep", good) == good
    for bad in (
        {"to": HOSTILE},
        {"models": {"gemma_4b\x1b[31m": {}}},
        {"models": {"m": {"releases": ["../../etc"]}}},
        {"models": {"m": {"bad": {HOSTILE: "why"}}}},
        {"old": 7},
    ):
        with pytest.raises(UntrustedReply, match="invalid"):
            protocol.check_reply("ep", bad)


def test_log_lines_quote_values_escaped_but_keep_their_own_layout() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "%s said:\n%s", ("ep", HOSTILE), None
    )
    line = logs.TextFormatter().format(record)
    _assert_inert(line)
    assert "said:\ncycle9" in line  # the message's own newline stays, the value's does not
    assert "\\x1b[2J" in line


def test_tables_show_markup_and_escape_codes_as_text() -> None:
    table = render("status", ["endpoint", "note"], [["mac-dev", HOSTILE]])
    _assert_inert(table)
    assert "[link=x]" in table  # shown literally, never a link


def test_git_commit_messages_carry_no_control_characters() -> None:
    entry = {"endpoint": "mac-dev", "status": HOSTILE, "versions": {"gemma_4b": HOSTILE}}
    message = _commit_message("deploy", "run1", [entry, entry])
    _assert_inert(message)
    assert message.count("\n") == 3  # the header, a blank line, one line per endpoint


def test_alert_text_mentions_nobody_and_links_nowhere() -> None:
    error = "mac-dev: boom @everyone <!channel> <@U123> <https://evil.example|click> [x](https://e)"
    alert = {"action": "deploy", "endpoint": "mac-dev", "status": "failed", "phase": "connect"}
    line = one_line({**alert, "error": error + "\x1b[2J\nforged"})
    _assert_inert(line)
    for live in ("@everyone", "<!channel>", "<@U", "<https", "](http", "https://"):
        assert live not in line, (live, line)
    assert "everyone" in line and "evil.example" in line  # still readable


def test_printable_keeps_ordinary_text_and_unicode() -> None:
    assert printable("Dios amó al mundo — ¿verdad?") == "Dios amó al mundo — ¿verdad?"
    assert printable("a\u202eb\tc") == "a\\u202eb\\x09c"
