"""Content-hash keys, atomic writes, the one lock and stage manifests: a changed input never reuses a stale
artefact, an interrupted write never leaves a half-written file, one process at a time writes a run or stage.
A write's temporary ``.{name}.{pid}@{host}.XXXXXXXX.tmp`` names its writer, so that a later write of the same
path removes one whose writer is gone.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lab.seed import content_hash


# ------------------------------------------------------------------------------------------- atomic writes
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a folder (a file or a link is left to unlink)
    path.unlink(missing_ok=True)


def _disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC, or (torch.save's C++ writer says only "iostream error") an error with the disk nearly full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < (16 << 20)
    except OSError:
        return False


@contextmanager
def _atomic(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a folder if ``folder``) to write; on success it replaces
    ``path`` in one rename, so a reader sees the old content or the new, never a mix. Plain open/mkdir, not
    mkstemp (0600), so the output gets the permissions the umask gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@{re.escape(_host())}\.[A-Za-z0-9_]{{8}}\.tmp")
    for entry in path.parent.iterdir():  # left by interrupted writes whose writer, on this host, is gone
        match = stale.fullmatch(entry.name)
        if match is not None and not pid_alive(int(match[1])):
            _remove(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}.tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, path.parent)  # before tmp is freed
        _remove(tmp)
        if full:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; free space on {path.parent} (or "
                                        "point DPO_LAB_ARTIFACTS elsewhere) and rerun") from err
        raise


# A temporary sibling folder to fill; on success it replaces ``path`` in one rename.
atomic_directory = functools.partial(_atomic, folder=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with _atomic(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save  # bytes: save_file would create the file 0600, whatever the umask

    with _atomic(path) as tmp:
        tmp.write_bytes(save(tensors, metadata=metadata))


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


def read_saved_config(folder: Path, what: str, files: tuple[str, ...], fmt: str,
                      version: int | None = None) -> dict[str, Any]:
    """The JSON config ``files[0]`` of a ``what`` saved in ``folder``: a missing file is a FileNotFoundError,
    another format or version a ValueError, both naming ``folder``."""
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no saved {what} at {folder} ({name} missing)")
    meta = json.loads((folder / files[0]).read_text())
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(f"{folder} holds format {meta.get('format')!r} v{meta.get('version')}, expected "
                         f"{fmt!r} v{version}")
    return meta


def _damage(file: Path) -> str | None:
    """Why ``file`` is damaged: empty, or JSON, safetensors or an Arrow stream that does not parse."""
    try:
        if file.stat().st_size == 0:
            return "empty file"
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:
                handle.keys()
        elif file.suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
    except Exception as err:  # what a damaged file raises depends on its reader
        return f"{type(err).__name__}: {err}"
    return None


@contextmanager
def naming_damaged_files(folder: str | Path, advice: str) -> Iterator[None]:
    """A read inside the block that fails on a damaged file under ``folder`` raises a ValueError naming that
    file and ``advice`` instead (a missing file, or any other cause, is raised as it is)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as err:
        for file in sorted(f for f in Path(folder).rglob("*") if f.is_file()):
            reason = _damage(file)
            if reason is not None:
                raise ValueError(f"{file} is truncated or corrupt ({reason}); {advice}") from err
        raise


# ---------------------------------------------------------------------------------------------------- locks
LOCK_TIMEOUT_ENV = "DPO_LAB_LOCK_TIMEOUT"


class RunLockedError(TimeoutError):
    """Another process held a lock for longer than the lock timeout."""


def lock_timeout() -> float | None:
    """Seconds to wait for a lock another process holds: ``$DPO_LAB_LOCK_TIMEOUT``, else None (no limit)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={value!r}: expected seconds >= 0 (unset: wait until free)")
    return None if math.isinf(seconds) else seconds


def lock_holder(path: Path) -> str:
    """Who holds the lock on ``path``, as its file says (read without locking)."""
    try:
        who = json.loads(path.read_text())
        return f"pid {who['pid']} on host {who['host']} since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said who yet)"


@contextmanager
def file_lock(path: Path, name: str | Path, timeout: float | None = None) -> Iterator[int]:
    """Hold the project's one lock on ``name``: flock on ``path`` (a holder that dies, even by kill -9,
    releases it), whose file names the holder (pid, host, since) to whoever waits; yields the locked file's
    descriptor (a child process given it holds the lock too). ``timeout`` (None: :func:`lock_timeout`) bounds
    the wait with a RunLockedError naming the holder."""
    timeout = lock_timeout() if timeout is None else timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, held, said = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False, False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = lock_holder(path)
            if holder.startswith(f"pid {os.getpid()} on host {socket.gethostname()} "):
                raise RuntimeError(f"{name} is already held by this process: a Run on it was not closed "
                                   "(use `with Run(...)` or run.close())")
            if not said:
                limit = "" if timeout is None else f" (at most {timeout:g} s, {LOCK_TIMEOUT_ENV})"
                print(f"{name} is in use by {holder}; waiting for it{limit}", file=sys.stderr, flush=True)
                said = True
            if deadline is not None and time.monotonic() >= deadline:
                raise RunLockedError(f"{name} is in use by {holder}; gave up after {timeout:g} s "
                                     f"({LOCK_TIMEOUT_ENV}). Let that process finish or stop it (a holder "
                                     "that dies releases the lock at once), then rerun")
            time.sleep(0.05)
        held = True
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode())
        yield fd
    finally:
        if held:
            os.ftruncate(fd, 0)  # released: it names nobody
        os.close(fd)  # closing drops the lock too


# ------------------------------------------------------------------------------------------- stage manifests
MANIFEST = ".complete"
# Files up to this size are re-hashed whenever their folder is reused; larger ones (weights, arrow files)
# only have their size checked: hashing them at every reuse would cost more than the stage's reads.
HASH_ON_REUSE_BYTES = 1 << 20


def _sha256(file: Path) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: str | Path) -> None:
    """``folder/.complete``: the size and sha256 of every file under ``folder``, written last."""
    folder = Path(folder)
    files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in folder.rglob("*") if f.is_file() and f != folder / MANIFEST}
    atomic_write_json(folder / MANIFEST, {"format": "dpo-lab stage manifest", "version": 1, "files": files})


def verify_manifest(folder: Path) -> None:
    """Check ``folder`` against its manifest (sizes; sha256 of files up to :data:`HASH_ON_REUSE_BYTES`): a
    ValueError names the first damaged file and says to delete ``folder``."""
    rebuild = f"delete {folder} to rebuild it"
    marker = folder / MANIFEST
    entries = read_json_object(marker, ("files",), advice=rebuild)["files"]
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e)
                                                for e in entries.values()):
        raise ValueError(f"{marker} is corrupt: expected a size and sha256 per file; {rebuild}")
    for name, entry in entries.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing from a completed stage folder; {rebuild}")
        size = file.stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{file} is truncated or was changed after it was built ({size} bytes, the "
                             f"manifest says {entry['size']}); {rebuild}")
        if size <= HASH_ON_REUSE_BYTES and _sha256(file) != entry["sha256"]:
            raise ValueError(f"{file} was changed after it was built (sha256 differs from the manifest); "
                             f"{rebuild}")


def cached_directory(path: str | Path, build: Callable[[Path], None]) -> Path:
    """``path`` if a build completed there (its manifest checked, :func:`verify_manifest`), else built
    atomically first with a manifest written last. Runs of a sweep may need one stage at once: one builds it
    under the stage's lock, the others wait and then find it complete."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        with file_lock(path.parent / f".{path.name}.lock", path):
            if not (path / MANIFEST).is_file():
                with atomic_directory(path) as tmp:
                    build(tmp)
                    write_manifest(tmp)
                return path
    verify_manifest(path)
    return path


# ------------------------------------------------------------------------------------------- fingerprints
# What run identities and the reference log-prob cache are keyed by.
def _tensors_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for prefix, tensor in named:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{prefix}{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): the weights' identity."""
    return _tensors_digest([(f"{name}|", t) for name, t in sorted(model.state_dict().items())])


def tensors_checksum(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' dtypes, shapes and bytes: stored beside cached values to catch edits."""
    return _tensors_digest([("", t) for t in tensors])


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
