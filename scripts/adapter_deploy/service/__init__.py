"""The inference service: serves every model with an `active` release, hot reload on SIGUSR1."""
