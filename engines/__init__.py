"""Inference side of Adapter Deploy: engines, the adapter format conversion and the test kit.

- `engines.base`: the Engine protocol, `Translation`, `LoadedRelease`, adapter-dir helpers.
- `engines.hf_engine`: transformers + PEFT (CPU here, CUDA where present).
- `engines.mlx_engine`: `MLXGemmaEngine` on mlx-lm (Mac, and Linux CPU via `mlx[cpu]`).
- `engines.convert_mlx`: PEFT -> MLX adapter conversion.
- `engines.factory`: an engine by platform / kind.
- `engines.testkit`: tiny real models and adapters built locally (no downloads).
"""

import importlib.util
import sys
from pathlib import Path

# The shared core package lives in scripts/deploycore. When the project is not pip-installed
# (a checkout on an endpoint, `python -m engines.testkit`), make it importable from here.
if importlib.util.find_spec("deploycore") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
