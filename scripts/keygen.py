"""Create the ed25519 signing key on the training machine (make keygen).

Thin entry point: the code is `adapter_deploy.cli.keygen` (--help for usage)."""

from adapter_deploy.cli.keygen import entry

if __name__ == "__main__":
    entry()
