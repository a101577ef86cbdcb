"""Content-hash keys and atomic writes: a changed input never reuses a stale artefact, and an
interrupted write never leaves a half-written file behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from transformers import PreTrainedTokenizerBase


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **_jsonable(dataclasses.asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot hash object of type {type(obj).__name__}: {obj!r}")


def content_hash(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-able parts (dataclasses, dicts, lists, scalars, paths)."""
    payload = json.dumps(_jsonable(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_hash(path: str | Path, length: int = 16) -> str:
    """sha256 of a file's bytes (or of every file under a folder, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:length]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically: a reader sees no file or a complete one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_object(path: str | Path, keys: tuple[str, ...] = (), *,
                     advice: str = "delete it") -> dict[str, Any]:
    """A JSON object file written by :func:`atomic_write_json` (so damage came from outside): a truncated or
    corrupt one, or one missing ``keys``, is a ValueError naming the file, followed by ``advice``."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is truncated or corrupt ({err.msg}, line {err.lineno}); {advice}") from err
    if not isinstance(saved, dict) or any(k not in saved for k in keys):
        expected = f"a JSON object with keys {list(keys)}" if keys else "a JSON object"
        raise ValueError(f"{path} is corrupt: expected {expected}; {advice}")
    return saved


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    A crash inside the block leaves ``path`` as it was (absent or complete), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_directory(path: str | Path, build: Callable[[Path], None]) -> Path:
    """Return ``path`` if a previous build completed there, else build it atomically first.

    Completion is marked by a ``.complete`` file written last inside the folder.
    """
    path = Path(path)
    if (path / ".complete").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Runs of a sweep on several GPUs may need the same stage at once: one builds it, the others wait for
    # the lock and then find it complete.
    with FileLock(path.parent / f".{path.name}.lock"):
        if (path / ".complete").is_file():
            return path
        with atomic_directory(path) as tmp:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
    return path


# ------------------------------------------------------------------------------------------- fingerprints
# What run identities and the reference log-prob cache are keyed by.
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): the weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Vocabulary, special ids and (fast tokenizers) the pipeline incl. merges; not the padding/truncation
    state, which a ``tokenizer(..., padding=True)`` call may change without changing any token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = None
    if backend is not None:
        state = json.loads(backend.to_str())
        pipeline = {k: v for k, v in state.items() if k not in ("padding", "truncation")}
    return content_hash(sorted(tokenizer.get_vocab().items()), tokenizer.pad_token_id, tokenizer.eos_token_id,
                        pipeline)
