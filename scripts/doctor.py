"""Would a deploy work? A live preflight of each endpoint, one row per check.

Thin entry point: the code is `adapter_deploy.cli.doctor` (--help for usage)."""

from adapter_deploy.cli.doctor import entry

if __name__ == "__main__":
    entry()
