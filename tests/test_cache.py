import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpo_lab import cache
from dpo_lab.cache import (
    atomic_directory,
    atomic_write_json,
    atomic_write_tensors,
    atomic_write_text,
    cached_directory,
    content_hash,
)
from dpo_lab.presets import get_preset


def test_content_hash_is_stable_and_sensitive():
    a = get_preset("smoke")
    assert content_hash(a) == content_hash(get_preset("smoke"))
    assert content_hash(a) != content_hash(get_preset("smoke", **{"dpo.lr": 1e-3}))
    assert content_hash({"b": 1, "a": 2}) == content_hash({"a": 2, "b": 1})


def test_content_hash_rejects_unhashable_objects():
    with pytest.raises(TypeError, match="cannot hash"):
        content_hash(object())


def test_atomic_write_replaces_whole_file(tmp_path: Path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_crash_inside_atomic_directory_keeps_previous_content(tmp_path: Path):
    target = tmp_path / "stage"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_cached_directory_builds_once(tmp_path: Path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "out").write_text("x")

    first = cached_directory(tmp_path / "c", build)
    second = cached_directory(tmp_path / "c", build)
    assert first == second and len(calls) == 1 and (first / "out").read_text() == "x"


# ------------------------------------------------------------------------------------ stage manifests
def _stage(tmp_path: Path) -> Path:
    def build(folder: Path) -> None:
        (folder / "report.json").write_text('{"loss": 1.5}')
        (folder / "policy").mkdir()
        (folder / "policy" / "model.safetensors").write_bytes(bytes(range(256)) * 8)

    return cached_directory(tmp_path / "sft-abc", build)


def test_stage_manifest_records_every_file(tmp_path: Path):
    folder = _stage(tmp_path)
    manifest = json.loads((folder / ".complete").read_text())
    assert set(manifest["files"]) == {"report.json", "policy/model.safetensors"}
    assert manifest["files"]["report.json"]["size"] == len('{"loss": 1.5}')
    assert cached_directory(folder, lambda f: pytest.fail("rebuilt")) == folder  # intact: reused


@pytest.mark.parametrize("damage, words", [
    (lambda f: (f / "policy" / "model.safetensors").write_bytes(b"\0" * 100), "is truncated or was changed"),
    (lambda f: (f / "report.json").write_text('{"loss": 9.5}'), "sha256 differs"),  # same size, other bytes
    (lambda f: (f / "policy" / "model.safetensors").unlink(), "is missing"),
])
def test_a_damaged_cached_file_is_named_with_what_to_do(tmp_path: Path, damage, words):
    folder = _stage(tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        cached_directory(folder, lambda f: pytest.fail("rebuilt"))
    assert str(folder) in str(info.value) and f"delete {folder} to rebuild it" in str(info.value)


def test_a_marker_that_is_not_a_manifest_is_named_not_trusted(tmp_path: Path):
    """A bare ``ok`` marker (no sizes, no checksums) vouches for nothing: named, with the folder to delete."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ".complete").write_text("ok\n")
    with pytest.raises(ValueError, match=re.escape(f"delete {tmp_path / 'old'} to rebuild it")) as info:
        cached_directory(tmp_path / "old", lambda f: pytest.fail("rebuilt"))
    assert f"{tmp_path / 'old' / '.complete'} is " in str(info.value)


# ------------------------------------------------------------------------- interrupted writes, umask, disk
def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporaries_of_interrupted_writes_are_cleaned_on_the_next_start(tmp_path: Path):
    host = cache._host()
    dead = tmp_path / f".stage.{_dead_pid()}@{host}.abcd1234.tmp"  # a writer killed mid-write
    live = tmp_path / f".stage.{os.getpid()}@{host}.efgh5678.tmp"  # this process: still writing
    other_host = tmp_path / f".stage.{_dead_pid()}@elsewhere.ijkl9012.tmp"  # can't tell: kept
    other_path = tmp_path / f".stage2.{_dead_pid()}@{host}.uvwx1234.tmp"  # another file's: not ours
    for folder in (dead, live, other_host, other_path):
        folder.mkdir()
        (folder / "half-written").write_text("x")
    atomic_write_text(tmp_path / "stage", "done")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"stage", live.name, other_host.name, other_path.name}
    # cached_directory holds the stage's lock, so every temporary of that stage is a left-over.
    cached_directory(tmp_path / "stage2", lambda f: (f / "x").write_text("1"))
    assert not other_path.exists()


def test_an_interrupted_atomic_directory_leaves_nothing_after_the_next_write(tmp_path: Path):
    code = ("import os, sys; from dpo_lab.cache import atomic_directory\n"
            f"with atomic_directory({str(tmp_path / 'ckpt')!r}) as tmp:\n"
            "    (tmp / 'weights').write_text('half'); os._exit(9)\n")  # killed inside the write
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 9
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the left-over
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.csv", "x\n")
        atomic_write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        (tmp_path / "plain.png").write_text("z")  # what a figure gets
    finally:
        os.umask(old)
    mode = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
            for name in ("a.csv", "t.safetensors", "d", "plain.png")}
    assert mode == {"a.csv": 0o666 & ~umask, "t.safetensors": 0o666 & ~umask, "d": 0o777 & ~umask,
                    "plain.png": 0o666 & ~umask}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_named_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match=re.escape(f"disk full while writing {tmp_path / 'r.json'}")) as info:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save", _disk_full)
    with pytest.raises(OSError, match=re.escape(f"disk full while writing {tmp_path / 't.safetensors'}")):
        atomic_write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(OSError, match=re.escape(f"disk full while writing {tmp_path / 'ckpt'}")):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            _disk_full(tmp)
    # torch.save's C++ writer says only "basic_ios::clear: iostream error" when the disk fills up.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(OSError, match="disk full while writing"):
        with atomic_directory(tmp_path / "ckpt"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . basic_ios::clear: iostream error")
    assert list(tmp_path.iterdir()) == []  # nothing half written left behind
