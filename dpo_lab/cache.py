"""Content-hash keys and atomic writes: a changed input never reuses a stale artefact, and an
interrupted write never leaves a half-written file behind.

Atomic writes go through a hidden temporary sibling ``.{name}.{pid}@{host}.XXXXXXXX.tmp`` that names its
writer, so the next write beside it can tell one left by a process that is gone (an interrupted write) and
remove it. Written files and folders get the permissions the umask gives (not mkstemp's 0600), and a full
disk is reported as ``disk full while writing <path>``. A :func:`cached_directory` ends with a manifest
(``.complete``: every file's size and sha256) that is checked whenever the folder is reused.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from filelock import FileLock, Timeout
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


# ------------------------------------------------------------------------------------------- atomic writes
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _tmp_prefix(path: Path) -> str:
    """Prefix of a temporary sibling of ``path``; mkstemp/mkdtemp add 8 characters and ``.tmp``."""
    return f".{path.name}.{os.getpid()}@{_host()}."


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


def clean_stale_temporaries(path: str | Path, *, force: bool = False) -> list[Path]:
    """Remove what interrupted atomic writes of ``path`` left beside it (hidden ``.{name}.….tmp`` files and
    folders) by a process of this host that is gone; with ``force`` (the caller holds the only right to
    write ``path``), all of them. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]{{8}}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid, host = match.groups()
        if not force and (host != _host() or pid_alive(int(pid))):
            continue
        target = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        removed.append(target)
    return removed


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: str | Path, *, folder: bool = False) -> None:
    """mkstemp creates 0600 and mkdtemp 0700; give the output what a plain open/mkdir would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if "iostream error" in str(err):  # torch.save's C++ writer says only this when the disk fills up
        try:
            return shutil.disk_usage(folder).free < (16 << 20)
        except OSError:
            return False
    return False


def _disk_full_error(err: BaseException, path: Path) -> OSError:
    return OSError(errno.ENOSPC, f"disk full while writing {path}; free space on {path.parent} (or point "
                                 "DPO_LAB_ARTIFACTS elsewhere) and rerun")


@contextmanager
def _atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        _follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if isinstance(err, Exception) and _is_disk_full(err, path.parent):
            raise _disk_full_error(err, path) from err
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    with _atomic_file(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically: a reader sees no file or a complete one."""
    from safetensors.torch import save_file

    with _atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


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


def find_damaged_file(folder: str | Path) -> tuple[Path, str] | None:
    """The first file under ``folder`` (or ``folder`` itself, a file) that is empty or does not parse (JSON,
    a safetensors header, an Arrow stream), with the reason; None if every such file reads."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(f for f in folder.rglob("*") if f.is_file())
    for file in files:
        try:
            if file.stat().st_size == 0:
                return file, "empty file"
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
            return file, f"{type(err).__name__}: {err}"
    return None


def damaged_file_error(folder: str | Path, err: BaseException, advice: str) -> ValueError | None:
    """A ValueError naming the damaged file under ``folder`` that made a read fail with ``err`` and saying
    what to do (``advice``); None if no file there is damaged (``err`` has another cause)."""
    found = find_damaged_file(folder)
    if found is None:
        return None
    file, why = found
    return ValueError(f"{file} is truncated or corrupt ({why}); {advice}")


@contextmanager
def naming_damaged_files(folder: str | Path, advice: str) -> Iterator[None]:
    """Reads inside the block that fail on a damaged file under ``folder`` raise :func:`damaged_file_error`'s
    ValueError instead (a missing file, or any other cause, is raised as it is)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as err:
        damaged = damaged_file_error(folder, err, advice)
        if damaged is None:
            raise
        raise damaged from err


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    A crash inside the block leaves ``path`` as it was (absent or complete), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp"))
    try:
        _follow_umask(tmp, folder=True)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        disk_full = isinstance(err, Exception) and _is_disk_full(err, path.parent)  # before tmp is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full:
            raise _disk_full_error(err, path) from err
        raise


# ---------------------------------------------------------------------------------------------------- locks
LOCK_TIMEOUT_ENV = "DPO_LAB_LOCK_TIMEOUT"


class RunLockedError(TimeoutError):
    """Another process held a lock for longer than the lock timeout."""


def lock_timeout() -> float | None:
    """Seconds to wait for a lock another process holds: ``$DPO_LAB_LOCK_TIMEOUT``, else None (wait until
    it is free)."""
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


class Lock:
    """The project's one lock: an OS file lock on ``path`` (a holder that dies, even by kill -9, releases it)
    and, while held, ``<path>.json`` saying who holds it (pid, host, since), which whoever waits is told;
    ``timeout`` (None: :func:`lock_timeout`) bounds the wait with a RunLockedError naming the holder. ``name``
    is what the lock guards, for the messages. Also a context manager."""

    def __init__(self, path: str | Path, name: str | Path, timeout: float | None = None) -> None:
        self.path, self.name, self.timeout = Path(path), name, timeout
        self.note = self.path.with_name(self.path.name + ".json")
        self._lock: FileLock | None = None

    def holder(self) -> str:
        try:
            who = json.loads(self.note.read_text())
            return f"pid {who.get('pid')} on host {who.get('host')} since {who.get('since')}"
        except (OSError, ValueError, AttributeError):
            return f"another process (it has not written {self.note.name} yet)"

    def acquire(self) -> Lock:
        timeout = lock_timeout() if self.timeout is None else self.timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if self.holder().startswith(f"pid {os.getpid()} on host {socket.gethostname()} "):
                raise RuntimeError(f"{self.name} is already held by this process: a Run on it was not closed "
                                   "(use `with Run(...)` or run.close())") from None
            limit = "" if timeout is None else f" (at most {timeout:g} s, {LOCK_TIMEOUT_ENV})"
            print(f"{self.name} is in use by {self.holder()}; waiting for it{limit}", file=sys.stderr,
                  flush=True)
            try:
                lock.acquire(timeout=-1 if timeout is None else timeout)
            except Timeout:
                raise RunLockedError(
                    f"{self.name} is in use by {self.holder()}; gave up after {timeout:g} s "
                    f"({LOCK_TIMEOUT_ENV}). Let that process finish or stop it (a holder that dies releases "
                    "the lock at once), then rerun") from None
        try:
            atomic_write_json(self.note, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "since": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def release(self) -> None:
        """Undo :meth:`acquire` (idempotent)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            with suppress(OSError):
                self.note.unlink()
            lock.release()

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# ------------------------------------------------------------------------------------------- stage manifests
MANIFEST = ".complete"
# Files up to this size are re-hashed whenever their folder is reused; larger ones (weights, arrow files)
# only have their size checked, unless DPO_LAB_VERIFY_CACHE=full or verify="full" asks for every hash.
HASH_ON_REUSE_BYTES = 1 << 20


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """``folder/.complete``: the size and sha256 of every file under ``folder``, written last."""
    folder = Path(folder)
    names = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
    files = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in names if name != MANIFEST}
    manifest = {"format": "dpo-lab stage manifest", "version": 1, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def verify_manifest(folder: str | Path, *, full: bool = False) -> None:
    """Check ``folder`` against its manifest: every file present with its size, and its sha256 for files of
    at most :data:`HASH_ON_REUSE_BYTES` (every file with ``full``). A ValueError names the first damaged
    file and says to delete ``folder``."""
    folder = Path(folder)
    rebuild = f"delete {folder} to rebuild it"
    marker = folder / MANIFEST
    manifest = read_json_object(marker, ("files",), advice=rebuild)
    entries = manifest["files"]
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e)
                                                for e in entries.values()):
        raise ValueError(f"{marker} is corrupt: expected a size and sha256 per file; {rebuild}")
    for name, entry in entries.items():
        file = folder / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"{file} is missing from a completed stage folder; {rebuild}") from None
        if size != entry["size"]:
            raise ValueError(f"{file} is truncated or was changed after it was built ({size} bytes, the "
                             f"manifest says {entry['size']}); {rebuild}")
        if (full or size <= HASH_ON_REUSE_BYTES) and _sha256(file) != entry["sha256"]:
            raise ValueError(f"{file} was changed after it was built (sha256 differs from the manifest); "
                             f"{rebuild}")


def cached_directory(path: str | Path, build: Callable[[Path], None], *, verify: str | None = None) -> Path:
    """Return ``path`` if a previous build completed there, else build it atomically first.

    Completion is marked by a manifest (``.complete``, :func:`write_manifest`) written last inside the
    folder; a reused folder is checked against it (:func:`verify_manifest`; ``verify="full"`` or
    ``DPO_LAB_VERIFY_CACHE=full`` re-hashes every file, not only the small ones), so a truncated or
    tampered file is named instead of read. Temporaries of interrupted builds are removed.
    """
    path = Path(path)
    verify = verify or os.environ.get("DPO_LAB_VERIFY_CACHE") or "size"
    if verify not in ("size", "full"):
        raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
    if (path / MANIFEST).is_file():
        verify_manifest(path, full=verify == "full")
        clean_stale_temporaries(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Runs of a sweep on several GPUs may need the same stage at once: one builds it, the others wait for
    # the lock and then find it complete.
    with Lock(path.parent / f".{path.name}.lock", path):
        if (path / MANIFEST).is_file():
            verify_manifest(path, full=verify == "full")
            return path
        clean_stale_temporaries(path, force=True)  # the lock holder is the only builder of ``path``
        with atomic_directory(path) as tmp:
            build(tmp)
            write_manifest(tmp)
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
