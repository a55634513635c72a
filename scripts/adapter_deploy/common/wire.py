"""The deploy protocol's version, alone in an import-free module: the endpoint's shell asks
its python for it (`python -c`) before the deployer's early rsync lands anything, and that
must cost no more than the interpreter's start. adapter_deploy.protocol says what it means."""

PROTOCOL_VERSION = 5
