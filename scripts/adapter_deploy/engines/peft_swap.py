"""Serving a PEFT adapter on a transformers model, with in-place adapter swaps.

Shared by the causal-LM engine (hf_engine) and the Whisper engine: load the base once,
then swap adapters under fresh PEFT adapter names so the old one serves until the new
one has fully landed.

A hot reload is split so that live requests never wait for an adapter's load: `prepare(path)`
reads, hashes, places and checks the new adapter's weights beside the serving one, on any
thread, while the engine keeps translating; `switch()`, run between two requests on the
serving thread, only makes it the active adapter and deletes the old one.

A staged release can be checked beside the serving one (the service's in-service pre-check):
`load_candidate(path)` loads it as a second named adapter on the same base (also off the
serving thread), `candidate()` serves with it for the calls made inside (the active adapter is
set back after each), and `drop_candidate()` deletes it. The serving adapter is never touched.

Two locks: `_lock` is held by every call that runs the model (one request at a time);
`_staging` by every change to the set of adapters. Loading a new adapter takes `_staging` only,
so it never waits for a request nor makes one wait; changing which adapter serves takes both.
PEFT's forward pass reads only the active adapters' modules, so adding or deleting another one
beside it is safe while it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError, ReloadFailed
from adapter_deploy.engines.base import (
    PEFT_WEIGHTS,
    LoadedRelease,
    NotBeside,
    SwappingEngine,
    base_model_of,
    describe_release,
    safetensors_names,
)


class PeftSwapEngine(SwappingEngine):
    """Subclasses give `_load_base(name_or_path) -> (model, companion)` and `_serve(...)`."""

    model: Any
    base_model: str | None
    _adapter_seq: int
    #: (message suffix, fix) for a converted MLX adapter, which transformers cannot load
    mlx_refusal = ("", "use --engine mlx, or the PEFT original with --engine hf")

    def _start(
        self, adapter_path: str | Path | None, base_model: str | Path | None, device: str
    ) -> None:
        """The constructor both engines share: a release on its base, or the base alone."""
        self.device = device
        self.base_model = str(base_model) if base_model else None
        self._lock = threading.RLock()
        self._staging = threading.RLock()
        self._loaded: LoadedRelease | None = None
        self._adapter_seq = 0  # PEFT adapter names "r1", "r2", ...: old and new coexist
        self._candidate: tuple[str, LoadedRelease] | None = None  # (PEFT name, release)
        self._prepared: tuple[str, LoadedRelease] | None = None  # loaded, not serving yet
        self.model = None
        if adapter_path is not None:
            self._load(describe_release(adapter_path))
        elif self.base_model:
            self._serve(*self._load_base(self.base_model))
        else:
            raise AdapterError("no adapter and no base model given", fix="pass one of them")

    @property
    def loaded(self) -> LoadedRelease | None:
        return self._loaded

    def _load_base(self, name_or_path: str) -> tuple[Any, Any]:
        raise NotImplementedError

    def _serve(self, model: Any, companion: Any) -> None:
        raise NotImplementedError

    def _load(self, release: LoadedRelease) -> None:
        """Load `release`; only on success does it replace what is serving."""
        path = Path(release.path)
        if release.kind == "mlx":
            raise AdapterError(
                f"{path} is a converted MLX adapter{self.mlx_refusal[0]}", fix=self.mlx_refusal[1]
            )
        if release.kind == "merged":
            self._serve(*self._load_base(str(path)))
        elif self._loaded is not None and self._loaded.kind == "peft":
            self._swap_adapter(path)
        else:
            self._load_peft(path)
        self._loaded = release

    def _load_peft(self, path: Path) -> None:
        from peft import PeftModel

        safetensors_names(path / PEFT_WEIGHTS)
        base = self.base_model or base_model_of(path, None)
        model, companion = self._load_base(base)
        name = self._next_adapter_name()
        try:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        except Exception as err:  # PEFT raises ValueError/KeyError/SafetensorError/...
            raise AdapterError(
                f"PEFT cannot load {path} ({err})", fix="check the adapter matches the base model"
            ) from err
        check_landed(model, path, name)
        self._serve(model.eval(), companion)
        self.base_model = base

    def _swap_adapter(self, path: Path) -> None:
        old, name = self.model.active_adapter, self._next_adapter_name()
        self._add_adapter(path, name)
        self.model.set_adapter(name)
        self.model.delete_adapter(old)
        self.model.eval()

    def _add_adapter(self, path: Path, name: str) -> None:
        """Load the adapter at `path` as `name` beside the others; it does not serve yet."""
        safetensors_names(path / PEFT_WEIGHTS)
        try:
            self.model.load_adapter(str(path), adapter_name=name)
            check_landed(self.model, path, name)
        except Exception as err:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            if isinstance(err, AdapterError):
                raise
            raise AdapterError(
                f"PEFT cannot load {path} ({err})", fix="check the adapter matches the base model"
            ) from err
        self.model.eval()

    # --- a reload in two steps: load beside (any thread), then switch (between requests) ---
    def prepare(self, adapter_path: str | Path, release: LoadedRelease | None = None) -> str:
        """Load the release beside the serving adapter without holding up a request.

        "noop": it is already serving; "prepared": loaded and checked, `switch()` makes it
        serve; "whole": it needs a whole model load (merged, a first adapter on a bare base,
        bitsandbytes), which `reload()` does. A release that fails to load raises
        ReloadFailed and leaves nothing behind. `release`: the path already described (its
        sha256 computed once by the caller)."""
        with self._staging:
            self._discard_prepared()
            try:
                release = release or describe_release(adapter_path)
                if self._serving(release):
                    return "noop"
                if self._refusal(release) is not None:
                    return "whole"
                name = self._next_adapter_name()
                self._add_adapter(Path(release.path), name)
            except AdapterError as err:
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous release is still serving",
                ) from err
            self._prepared = (name, release)
            return "prepared"

    def switch(self) -> LoadedRelease:
        """Serve the prepared release and delete the old adapter: no load, no disk."""
        with self._lock, self._staging:
            if self._prepared is None:
                raise AdapterError("no release is prepared", fix="prepare() it first")
            (name, release), self._prepared = self._prepared, None
            old = self.model.active_adapter
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
            self._loaded = release
        logging.getLogger(type(self).__module__).info(
            "reloaded %s (%s)", release.version_id, release.sha256[:8]
        )
        return release

    def reload(self, adapter_path: str | Path) -> bool:
        """Swap in the release at `adapter_path`; False when it is already loaded."""
        state = self.prepare(adapter_path)
        if state == "prepared":
            self.switch()
            return True
        if state == "noop":
            return False
        with self._lock, self._staging:
            return super().reload(adapter_path)

    def _serving(self, release: LoadedRelease) -> bool:
        loaded = self._loaded
        return loaded is not None and (loaded.path, loaded.sha256) == (
            release.path,
            release.sha256,
        )

    def _discard_prepared(self) -> None:
        if self._prepared is not None:
            name, _ = self._prepared
            self._prepared = None
            if name in self.model.peft_config:
                self.model.delete_adapter(name)

    # --- a candidate beside the serving adapter (the in-service pre-check) ---------------
    def candidate_refusal(self, adapter_path: str | Path) -> str | None:
        """Why the release cannot be checked beside the serving one (None: it can)."""
        return self._refusal(describe_release(adapter_path))

    def _refusal(self, release: LoadedRelease) -> str | None:
        kind = release.kind
        if kind != "peft":
            return f"a {kind} release needs its own model, not an adapter on this one's base"
        if self._loaded is None or self._loaded.kind != "peft" or self.model is None:
            return "this engine serves no PEFT adapter to load a candidate beside"
        if getattr(self.model, "is_loaded_in_4bit", False):
            return "a bitsandbytes model is checked in a separate process"
        return None

    def load_candidate(self, adapter_path: str | Path) -> LoadedRelease:
        """Load the release as a second adapter on the serving base; it serves nothing yet.
        Runs on any thread: requests go on being answered while it loads."""
        with self._staging:
            self.drop_candidate()
            release = describe_release(adapter_path)
            why = self._refusal(release)
            if why:
                raise NotBeside(f"cannot check {release.version_id} in place: {why}")
            self._adapter_seq += 1
            name = f"c{self._adapter_seq}"
            self._add_adapter(Path(release.path), name)
            self._candidate = (name, release)
            return release

    @contextmanager
    def candidate(self) -> Iterator[LoadedRelease]:
        """Serve with the candidate for the calls inside; the active adapter is set back."""
        with self._lock, self._staging:
            if self._candidate is None:
                raise AdapterError("no candidate is loaded", fix="load_candidate() first")
            name, release = self._candidate
            active = self.model.active_adapter
            self.model.set_adapter(name)
            try:
                yield release
            finally:
                self.model.set_adapter(active)
                self.model.eval()

    def drop_candidate(self) -> None:
        """Delete the candidate adapter (nothing when none is loaded). It is not serving, so
        this needs no turn on the serving thread."""
        with self._staging:
            if self._candidate is not None:
                name, _ = self._candidate
                self._candidate = None
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)

    def _next_adapter_name(self) -> str:
        self._adapter_seq += 1  # under _staging
        return f"r{self._adapter_seq}"


def check_landed(model: Any, path: Path, name: str) -> None:
    """Every tensor in the adapter file must now be a parameter of adapter `name`.

    PEFT only warns about keys it could not place; a wrongly keyed adapter would otherwise
    serve the base model's answers under a new version id.
    """
    import torch
    from safetensors.torch import load_file

    state = model.state_dict()
    missing = []
    for key, tensor in load_file(str(path / PEFT_WEIGHTS)).items():
        target = key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}.")
        landed = state.get(target)
        if landed is None or not torch.equal(landed.to("cpu", tensor.dtype), tensor):
            missing.append(key)
    if missing:
        raise AdapterError(
            f"{len(missing)} adapter tensors did not land in the model (e.g. {missing[0]})",
            fix="the adapter was trained for another base model or is wrongly keyed",
        )
