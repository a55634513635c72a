"""Serving a PEFT adapter on a transformers model, with in-place adapter swaps.

Shared by the causal-LM engine (hf_engine) and the Whisper engine: load the base once,
then swap adapters under fresh PEFT adapter names so the old one serves until the new
one has fully landed.

A hot reload is split so that live requests never wait for an adapter's load: `prepare(path)`
reads, hashes, places and checks the new adapter's weights beside the serving one, on any
thread, while the engine keeps translating; `switch()`, run between two requests on the
serving thread, only makes it the active adapter.

Beside the serving adapter the engine keeps one spare: a second PEFT adapter of the same
config (rank, alpha, target modules) that serves nothing. A new release of that config is
copied into the spare's existing tensors (PEFT's `load_adapter` into an adapter that already
exists: no new modules, no allocation that outlives the load), and after a switch the adapter
that served becomes the spare. That keeps both the Python work beside live requests (which
share the GIL with it) and the memory a deploy adds to the size of one adapter file: the
endpoint holds two adapters' tensors at all times, never three. A release of another config
gets a new spare built for it (the old spare is deleted first).

A staged release can be checked beside the serving one (the service's in-service pre-check):
`load_candidate(path)` fills the spare with it (also off the serving thread), `candidate()`
serves with it for the calls made inside (the active adapter is set back after each), and
`drop_candidate()` forgets it. The serving adapter is never touched.

Two locks: `_lock` is held by every call that runs the model (one request at a time);
`_staging` by every change to the set of adapters. Loading a new adapter takes `_staging` only,
so it never waits for a request nor makes one wait; changing which adapter serves takes both.
PEFT's forward pass reads only the active adapters' modules, so adding or deleting another one
beside it is safe while it runs.
"""

from __future__ import annotations

import copy
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
        self._spare: str | None = None  # the PEFT adapter that serves nothing (see above)
        self._candidate: LoadedRelease | None = None  # what the spare holds for a pre-check
        self._prepared: LoadedRelease | None = None  # what the spare holds for switch()
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
            self._spare = None
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
        self._spare = None  # a spare belonged to the model this one replaced
        if not getattr(model, "is_loaded_in_4bit", False):
            self._add_spare(name)

    def _add_spare(self, like: str) -> None:
        """An adapter of `like`'s config beside it that serves nothing, ready to be filled.
        Its initial weights are never served: only a release's weights make it serve."""
        spare = self._next_adapter_name()
        self.model.add_adapter(spare, copy.deepcopy(self.model.peft_config[like]))
        self.model.set_adapter(like)
        self.model.eval()
        self._spare = spare

    def _swap_adapter(self, path: Path) -> None:
        old, name = self.model.active_adapter, self._next_adapter_name()
        self._add_adapter(path, name)
        self.model.set_adapter(name)
        self.model.delete_adapter(old)
        self.model.eval()

    def _fill_spare(self, path: Path) -> None:
        """Load the adapter at `path` into the spare (a new spare when the config differs).
        On failure the spare holds nothing usable, which is fine: it serves nothing."""
        self._prepared = self._candidate = None  # both live in the spare being overwritten
        spare = self._spare
        if spare is not None and not same_config(self.model.peft_config[spare], path):
            self.model.delete_adapter(spare)
            spare = self._spare = None
        if spare is None:
            name = self._next_adapter_name()
            self._add_adapter(path, name)
            self._spare = name
            return
        safetensors_names(path / PEFT_WEIGHTS)
        try:
            fill_adapter(self.model, path, spare)
        except AdapterError:
            raise
        except Exception as err:  # size mismatches (RuntimeError), SafetensorError, ...
            raise AdapterError(
                f"PEFT cannot load {path} ({err})", fix="check the adapter matches the base model"
            ) from err

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
            self._prepared = None
            try:
                release = release or describe_release(adapter_path)
                if self._serving(release):
                    return "noop"
                if self._refusal(release) is not None:
                    return "whole"
                self._fill_spare(Path(release.path))
            except AdapterError as err:
                raise ReloadFailed(
                    f"reload of {adapter_path} failed: {err.one_line()}",
                    fix="the previous release is still serving",
                ) from err
            self._prepared = release
            return "prepared"

    def switch(self) -> LoadedRelease:
        """Serve the prepared release; the adapter that served becomes the spare. No load,
        no disk, no allocation."""
        with self._lock, self._staging:
            if self._prepared is None or self._spare is None:
                raise AdapterError("no release is prepared", fix="prepare() it first")
            release, self._prepared = self._prepared, None
            old = self.model.active_adapter
            self.model.set_adapter(self._spare)
            self._spare = old
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
        """Load the release into the spare on the serving base; it serves nothing yet.
        Runs on any thread: requests go on being answered while it loads."""
        with self._staging:
            self.drop_candidate()
            release = describe_release(adapter_path)
            why = self._refusal(release)
            if why:
                raise NotBeside(f"cannot check {release.version_id} in place: {why}")
            self._fill_spare(Path(release.path))
            self._candidate = release
            return release

    @contextmanager
    def candidate(self) -> Iterator[LoadedRelease]:
        """Serve with the candidate for the calls inside; the active adapter is set back."""
        with self._lock, self._staging:
            if self._candidate is None or self._spare is None:
                raise AdapterError("no candidate is loaded", fix="load_candidate() first")
            release, active = self._candidate, self.model.active_adapter
            self.model.set_adapter(self._spare)
            try:
                yield release
            finally:
                self.model.set_adapter(active)
                self.model.eval()

    def drop_candidate(self) -> None:
        """Forget the candidate (nothing when none is loaded). Its weights stay in the spare,
        which serves nothing, until the next release overwrites them."""
        with self._staging:
            self._candidate = None

    def _next_adapter_name(self) -> str:
        self._adapter_seq += 1  # under _staging
        return f"r{self._adapter_seq}"


#: adapter_config.json fields that do not shape the adapter's tensors or its scaling
_NOT_SHAPING = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def same_config(config: Any, path: Path) -> bool:
    """Whether the adapter saved at `path` has the tensors and scaling of `config`'s adapter
    (then it can be loaded into that adapter's existing tensors)."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        saved = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(str(path))]
        other = saved.from_pretrained(str(path)).to_dict()
    except Exception:  # unreadable or unknown: a new spare's own load reports why
        return False
    ours = config.to_dict()
    for key in _NOT_SHAPING:
        ours.pop(key, None), other.pop(key, None)
    return _plain(ours) == _plain(other)


def _plain(value: Any) -> Any:
    """Config values compared as JSON would hold them (sets and lists of modules alike)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, set | list | tuple):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set) else items
    return value


def fill_adapter(model: Any, path: Path, name: str) -> None:
    """Load the adapter file at `path` into adapter `name`'s existing tensors.

    When the file holds exactly that adapter's tensors under the keys PEFT saves them with (a
    retrain of the same recipe), each is copied straight in: a few Python calls per tensor,
    since this runs beside live requests that share the GIL with it. Anything else goes
    through PEFT's own load into the existing adapter (its key conversions, its report of what
    did not match); a wrongly keyed or partial adapter is refused either way: an unfilled
    tensor would serve the previous release's weights under the new version id.
    """
    if _copy_into(model, path, name):
        return
    result = model.load_adapter(str(path), adapter_name=name)
    # PEFT's own filter of missing keys matches the name as a substring ("r1" in "r12")
    unfilled = [key for key in result.missing_keys if f".{name}." in key]
    stray = list(result.unexpected_keys) + unfilled
    if stray:
        raise AdapterError(
            f"{len(stray)} adapter tensors did not land in the model (e.g. {stray[0]})",
            fix="the adapter was trained for another base model or is wrongly keyed",
        )


def _copy_into(model: Any, path: Path, name: str) -> bool:
    """Copy the file's tensors into adapter `name`'s when the two match key for key and shape
    for shape (checked before anything is written); False (nothing written) otherwise."""
    import torch
    from safetensors import safe_open

    marker = f".{name}."
    slot = {
        key.replace(marker, ".", 1): param
        for key, param in model.named_parameters()
        if marker in key
    }
    with safe_open(str(path / PEFT_WEIGHTS), framework="pt") as saved:
        keys = set(saved.keys())
        if keys != slot.keys() or any(
            tuple(saved.get_slice(key).get_shape()) != tuple(slot[key].shape) for key in keys
        ):
            return False
        with torch.no_grad():
            for key in keys:
                slot[key].copy_(saved.get_tensor(key))
    return True


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
