"""llama.cpp's converter runs only as the bytes the repository pins (issue #27, hole 3): the
sdist by its sha256, the extracted tree by the sha256 of its file list, every file checked
before each run. Fake trees and sdists in tmp_path; the real sdist where it is cached."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from adapter_deploy.common.errors import TamperedTool
from adapter_deploy.convert import converter_tree, gguf
from fixtures_repo import ROOT

# A converter that does what the real one must (imports its gguf-py, writes --outfile) and
# says where it ran from.
SCRIPT = """import sys
from pathlib import Path
import gguf
out = Path(sys.argv[sys.argv.index("--outfile") + 1])
out.write_text(gguf.NAME + " " + str(Path(__file__).resolve().parent))
"""
# What a planted file does when it runs: leave a marker.
PLANT = "from pathlib import Path; Path({marker!r}).write_text('pwned')\n"


def _hashes(tree: Path) -> dict[str, str]:
    return {
        str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tree.rglob("*"))
        if p.is_file() and p.name != converter_tree.CONVERTER_INFO
    }


def _write_record(tree: Path, files: dict[str, str]) -> None:
    record = {"llama-cpp-python": converter_tree.LLAMA_CPP_VERSION, "llama.cpp": "c" * 40}
    (tree / converter_tree.CONVERTER_INFO).write_text(json.dumps({**record, "files": files}))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A genuine (fake) converter tree, its file list pinned, named by the env var."""
    root = tmp_path / "llama.cpp"
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / gguf.CONVERTER_SCRIPT).write_text(SCRIPT)
    (root / "gguf-py" / "gguf" / "__init__.py").write_text('NAME = "genuine gguf-py"\n')
    (root / "gguf-py" / "pyproject.toml").write_text('[project]\nversion = "0.17.1"\n')
    files = _hashes(root)
    _write_record(root, files)
    monkeypatch.setattr(converter_tree, "FILES_SHA256", converter_tree.files_digest(files))
    monkeypatch.setenv(gguf.CONVERTER_ENV, str(root))
    return root


def _run(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir(exist_ok=True)
    gguf.run_converter(
        gguf.CONVERTER_SCRIPT,
        ["--outfile", str(out)],
        tool="llama.cpp's converter",
        source=tmp_path,
        out_file=out,
        cwd=out.parent,
        fix="-",
    )
    return out


def test_the_genuine_tree_runs_from_a_checked_private_copy(tree: Path, tmp_path: Path) -> None:
    out = _run(tmp_path)
    name, ran_from = out.read_text().rsplit(" ", 1)
    assert name == "genuine gguf-py"
    assert Path(ran_from) != tree.resolve() and not Path(ran_from).exists()  # removed after
    assert gguf.tools_available("F16")
    info = gguf.converter_info()
    assert info == {"llama-cpp-python": "0.3.36", "llama.cpp": "c" * 40, "gguf-py": "0.17.1"}


def test_the_runner_takes_relative_paths(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative to our working directory, not the converter's (it runs in `cwd`)."""
    monkeypatch.chdir(tmp_path)
    out = Path("out") / "model.gguf"
    out.parent.mkdir()
    gguf.run_converter(
        gguf.CONVERTER_SCRIPT,
        ["--outfile", out],
        tool="llama.cpp's converter",
        source=Path("."),
        out_file=out,
        cwd=out.parent,
        fix="-",
    )
    assert (tmp_path / "out" / "model.gguf").read_text().startswith("genuine gguf-py")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]


# A LoRA converter that writes what it was given: the paths, whether they are there for it.
LORA_SCRIPT = """import json, sys
from pathlib import Path
args = sys.argv[1:]
paths = [args[args.index("--base") + 1], args[-1]]
seen = {"paths": paths, "dirs": [Path(p).is_dir() for p in paths]}
Path(args[args.index("--outfile") + 1]).write_text(json.dumps(seen))
"""


def test_convert_lora_takes_relative_paths(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter_deploy.convert.gguf_lora import LORA_CONVERTER_SCRIPT, convert_lora

    (tree / LORA_CONVERTER_SCRIPT).write_text(LORA_SCRIPT)
    files = _hashes(tree)
    _write_record(tree, files)
    monkeypatch.setattr(converter_tree, "FILES_SHA256", converter_tree.files_digest(files))
    base = tmp_path / "base"  # what check_supported asks of a Gemma 3 base
    base.mkdir()
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    (base / "config.json").write_text(json.dumps(config))
    (base / gguf.SENTENCEPIECE_MODEL).write_bytes(b"sp")
    (base / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path)
    target = convert_lora(Path("adapter"), Path("base"), Path("cache/lora"), {"key": "k"})
    assert target == tmp_path / "cache" / "lora" / "adapter.gguf"
    seen = json.loads(target.read_text())
    assert seen["paths"] == [str(base), str(tmp_path / "adapter")] and seen["dirs"] == [True] * 2
    assert json.loads((tmp_path / "cache" / "lora" / "base.json").read_text()) == {"key": "k"}


@pytest.mark.parametrize("changed", [gguf.CONVERTER_SCRIPT, "gguf-py/gguf/__init__.py"])
def test_a_changed_converter_file_is_refused_before_anything_runs(
    tree: Path, tmp_path: Path, changed: str
) -> None:
    marker = tmp_path / "planted-code-ran"
    path = tree / changed
    path.write_text(PLANT.format(marker=str(marker)) + path.read_text())
    with pytest.raises(TamperedTool) as refused:
        _run(tmp_path)
    line = refused.value.one_line()
    assert str(path) in line and "make gguf-tools" in line and "nothing was run" in line
    assert refused.value.exit_code == 2
    assert not marker.exists() and not (tmp_path / "out" / "model.gguf").exists()
    assert not gguf.tools_available("F16") and gguf.converter_info() is None
    with pytest.raises(TamperedTool):
        gguf.check_tools("F16")


def test_a_planted_converter_json_cannot_claim_new_hashes(tree: Path, tmp_path: Path) -> None:
    """Whoever can write the tree rewrites the converter and converter.json to match, claiming
    the genuine version: the list's sha256 is not the repository's pin."""
    marker = tmp_path / "planted-code-ran"
    script = tree / gguf.CONVERTER_SCRIPT
    script.write_text(PLANT.format(marker=str(marker)) + SCRIPT)
    _write_record(tree, _hashes(tree))
    with pytest.raises(TamperedTool) as refused:
        _run(tmp_path)
    line = refused.value.one_line()
    assert "lists other converter files" in line and "make gguf-tools" in line
    assert not marker.exists()
    with pytest.raises(TamperedTool):
        gguf.check_tools("F16")


def test_a_tree_recorded_without_file_hashes_is_refused(tree: Path, tmp_path: Path) -> None:
    """What `make gguf-tools` wrote before converters were checked: extract it again."""
    (tree / converter_tree.CONVERTER_INFO).write_text(
        json.dumps({"llama-cpp-python": "0.3.36", "llama.cpp": "c" * 40})
    )
    with pytest.raises(TamperedTool, match="records no file hashes"):
        _run(tmp_path)


def test_files_the_list_does_not_name_never_run(tree: Path, tmp_path: Path) -> None:
    """A module planted beside the script would shadow gguf-py's `gguf` (the script's dir is
    first on sys.path); the converter runs from a copy of the listed files only."""
    marker = tmp_path / "planted-code-ran"
    (tree / "gguf.py").write_text(PLANT.format(marker=str(marker)) + "NAME = 'planted'\n")
    pycache = tree / "gguf-py" / "gguf" / "__pycache__"
    pycache.mkdir()
    (pycache / "__init__.cpython-311.pyc").write_bytes(b"planted bytecode")
    out = _run(tmp_path)
    assert out.read_text().startswith("genuine gguf-py ")
    assert not marker.exists()


# --- the sdist ------------------------------------------------------------------------------


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    """A llama-cpp-python sdist: `files` under vendor/llama.cpp, plus what is not extracted."""
    top = f"llama_cpp_python-{converter_tree.LLAMA_CPP_VERSION}"
    members = {f"{top}/vendor/llama.cpp/{k}": v for k, v in files.items()}
    members[f"{top}/vendor/llama.cpp/src/llama.cpp"] = b"// not the converter\n"
    members[f"{top}/.git/modules/vendor/llama.cpp/HEAD"] = b"a" * 40 + b"\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{top}/vendor/llama.cpp/gguf-py/gguf/link.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


CONVERTER = {
    "convert_hf_to_gguf.py": SCRIPT.encode(),
    "convert_lora_to_gguf.py": b"# lora\n",
    "gguf-py/gguf/__init__.py": b'NAME = "genuine gguf-py"\n',
    "conversion/__init__.py": b"",
    "models/templates/t.jinja": b"{{ x }}\n",
    "LICENSE": b"MIT\n",
}


def test_install_checks_the_sdist_and_records_every_file(tmp_path, monkeypatch) -> None:
    sdist = _sdist(tmp_path / converter_tree.SDIST_NAME, CONVERTER)
    expected = {k: hashlib.sha256(v).hexdigest() for k, v in CONVERTER.items()}
    monkeypatch.setattr(
        converter_tree, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(converter_tree, "FILES_SHA256", converter_tree.files_digest(expected))
    dest = tmp_path / "cache" / "llama.cpp"
    dest.mkdir(parents=True)
    (dest / "stale.py").write_text("old tree")
    record = converter_tree.install(sdist, dest)
    assert record["files"] == expected and record["llama.cpp"] == "a" * 40
    assert _hashes(dest) == expected  # only the converter: no src/, no link, nothing stale
    assert converter_tree.verify(dest)["files"] == expected
    assert sorted(p.name for p in dest.parent.iterdir()) == ["llama.cpp"]  # no .incoming left


def test_an_sdist_without_the_pinned_sha256_is_deleted_and_nothing_else(tmp_path) -> None:
    (tmp_path / "sdist").mkdir()
    sdist = _sdist(tmp_path / "sdist" / converter_tree.SDIST_NAME, CONVERTER)
    keep = tmp_path / "sdist" / "other.tar.gz"
    keep.write_bytes(b"another download")
    dest = tmp_path / "llama.cpp"
    dest.mkdir()
    (dest / "convert_hf_to_gguf.py").write_text("the tree in place")
    with pytest.raises(TamperedTool) as refused:
        converter_tree.install(sdist, dest)
    line = refused.value.one_line()
    assert converter_tree.SDIST_SHA256 in line and "was deleted" in line
    assert "make gguf-tools" in line
    assert not sdist.exists() and keep.exists()
    assert (dest / "convert_hf_to_gguf.py").read_text() == "the tree in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp", "sdist"]


def test_make_gguf_tools_checks_what_it_downloads_and_what_it_extracted(tmp_path) -> None:
    """The Makefile's steps: `check-sdist` on every use of the sdist (exit 2, the download
    deleted), `verify` before trusting the tree it has (exit 1 says why, then it extracts)."""
    makefile = (ROOT / "Makefile").read_text()
    assert '$(GGUF_TOOLS) check-sdist "$$sd"' in makefile
    assert (
        'if ! $(GGUF_TOOLS) verify; then $(FETCH_SDIST); $(GGUF_TOOLS) install "$$sd"' in makefile
    )
    sdist = _sdist(tmp_path / converter_tree.SDIST_NAME, CONVERTER)
    tool = [sys.executable, "-m", "adapter_deploy.cli.gguf_tools"]
    proc = subprocess.run([*tool, "check-sdist", str(sdist)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was deleted" in errors[0] and "make gguf-tools" in errors[0]
    assert not sdist.exists()
    planted = tmp_path / "llama.cpp"
    planted.mkdir()
    (planted / gguf.CONVERTER_SCRIPT).write_text("print('planted')\n")
    _write_record(planted, _hashes(planted))
    env = {**os.environ, gguf.CONVERTER_ENV: str(planted)}
    proc = subprocess.run([*tool, "verify"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "lists other converter files" in proc.stdout


# --- the real pins ---------------------------------------------------------------------------

_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapter-deploy"
REAL_SDIST = _CACHE / "sdist" / converter_tree.SDIST_NAME


@pytest.mark.skipif(not REAL_SDIST.is_file(), reason="run `make gguf-tools` (downloads the sdist)")
def test_the_pinned_sdist_holds_the_pinned_converter(tmp_path: Path) -> None:
    """The two pins agree: the sdist with the pinned sha256 extracts to the pinned list."""
    sdist = tmp_path / REAL_SDIST.name
    sdist.write_bytes(REAL_SDIST.read_bytes())
    record = converter_tree.install(sdist, tmp_path / "llama.cpp")
    assert converter_tree.files_digest(record["files"]) == converter_tree.FILES_SHA256
    assert gguf.CONVERTER_SCRIPT in record["files"]
    assert "gguf-py/gguf/__init__.py" in record["files"]
