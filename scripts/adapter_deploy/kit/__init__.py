"""Test kits: tiny real models and PEFT adapters built locally (no downloads).

Used by the tests, the benchmarks and `make demo`; never shipped to endpoints.
"""
