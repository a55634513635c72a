"""Fuzzing the safetensors validator: it only ever reports problems (never raises), stays
within time and memory bounds, and whatever it accepts the safetensors library loads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from adapter_deploy.common.adapter import safetensors_problems
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

FUZZ = settings(
    max_examples=150,
    deadline=500,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID = save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)})


def _check(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    problems = safetensors_problems(path)  # must not raise
    assert isinstance(problems, list)
    if not problems:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                f.get_tensor(key)
    return problems


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    _check(tmp_path, data)


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_one_byte_flipped(tmp_path: Path, position: int, value: int) -> None:
    data = bytearray(VALID)
    data[position] = value
    _check(tmp_path, bytes(data))


header_entries = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I8", "BOGUS", 7]),
            "shape": st.lists(st.integers(-2, 5), max_size=3),
            "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3),
        }
    ),
    max_size=4,
)


@FUZZ
@given(header_entries, st.binary(max_size=64), st.integers(-8, 8))
def test_structured_headers(tmp_path: Path, header: dict, body: bytes, skew: int) -> None:
    raw = json.dumps(header).encode()
    length = max(0, len(raw) + skew)
    _check(tmp_path, struct.pack("<Q", length) + raw + body)


def test_huge_declared_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    problems = _check(tmp_path, struct.pack("<Q", 1 << 62) + b"{}")
    assert problems and "exceeds the file" in problems[0]
