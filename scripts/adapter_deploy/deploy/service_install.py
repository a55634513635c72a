"""The inference service as the endpoint's own service manager runs it (install and forget).

- NVIDIA / Linux (`platform: cuda` or `cpu`): a systemd **user** unit,
  `~/.config/systemd/user/adapter-serve.service`. A user unit is restarted by the ssh user
  itself (`systemctl --user restart adapter-serve`: no root, no sudoers line, no polkit
  prompt), and with lingering (`loginctl enable-linger`, once) it starts at boot without a
  login. `ExecReload` sends SIGUSR1, so `systemctl --user reload adapter-serve` is the hot
  reload.
- Mac (`platform: mlx`): a launchd agent, `~/Library/LaunchAgents/<LAUNCHD_LABEL>.plist`,
  with RunAtLoad and KeepAlive (back after a reboot and after a crash) and its output in a log
  file; `reload_method: sigusr1` signals the pid in `pidfile` as before.

Both run `<python> -m adapter_deploy.service --params <project_dir>/params.yaml --endpoint
<name>` from the project `make bootstrap` installed.

Every value written into the unit is escaped for systemd: `%` becomes `%%`, so a path such as
`/srv/proj%h` stays that literal path instead of a specifier systemd expands (`%h` is the
user's home: another interpreter would run). The launchd plist is XML written by plistlib,
which escapes `&`, `<` and `>`; launchd expands nothing in ProgramArguments.
"""

from __future__ import annotations

import plistlib
import shlex
from dataclasses import dataclass, field

from adapter_deploy.common.errors import UsageError
from adapter_deploy.config import DEFAULT_RESTART_COMMAND, SERVICE_UNIT, EndpointParams

UNIT_FILE = f"{SERVICE_UNIT}.service"
LAUNCHD_LABEL = "org.adapter-deploy.serve"


@dataclass(frozen=True)
class ServiceFiles:
    """What `make service-install` puts on one endpoint and the commands that start it."""

    kind: str  # systemd | launchd
    directory: str  # where the file goes on the endpoint (~ is the ssh user's home)
    filename: str
    text: str
    start: list[list[str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{self.directory.rstrip('/')}/{self.filename}"


def service_command(name: str, ep: EndpointParams) -> list[str]:
    """The service's argv on the endpoint, from the project `make bootstrap` installed."""
    project = _project_dir(name, ep)
    python = ep.python or f"{project}/.venv/bin/python"
    _absolute(name, "python", python)
    return [
        python,
        "-m",
        "adapter_deploy.service",
        "--params",
        f"{project}/params.yaml",
        "--endpoint",
        name,
    ]


def service_files(name: str, ep: EndpointParams) -> ServiceFiles:
    """The unit (Linux) or launchd agent (Mac) for endpoint `name`."""
    if ep.platform == "mlx":
        return _launchd(name, ep)
    return _systemd(name, ep)


def _project_dir(name: str, ep: EndpointParams) -> str:
    if not ep.project_dir:
        raise UsageError(f"{name} has no project_dir", "set project_dir in params.yaml")
    if ep.project_dir.startswith("~"):
        # systemd and launchd do not expand ~; the files name absolute paths.
        raise UsageError(
            f"{name}: project_dir {ep.project_dir} starts with ~",
            "give project_dir (and python) as absolute paths for the service files",
        )
    _absolute(name, "project_dir", ep.project_dir)
    return ep.project_dir.rstrip("/")


def _absolute(name: str, key: str, path: str) -> None:
    # A relative path means nothing to a service manager, and systemd reads a leading
    # @ + - : ! of ExecStart as a prefix that changes how the command runs.
    if not path.startswith("/"):
        raise UsageError(
            f"{name}: {key} {path} is not an absolute path",
            "give project_dir (and python) as absolute paths for the service files",
        )


def systemd_value(value: str) -> str:
    """`value` as systemd reads it back literally: its `%` specifiers escaped as `%%`."""
    return value.replace("%", "%%")


def _systemd(name: str, ep: EndpointParams) -> ServiceFiles:
    project = systemd_value(_project_dir(name, ep))
    exec_start = systemd_value(shlex.join(service_command(name, ep)))
    text = f"""\
# Adapter Deploy inference service for endpoint {name}: a systemd user unit.
# Installed by `make service-install ENDPOINT={name}` to ~/.config/systemd/user/.
# Lingering (`loginctl enable-linger`, once, as root if polkit asks) starts it at boot.
# params.yaml: reload_method: restart (default restart_command:
#   [{", ".join(DEFAULT_RESTART_COMMAND)}]); `systemctl --user reload {SERVICE_UNIT}` hot-reloads.
[Unit]
Description=Adapter Deploy inference service ({systemd_value(name)})
After=network-online.target

[Service]
Type=simple
WorkingDirectory={project}
ExecStart={exec_start}
ExecReload=/bin/kill -USR1 $MAINPID
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=default.target
"""
    start = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT_FILE],
    ]
    directory = ep.service_dir or "~/.config/systemd/user"
    return ServiceFiles("systemd", directory, UNIT_FILE, text, start)


def _launchd(name: str, ep: EndpointParams) -> ServiceFiles:
    project = _project_dir(name, ep)
    log = f"{project}/logs/adapter-serve.log"
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": service_command(name, ep),
        "WorkingDirectory": project,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 5,
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "ProcessType": "Interactive",  # the live translation must not be throttled
    }
    return _launch_agent(agent, ep, project)


def _launch_agent(agent: dict, ep: EndpointParams, project: str) -> ServiceFiles:
    """A launchd agent's plist (named after its Label) and the lines that (re)load it."""
    label = agent["Label"]
    plist = f"{label}.plist"
    directory = ep.service_dir or "~/Library/LaunchAgents"
    start = [
        ["mkdir", "-p", f"{project}/logs"],
        # bootout fails when it is not loaded yet: `|| true` in the shell line below.
        ["launchctl", "bootout", f"gui/$(id -u)/{label}"],
        ["launchctl", "bootstrap", "gui/$(id -u)", f"{directory.rstrip('/')}/{plist}"],
    ]
    text = plistlib.dumps(agent, sort_keys=True).decode()
    return ServiceFiles("launchd", directory, plist, text, start)


PULL_UNIT = "adapter-pull"
PULL_LABEL = "org.adapter-deploy.pull"


def pull_command(name: str, ep: EndpointParams, jitter_s: float = 0.0) -> list[str]:
    """`make pull` for endpoint `name` as its timer runs it."""
    project = _project_dir(name, ep)
    python = ep.python or f"{project}/.venv/bin/python"
    _absolute(name, "python", python)
    argv = [python, f"{project}/scripts/pull.py", "--params", f"{project}/params.yaml"]
    argv += ["--endpoint", name]
    return argv + (["--jitter", f"{jitter_s:g}"] if jitter_s else [])


def pull_timer_files(name: str, ep: EndpointParams) -> list[ServiceFiles]:
    """A pulling endpoint's timer: `make pull` every `pull.interval_s` (default 5 minutes),
    spread by a random delay so a fleet does not hit the remotes at the same second. A pull
    the timer starts while another runs exits at once (the pull lock), so a manual
    `make pull` never races it."""
    interval = round(ep.pull.interval_s if ep.pull else 300.0)
    jitter = min(60, interval // 5)
    if ep.platform == "mlx":  # launchd has no random delay of its own: pull.py sleeps first
        project = _project_dir(name, ep)
        log = f"{project}/logs/adapter-pull.log"
        agent = {
            "Label": PULL_LABEL,
            "ProgramArguments": pull_command(name, ep, jitter),
            "WorkingDirectory": project,
            "RunAtLoad": True,
            "StartInterval": interval,
            "StandardOutPath": log,
            "StandardErrorPath": log,
        }
        return [_launch_agent(agent, ep, project)]
    project = systemd_value(_project_dir(name, ep))
    service = f"""\
# Adapter Deploy pull for endpoint {name}: one `make pull`, started by {PULL_UNIT}.timer.
# Installed by `make service-install ENDPOINT={name}` to ~/.config/systemd/user/.
[Unit]
Description=Adapter Deploy pull ({systemd_value(name)})
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={project}
ExecStart={systemd_value(shlex.join(pull_command(name, ep)))}
"""
    timer = f"""\
# Adapter Deploy pull timer for endpoint {name}: every {interval} s, spread by up to {jitter} s.
[Unit]
Description=Adapter Deploy pull timer ({systemd_value(name)})

[Timer]
OnBootSec=60
OnUnitActiveSec={interval}
RandomizedDelaySec={jitter}
Unit={PULL_UNIT}.service

[Install]
WantedBy=timers.target
"""
    directory = ep.service_dir or "~/.config/systemd/user"
    start = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", f"{PULL_UNIT}.timer"],
    ]
    return [
        ServiceFiles("systemd", directory, f"{PULL_UNIT}.service", service),
        ServiceFiles("systemd", directory, f"{PULL_UNIT}.timer", timer, start),
    ]


def start_script(files: ServiceFiles) -> str:
    """The shell line that starts the installed service (run on the endpoint over ssh)."""
    lines = []
    for argv in files.start:
        line = " ".join(a if "$(" in a else shlex.quote(a) for a in argv)
        if argv[:2] == ["launchctl", "bootout"]:
            line += " 2>/dev/null || true"
        lines.append(line)
    return " && ".join(lines)
