from pathlib import Path

import pytest

from dpo_lab.cache import atomic_directory, atomic_write_json, cached_directory, content_hash, file_hash
from dpo_lab.presets import get_preset


def test_content_hash_is_stable_and_sensitive():
    a = get_preset("smoke")
    assert content_hash(a) == content_hash(get_preset("smoke"))
    assert content_hash(a) != content_hash(get_preset("smoke", **{"dpo.lr": 1e-3}))
    assert content_hash({"b": 1, "a": 2}) == content_hash({"a": 2, "b": 1})


def test_content_hash_rejects_unhashable_objects():
    with pytest.raises(TypeError, match="cannot hash"):
        content_hash(object())


def test_file_hash_sees_content_changes(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("1")
    before = file_hash(tmp_path / "d")
    (tmp_path / "d" / "x.txt").write_text("2")
    assert file_hash(tmp_path / "d") != before


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
