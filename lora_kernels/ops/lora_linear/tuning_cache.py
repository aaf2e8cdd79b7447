"""Tuning choices that outlive a process and agree across ranks: the GEMM arrangement (``arrangement.choose``) and
the fused GEMM's autotuned tile (``tuning._lora_gemm_kernel_tuned``), per shape key.

**On disk** (optional: ``LORA_KERNELS_TUNING_CACHE=/path/to/file.json``; unset, the default: no file).  One JSON
object, ``{"format": 1, "entries": {id: entry}}``; an entry is ``{"kind", "device", "torch", "triton", "code", "key",
"value"}``:

* ``kind``: "arrangement", or "autotune:<kernel name>";
* ``device``: the CUDA device's name (``torch.cuda.get_device_name``); ``torch`` / ``triton``: their versions;
  ``code``: a digest of the kernels, their launchers and the tuning candidates (``_CODE_FILES``), so that any change
  there measures again;
* ``key``: the shape key -- the arrangement key without its device index, or the autotuner's own key (its ``key``
  arguments, then the tensor arguments' dtypes);
* ``value``: ``{"choice", "fused_ms", "split_ms"}`` (arrangement) or ``{"config": {"kwargs", "num_warps",
  "num_stages", "num_ctas", "maxnreg"}}`` (autotune: it must still be one of the autotuner's candidates to be used).

``id`` is a digest of the identifying fields; entries of other devices and versions stay in the file (one file can
serve several machines) and are never matched.  The file is read at the first lookup and again when it changes on
disk.  A new choice is merged into the file as it is now, under a lock file (``<path>.lock``, where ``fcntl`` exists),
and written to a temporary file that ``os.replace`` puts in place: a reader never sees a partial file, and concurrent
processes keep each other's entries (without ``fcntl`` the last writer wins: a cache miss at worst).  A file that
does not parse is ignored with one warning and rewritten at the next choice; a file of another format version is
ignored with one warning and left alone; a failed write is a warning.  Nothing here ever raises into a training
step.  Out-of-memory fallbacks (``arrangement.choose``) are not written: they depend on the moment.

**Across ranks** (``torch.distributed`` initialised, world size > 1): rank 0 decides each key (memory, then the
file, then timing) and publishes its choice in the default process group's key-value store (the rendezvous store,
``set``: it never waits); every other rank waits for that key in the store (``wait``, at most ``SHARED_WAIT_S``)
instead of reading the file or timing.  So all ranks run rank 0's tile and arrangement, and only rank 0 writes the
file.  Cost: one store round trip per new key per rank (a TCP message, no GPU collective); a rank waits about as long
as rank 0 takes to time that key, which it would have spent timing it itself.  Not a collective on purpose: a
``broadcast_object_list`` per key needs every rank to meet the same new keys in the same order, and ranks whose
token counts differ (per-rank padding) meet different token buckets -- a collective would pair rank 0's choice for
one key with another rank's different key, or hang.  Store entries are named by their key, so they cannot be
mismatched; a key rank 0 does not meet within ``SHARED_WAIT_S`` makes that rank stop waiting for the rest of the
process (one warning) and decide its keys itself, so a mismatch costs one wait, never a hang.  Initialise the
process group before the first training step (keys decided before it are not published).

**Inside a CUDA graph capture** nothing is timed (``do_bench`` synchronises, which a capture forbids): a key already
decided (in memory, in the file, or -- without waiting -- published by rank 0) is used; otherwise the launcher takes
the pinned tile and the fused arrangement, said once in the log (logger "lora_kernels").

Triton's ``Autotuner`` keeps its choices in ``autotuner.cache`` (tuning key -> Config) and asks only ``key in cache``
and ``cache[key] = best``.  ``install`` swaps that dict for ``_TunedConfigs``, whose ``in`` also looks here before
the autotuner times anything and whose assignment records what it timed: no change to the ``triton.autotune(...)``
decoration, and Triton's own ``cache_results`` (``TRITON_CACHE_AUTOTUNING``) keeps working beside it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import tempfile
import threading
from typing import Dict, Optional, Tuple

import torch

from lora_kernels import settings
from lora_kernels._backend import _say_once

FORMAT = 1
SHARED_WAIT_S = 120.0  # how long a rank > 0 waits for rank 0's choice of a key before deciding for itself
_STORE_PREFIX = "lora_kernels/tuning/"
# What a choice depends on besides the device and the torch / triton versions: the kernels, the launchers (flags,
# arrangement candidates) and the tuning candidates and their pruning.
_CODE_FILES = ("kernels.py", "nf4_kernels.py", "tuning.py", "launch.py", "nf4_launch.py", "arrangement.py")
CAPTURE_NOTE = ("lora_kernels: inside a CUDA graph capture, GEMM shapes not tuned before it use the pinned tile and "
                "the fused arrangement (no autotuning or arrangement timing while capturing); run one eager step "
                "before capturing to capture the tuned ones")


class TimingRefused(Exception):
    """Raised inside the autotuner when a key would need timing while the stream is being captured."""


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (False on a build without CUDA)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError):  # a CPU-only build of torch
        return False


def note_capture() -> None:
    _say_once(CAPTURE_NOTE)


def device_name(index: Optional[int] = None) -> str:
    """The name that keys the disk cache: CUDA device ``index`` (None: the current one), or "cpu" without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    return _cuda_name(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _identity() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - no triton: nothing is tuned anyway
        triton_version = "none"
    from lora_kernels import __version__

    digest = hashlib.sha256(__version__.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE_FILES:
        try:
            with open(os.path.join(here, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
        except OSError:  # pragma: no cover - an install without sources: the version alone
            pass
    return {"torch": torch.__version__, "triton": triton_version, "code": digest.hexdigest()[:16]}


def _plain(key) -> list:
    """The key as JSON sees it (tuples as lists, anything unusual as its str), so lookups compare like with like."""
    return json.loads(json.dumps(list(key), default=str))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _entry(kind: str, device: str, key: list, value) -> dict:
    return dict(kind=kind, device=device, **_identity(), key=key, value=value)


def _entry_id(entry: dict) -> str:
    return _digest(*(entry[f] for f in ("kind", "device", "torch", "triton", "code", "key")))


# --------------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------------

def _dump(data: dict, f) -> None:
    json.dump(data, f, indent=1, sort_keys=True)


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path`` (a lock file next to the cache) between processes, where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic replace only
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: str, data: dict) -> None:
    """Write ``data`` next to ``path``, then ``os.replace`` it there: readers see the old file or the new one."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _File:
    """One cache file: its entries as last read, re-read when the file changes, new entries merged in atomically."""

    def __init__(self, path: str):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self.stamp = None  # (mtime_ns, size, inode) of what ``entries`` holds; None: not read yet
        self.foreign = False  # another format version: read nothing, write nothing
        self.lock = threading.Lock()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return ("missing",)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> Dict[str, dict]:
        """The file's entries; {} (with one warning) when it does not parse or is another format version."""
        self.foreign = False
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            _say_once(f"lora_kernels: cannot read the tuning cache {self.path} ({exc}); ignored")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))  # a decoding error is a ValueError too
            if not isinstance(data, dict) or "format" not in data:
                raise ValueError("not a tuning cache")
        except ValueError as exc:
            _say_once(f"lora_kernels: the tuning cache {self.path} is not a valid cache file ({str(exc)[:80]}); "
                      f"ignored, and rewritten with this process's choices")
            return {}
        if data["format"] != FORMAT:
            self.foreign = True
            _say_once(f"lora_kernels: the tuning cache {self.path} has format {data['format']!r}, this version reads "
                      f"{FORMAT}; ignored and left as it is (point LORA_KERNELS_TUNING_CACHE at another file)")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            _say_once(f"lora_kernels: the tuning cache {self.path} is not a valid cache file (no entries); ignored, "
                      f"and rewritten with this process's choices")
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def get(self, entry_id: str) -> Optional[dict]:
        with self.lock:
            if entry_id not in self.entries:
                stamp = self._stat()
                if stamp != self.stamp:  # first lookup, or another process wrote since
                    self.entries, self.stamp = self._read(), stamp
            return self.entries.get(entry_id)

    def put(self, entry_id: str, entry: dict) -> None:
        with self.lock:
            self.entries[entry_id] = entry
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with _locked(self.path + ".lock"):
                    current = self._read()
                    if self.foreign:
                        return
                    current[entry_id] = entry
                    _atomic_write(self.path, {"format": FORMAT, "entries": current})
                    self.entries, self.stamp = current, self._stat()
            except (OSError, TypeError, ValueError) as exc:
                _say_once(f"lora_kernels: cannot write the tuning cache {self.path} ({exc}); this process's choices "
                          f"are kept in memory only")


_files: Dict[str, _File] = {}
_files_lock = threading.Lock()


def _file(path: str) -> _File:
    with _files_lock:
        if path not in _files:
            _files[path] = _File(path)
        return _files[path]


# --------------------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------------------

class _Ranks:
    gave_up = False  # a rank > 0 that waited SHARED_WAIT_S in vain decides its keys itself from then on


def _group():
    """(rank, store) of the default process group when it has more than one rank, else None."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        if dist.get_world_size() <= 1:
            return None
        from torch.distributed.distributed_c10d import _get_default_store

        return dist.get_rank(), _get_default_store()
    except Exception as exc:  # a store we cannot reach: every rank tunes for itself
        _say_once(f"lora_kernels: cannot use the process group's store to share tuning choices ({exc}); each rank "
                  f"tunes for itself")
        return None


def _store_name(kind: str, key: list) -> str:
    ident = _identity()  # no device name: rank 0's choice is every rank's, whatever its GPU
    return _STORE_PREFIX + _digest(kind, ident["torch"], ident["triton"], ident["code"], key)


def _publish(store, kind: str, key: list, value) -> None:
    try:
        store.set(_store_name(kind, key), json.dumps(value))
    except Exception as exc:
        _say_once(f"lora_kernels: cannot publish a tuning choice to the other ranks ({exc})")


def _from_rank0(store, kind: str, key: list, wait: bool):
    name = _store_name(kind, key)
    try:
        if wait:
            store.wait([name], datetime.timedelta(seconds=SHARED_WAIT_S))
        elif not store.check([name]):
            return None
        return json.loads(store.get(name))
    except Exception as exc:  # the wait timed out (DistStoreError), or the store went away
        if wait:
            _Ranks.gave_up = True
            _say_once(f"lora_kernels: rank 0 did not publish a tuning choice for {kind} {key} within "
                      f"{SHARED_WAIT_S:.0f} s ({type(exc).__name__}); this rank decides its own keys from now on "
                      f"(ranks met different shapes, or rank 0 is far behind)")
        return None


# --------------------------------------------------------------------------------------------------------------
# Lookup and record
# --------------------------------------------------------------------------------------------------------------

def lookup(kind: str, key, device: Optional[int] = None, *, wait: bool = True) -> Optional[Tuple[dict, str]]:
    """(value, source) of a choice decided elsewhere -- by rank 0 ("rank 0"), or by an earlier process ("disk
    cache") -- or None: the caller decides (times) and calls ``record``.  ``device``: the CUDA device index (None:
    the current device).  ``wait=False`` (inside a capture): a rank > 0 takes rank 0's choice only if already there."""
    key = _plain(key)
    group = _group()
    if group is not None and group[0] > 0 and not _Ranks.gave_up:
        value = _from_rank0(group[1], kind, key, wait)
        if isinstance(value, dict):
            return value, "rank 0"
        if not _Ranks.gave_up:
            return None
    path = settings.get().tuning_cache
    if path is None:
        return None
    want = _entry(kind, device_name(device), key, None)
    entry = _file(path).get(_entry_id(want))
    if entry is None or not isinstance(entry.get("value"), dict) or any(
            entry.get(f) != want[f] for f in ("kind", "device", "torch", "triton", "code", "key")):
        return None
    if group is not None and group[0] == 0:
        _publish(group[1], kind, key, entry["value"])
    return entry["value"], "disk cache"


def record(kind: str, key, value: dict, device: Optional[int] = None, *, persist: bool = True) -> None:
    """A choice this process decided: rank 0 publishes it to the other ranks; with a cache file (and ``persist``)
    rank 0, or the only process, writes it there.  Ranks > 0 keep theirs to themselves."""
    key = _plain(key)
    group = _group()
    if group is not None:
        if group[0] != 0:
            return
        _publish(group[1], kind, key, value)
    path = settings.get().tuning_cache
    if path is None or not persist:
        return
    entry = _entry(kind, device_name(device), key, value)
    _file(path).put(_entry_id(entry), entry)


def forget() -> None:
    """Drop what this process read from cache files and its give-up state (tests: a fresh process)."""
    with _files_lock:
        _files.clear()
    _Ranks.gave_up = False


# --------------------------------------------------------------------------------------------------------------
# The autotuner
# --------------------------------------------------------------------------------------------------------------

def _config_value(config) -> dict:
    return json.loads(json.dumps({"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                                  "num_stages": config.num_stages, "num_ctas": config.num_ctas,
                                  "maxnreg": config.maxnreg}, default=str))


_local = threading.local()  # no_timing: set by launch_tuned while the stream is being captured


class _TunedConfigs(dict):
    """``Autotuner.cache`` (tuning key -> Config), backed by ``lookup`` / ``record``: ``key in cache`` also takes a
    choice decided elsewhere (rank 0, the file) before the autotuner times anything -- or, while capturing, raises
    ``TimingRefused`` instead of letting it time; ``cache[key] = best`` records what it timed."""

    def __init__(self, autotuner, entries=()):
        super().__init__(entries)
        self.configs = list(autotuner.configs)
        self.kind = "autotune:" + getattr(getattr(autotuner, "base_fn", None), "__name__", "kernel")

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        no_timing = getattr(_local, "no_timing", False)
        found = lookup(self.kind, key, wait=not no_timing)
        if found is not None:
            for config in self.configs:
                if _config_value(config) == found[0].get("config"):
                    dict.__setitem__(self, key, config)
                    return True
        if no_timing:
            raise TimingRefused(key)
        return False

    def __setitem__(self, key, config) -> None:
        dict.__setitem__(self, key, config)
        record(self.kind, key, {"config": _config_value(config)})


_install_lock = threading.Lock()


def install(autotuner) -> None:
    """Back ``autotuner``'s choices with this module (idempotent; what it already chose is kept)."""
    with _install_lock:
        if not isinstance(autotuner.cache, _TunedConfigs):
            autotuner.cache = _TunedConfigs(autotuner, autotuner.cache)


def launch_tuned(autotuner, grid, args, flags) -> bool:
    """Launch ``autotuner[grid](*args, **flags)`` and return True; or, while the stream is being captured into a CUDA
    graph and this key's tile is not decided yet, launch nothing, say so once, and return False (the caller
    launches its pinned tile)."""
    if not isinstance(autotuner.cache, _TunedConfigs):
        install(autotuner)
    if not capturing():
        autotuner[grid](*args, **flags)
        return True
    _local.no_timing = True
    try:
        autotuner[grid](*args, **flags)
    except TimingRefused:
        note_capture()
        return False
    finally:
        _local.no_timing = False
    return True
