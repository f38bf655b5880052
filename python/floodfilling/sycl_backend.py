"""SYCL backend of the native kernels: the kernel bodies of ``kernels/*.hpp`` on a SYCL device.

Opt-in (``pip install "floodfilling[sycl]"``: the ``intel-sycl-rt`` and ``intel-opencl-rt``
wheels) and imported only when asked for: nothing else in the package imports this module.

Entry points with the arguments, checks and results of :mod:`floodfilling.kernels`:
:func:`gather_fovs`, :func:`update_fovs`, :func:`commit_object`, :func:`find_peaks`,
:func:`count_pairs`, :func:`union_find`, :func:`relabel`.  Host (NumPy)
arrays are copied to USM shared memory and back around each call; arrays allocated by
:func:`empty` already live in USM shared memory and are used in place.  ``find_peaks``
sorts its candidates and thins them (greedy spacing, serial) on the host.

How it runs, with no SYCL compiler:

* the SYCL runtime of the wheels is found under ``sys.prefix`` (or the ``--user`` base, or
  ``$FFN_SYCL_ROOT``): ``include/sycl/sycl.hpp``, ``lib/libsycl.so``;
* the OpenCL CPU device of ``intel-opencl-rt`` is registered through ``OCL_ICD_FILENAMES``
  (the wheel's own ``.icd`` file names a placeholder path), unless the user set it;
* ``sycl/host.cpp``, a small C ABI over the runtime (queue, USM, bundles, launches), is
  compiled by the host's ``g++`` on first use into the cache, keyed by its source, the
  runtime version and the compiler, and loaded with ctypes;
* ``sycl/kernels.cpp`` (the device kernels, calling the unchanged ``kernels/*.hpp``) is
  compiled at run time by the runtime's kernel compiler (``-ffp-contract=off``), whose
  persistent cache (``SYCL_CACHE_PERSISTENT``, ``SYCL_CACHE_DIR``) is in the same cache.

Cache: ``$FFN_SYCL_CACHE``, else ``$XDG_CACHE_HOME/floodfilling/sycl``, else
``~/.cache/floodfilling/sycl``.  Device: ``$FFN_SYCL_DEVICE`` or :func:`select_device`
(``[backend:]type[:index]``, e.g. ``cpu``, ``level_zero:gpu``, ``opencl:cpu:0``; default:
the SYCL runtime's default device).

Every failure of the backend itself (runtime not installed, no compiler, no device, no fp64,
failed compile) is a :class:`SyclError`, one line.  ``python -m floodfilling.sycl_backend``
reports what it uses (``--json``).
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import kernels as _k

__all__ = [
    "SyclError", "select_device", "backend", "backend_for_queue", "info", "empty", "FovSteps",
    "gather_fovs", "update_fovs", "commit_object", "find_peaks", "count_pairs", "union_find",
    "relabel",
]

_HERE = Path(__file__).resolve().parent
INSTALL_HINT = 'pip install "floodfilling[sycl]"'
_BUILD_OPTIONS = ("-ffp-contract=off",)  # no FMA contraction: bitwise equal to the CPU build
_ABI_VERSION = 2


class SyclError(RuntimeError):
    """The SYCL backend cannot run (one line: what is missing and what to do)."""


def _one_line(text: str, limit: int = 600) -> str:
    text = " | ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------- finding things


def _sources() -> Tuple[Path, Path]:
    """(folder of host.cpp / kernels.cpp, folder holding kernels/*.hpp): the copies shipped
    in the wheel (floodfilling/native), else the source tree (PYTHONPATH=python runs)."""
    for sycl_dir, root in ((_HERE / "native" / "sycl", _HERE / "native"),
                           (_HERE.parents[1] / "sycl", _HERE.parents[1])):
        if (sycl_dir / "host.cpp").is_file() and (root / "kernels" / "fov_update.hpp").is_file():
            return sycl_dir, root
    raise SyclError(f"the SYCL sources (sycl/host.cpp, kernels/*.hpp) are missing from "
                    f"{_HERE / 'native'}: reinstall floodfilling")


def _prefixes() -> List[Path]:
    out: List[Path] = []
    env = os.environ.get("FFN_SYCL_ROOT")
    cands = [env] if env else []
    cands += [sys.prefix, site.getuserbase() if hasattr(site, "getuserbase") else None,
              sys.base_prefix]
    for c in cands:
        if c and Path(c) not in out:
            out.append(Path(c))
    return out


def _find_runtime() -> Path:
    """The prefix holding the SYCL runtime of the intel-sycl-rt wheel."""
    for p in _prefixes():
        if (p / "include" / "sycl" / "sycl.hpp").is_file() and (p / "lib" / "libsycl.so").exists():
            return p
    raise SyclError("the SYCL runtime is not installed (no include/sycl/sycl.hpp and "
                    f"lib/libsycl.so under {', '.join(map(str, _prefixes()))}): "
                    f"{INSTALL_HINT}")


def _runtime_version() -> str:
    try:
        from importlib.metadata import version
        return version("intel-sycl-rt")
    except Exception:  # noqa: BLE001 - installed some other way
        return "unknown"


def cache_dir() -> Path:
    """Where the host glue and the kernel compiler's persistent cache live."""
    env = os.environ.get("FFN_SYCL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "floodfilling" / "sycl"


def _setup_environment(prefix: Path, cache: Path) -> Dict[str, str]:
    """Environment the runtime reads when it loads (set only what the user has not set)."""
    icd = prefix / "lib" / "libintelocl.so"
    if icd.exists():
        os.environ.setdefault("OCL_ICD_FILENAMES", str(icd))
    os.environ.setdefault("SYCL_CACHE_PERSISTENT", "1")
    os.environ.setdefault("SYCL_CACHE_DIR", str(cache / "kernels"))
    return {k: os.environ.get(k, "") for k in
            ("OCL_ICD_FILENAMES", "SYCL_CACHE_PERSISTENT", "SYCL_CACHE_DIR",
             "ONEAPI_DEVICE_SELECTOR")}


def _compiler() -> Tuple[str, str]:
    """(path, first line of --version) of the host C++ compiler."""
    name = os.environ.get("FFN_SYCL_CXX", "g++")
    path = shutil.which(name) or (shutil.which("c++") if name == "g++" else None)
    if path is None:
        raise SyclError(f"no C++ compiler ({name}) found: the SYCL backend compiles its host "
                        "glue with it, and the SYCL runtime compiles the kernels against its "
                        "C++ headers; install g++ (e.g. apt-get install g++)")
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        ver = "unknown"
    return path, ver


def _host_library(prefix: Path, cache: Path, stats: dict) -> Path:
    """The compiled host glue (sycl/host.cpp) in the cache; compiled on first use (one
    process compiles, under a lock; the library appears atomically)."""
    sycl_dir, _ = _sources()
    src = (sycl_dir / "host.cpp").read_bytes()
    cxx, cxx_version = _compiler()
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING",
             f"-I{prefix / 'include'}"]
    libs = [f"-L{prefix / 'lib'}", "-lsycl", f"-Wl,-rpath,{prefix / 'lib'}"]
    key = hashlib.sha256(b"\0".join([
        src, _runtime_version().encode(), str(prefix).encode(), cxx_version.encode(),
        " ".join(flags + libs).encode()])).hexdigest()[:16]
    lib = cache / f"host-{key}.so"
    stats["host_cached"] = lib.exists()
    if lib.exists():
        return lib
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"host-{key}.lock", "w")
    except OSError as e:
        raise SyclError(f"the SYCL cache {cache} is not writable ({e.strerror}): set "
                        "FFN_SYCL_CACHE to a writable folder") from None
    t0 = time.perf_counter()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be compiling it
        if lib.exists():
            stats["host_cached"] = True
            return lib
        tmp = cache / f".host-{key}.{os.getpid()}.so"
        cmd = [cxx, *flags, str(sycl_dir / "host.cpp"), "-o", str(tmp), *libs]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise SyclError(f"compiling the SYCL host glue failed: {e}") from None
        if p.returncode != 0:
            tmp.unlink(missing_ok=True)
            log = p.stderr.strip()
            if "sycl/sycl.hpp" in log or "No such file" in log:
                head = next((ln for ln in log.splitlines() if "error" in ln), log[:300])
            else:
                head = "\n".join(log.splitlines()[:4])
            raise SyclError(f"compiling the SYCL host glue with {cxx} failed: "
                            f"{_one_line(head)}")
        os.replace(tmp, lib)
    stats["host_compile_s"] = round(time.perf_counter() - t0, 3)
    return lib


def _declare(lib) -> None:
    c = ctypes
    vp, cp, i, u64 = c.c_void_p, c.c_char_p, c.c_int, c.c_uint64
    sig = {
        "ffn_sycl_abi_version": (i, []),
        "ffn_sycl_last_error": (cp, []),
        "ffn_sycl_devices_json": (cp, []),
        "ffn_sycl_open": (i, [cp, c.POINTER(vp)]),
        "ffn_sycl_adopt": (i, [vp, c.POINTER(vp)]),
        "ffn_sycl_device_json": (cp, [vp]),
        "ffn_sycl_release_queue": (None, [vp]),
        "ffn_sycl_build": (i, [vp, cp, i, c.POINTER(cp), c.POINTER(cp), i, c.POINTER(cp),
                               c.POINTER(vp)]),
        "ffn_sycl_release_bundle": (None, [vp]),
        "ffn_sycl_kernel": (i, [vp, cp, c.POINTER(vp)]),
        "ffn_sycl_release_kernel": (None, [vp]),
        "ffn_sycl_launch": (i, [vp, vp, u64, u64, i, c.POINTER(i), c.POINTER(u64), i]),
        "ffn_sycl_wait": (i, [vp]),
        "ffn_sycl_malloc": (vp, [vp, u64, i]),
        "ffn_sycl_free": (i, [vp, vp]),
        "ffn_sycl_memcpy": (i, [vp, vp, vp, u64]),
        "ffn_sycl_pointer_kind": (i, [vp, vp]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args


# -------------------------------------------------------------------------- the backend

# argument kinds of ffn_sycl_launch
_PTR, _I64, _U64, _F64, _F32, _I32 = 0, 1, 2, 3, 4, 5


class Backend:
    """One SYCL queue with the kernels built for its device."""

    def __init__(self, lib, selector: str, stats: dict, adopt: Optional[int] = None):
        self._lib = lib
        self.selector = selector
        self.stats = stats
        self._kernels: Dict[str, ctypes.c_void_p] = {}
        self._bundle = None
        self._lock = threading.Lock()
        self._pool: Dict[int, List[int]] = {}
        self._pooled = 0
        q = ctypes.c_void_p()
        t0 = time.perf_counter()
        if adopt is not None:
            if lib.ffn_sycl_adopt(ctypes.c_void_p(adopt), ctypes.byref(q)) != 0:
                raise SyclError(f"adopting the SYCL queue {adopt:#x}: {_one_line(self._error())}")
        elif lib.ffn_sycl_open(selector.encode(), ctypes.byref(q)) != 0:
            err, seen = self._error(), _device_names(lib)
            if seen == "none":
                seen += (" (environment: OCL_ICD_FILENAMES="
                         f"{os.environ.get('OCL_ICD_FILENAMES', '')!r}, ONEAPI_DEVICE_SELECTOR="
                         f"{os.environ.get('ONEAPI_DEVICE_SELECTOR', '')!r})")
            raise SyclError(f"SYCL device '{selector}': {_one_line(err)}; devices seen: {seen}")
        self._queue = q
        self.stats["open_s"] = round(time.perf_counter() - t0, 3)
        self.device = json.loads(self._check_text(lib.ffn_sycl_device_json(q)))
        try:
            _check_device(self.device)
        except SyclError:
            self.release()
            raise
        self._build()

    # ---- plumbing
    def _error(self) -> str:
        raw = self._lib.ffn_sycl_last_error()
        return raw.decode(errors="replace") if raw else "unknown error"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise SyclError(f"{what}: {_one_line(self._error())}")

    def _check_text(self, raw) -> str:
        if raw is None:
            raise SyclError(_one_line(self._error()))
        return raw.decode()

    def _build(self) -> None:
        sycl_dir, root = _sources()
        source = (sycl_dir / "kernels.cpp").read_text()
        headers = sorted((root / "kernels").glob("*.hpp"))
        names = [f"kernels/{h.name}".encode() for h in headers]
        texts = [h.read_bytes() for h in headers]
        opts = [o.encode() for o in _BUILD_OPTIONS]
        arr = lambda xs: (ctypes.c_char_p * max(len(xs), 1))(*xs)  # noqa: E731
        bundle = ctypes.c_void_p()
        t0 = time.perf_counter()
        rc = self._lib.ffn_sycl_build(self._queue, source.encode(), len(names), arr(names),
                                      arr(texts), len(opts), arr(opts), ctypes.byref(bundle))
        if rc != 0:
            log = self._error()
            lines = [ln for ln in log.splitlines() if "error" in ln.lower()] or log.splitlines()
            hint = ""
            missing = re.search(r"'([^']+)' file not found", log)
            if missing and "/" not in missing.group(1) and "." not in missing.group(1):
                hint = (f" (C++ header <{missing.group(1)}> not found: the kernel compiler "
                        "reads the host's C++ headers; install g++)")
            raise SyclError("compiling the SYCL kernels (sycl/kernels.cpp) failed" + hint +
                            ": " + _one_line("\n".join(lines[:3])))
        self._bundle = bundle
        self.stats["kernel_compile_s"] = round(time.perf_counter() - t0, 3)

    def kernel(self, name: str):
        k = self._kernels.get(name)
        if k is None:
            k = ctypes.c_void_p()
            self._check(self._lib.ffn_sycl_kernel(self._bundle, name.encode(), ctypes.byref(k)),
                        f"kernel {name}")
            self._kernels[name] = k
        return k

    def launch(self, name: str, n: int, local: int, args: Sequence[Tuple[int, object]],
               wait: bool = True) -> None:
        """Run kernel `name` over n work-items (rounded up to a multiple of `local`) and
        wait for it (``wait=False``: only submit it; on an in-order queue the queue's later
        work runs after it)."""
        if n <= 0:
            return
        kinds = (ctypes.c_int * len(args))(*[k for k, _ in args])
        bits = (ctypes.c_uint64 * len(args))()
        for i, (kind, v) in enumerate(args):
            if kind == _F64:
                bits[i] = int(np.float64(v).view(np.uint64))
            elif kind == _F32:
                bits[i] = int(np.float32(v).view(np.uint32))
            elif kind == _I64:
                bits[i] = int(v) & 0xFFFFFFFFFFFFFFFF
            else:
                bits[i] = int(v)
        local = max(1, min(local, int(self.device.get("max_work_group_size", 1))))
        glob = -(-n // local) * local
        self._check(self._lib.ffn_sycl_launch(self._queue, self.kernel(name), glob, local,
                                              len(args), kinds, bits, int(wait)), f"kernel {name}")

    # USM shared blocks are kept for reuse (size classes of powers of two, at most
    # _POOL_BYTES in all): the first touch of a fresh allocation costs page faults (about
    # 10 ms per 2 MB on the OpenCL CPU device), more than the kernels themselves.
    _POOL_BYTES = 512 << 20

    def shared(self, nbytes: int) -> Tuple[int, int]:
        """(pointer, capacity) of a USM shared block of at least nbytes."""
        cap = 1 << max(int(nbytes) - 1, 4095).bit_length()
        free = self._pool.get(cap)
        if free:
            self._pooled -= cap
            return free.pop(), cap
        p = self._lib.ffn_sycl_malloc(self._queue, cap, 0)
        if not p:
            raise SyclError(f"USM shared allocation of {nbytes} bytes: "
                            f"{_one_line(self._error())}")
        return p, cap

    def free(self, ptr: int, cap: int) -> None:
        if self._queue is None or not ptr:
            return
        if self._pooled + cap <= self._POOL_BYTES:
            self._pool.setdefault(cap, []).append(ptr)
            self._pooled += cap
        else:
            self._lib.ffn_sycl_free(self._queue, ptr)

    def is_usm_shared(self, ptr: int) -> bool:
        return self._lib.ffn_sycl_pointer_kind(self._queue, ptr) == 3

    def release(self) -> None:
        for k in self._kernels.values():
            self._lib.ffn_sycl_release_kernel(k)
        self._kernels.clear()
        if self._bundle is not None:
            self._lib.ffn_sycl_release_bundle(self._bundle)
            self._bundle = None
        for ptrs in self._pool.values():
            for p in ptrs:
                self._lib.ffn_sycl_free(self._queue, p)
        self._pool.clear()
        if self._queue is not None:
            self._lib.ffn_sycl_release_queue(self._queue)
            self._queue = None


def _check_device(device: dict) -> None:
    """What the kernels need of a device: fp64 and the run-time SYCL compiler."""
    if not device.get("fp64"):
        raise SyclError(f"the SYCL device {device['name']} has no fp64 (double) support, "
                        "which the kernels use; choose another device (FFN_SYCL_DEVICE)")
    if not device.get("can_compile_sycl"):
        raise SyclError(f"the SYCL device {device['name']} cannot compile SYCL source at run "
                        "time (sycl_ext_oneapi_kernel_compiler)")


def _device_names(lib) -> str:
    raw = lib.ffn_sycl_devices_json()
    if not raw:
        return "none"
    devs = json.loads(raw.decode())
    return ", ".join(f"{d['backend']}:{d['type']} {d['name']}" for d in devs) or "none"


_STATE: dict = {"lib": None, "backends": {}, "stats": {}, "selector": None}
_STATE_LOCK = threading.Lock()


def _load() -> ctypes.CDLL:
    if _STATE["lib"] is not None:
        return _STATE["lib"]
    stats = _STATE["stats"]
    prefix = _find_runtime()
    cache = cache_dir()
    stats.update(runtime=str(prefix), runtime_version=_runtime_version(), cache=str(cache),
                 env=_setup_environment(prefix, cache))
    lib_path = _host_library(prefix, cache, stats)
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        raise SyclError(f"loading the SYCL host glue {lib_path}: {e}") from None
    _declare(lib)
    if lib.ffn_sycl_abi_version() != _ABI_VERSION:
        raise SyclError(f"{lib_path}: ABI version mismatch; remove it and retry")
    stats["host_library"] = str(lib_path)
    _STATE["lib"] = lib
    atexit.register(_release_all)
    return lib


def _release_all() -> None:
    """Release every queue and bundle before the interpreter exits (an executable bundle
    destroyed during static destruction aborts the process)."""
    for b in list(_STATE["backends"].values()):
        try:
            b.release()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    _STATE["backends"].clear()


def select_device(selector: Optional[str]) -> None:
    """Device of the entry points from now on: ``[backend:]type[:index]`` (``cpu``,
    ``gpu``, ``level_zero:gpu``, ``opencl:cpu:0``, ...) or ``default``; None: back to
    ``$FFN_SYCL_DEVICE`` / the runtime's default."""
    _STATE["selector"] = selector


def _selector() -> str:
    return _STATE["selector"] or os.environ.get("FFN_SYCL_DEVICE") or "default"


def backend(selector: Optional[str] = None) -> Backend:
    """The backend of a device (opened, and its kernels compiled, on first use)."""
    sel = selector or _selector()
    with _STATE_LOCK:
        b = _STATE["backends"].get(sel)
        if b is None:
            lib = _load()
            stats = {k: v for k, v in _STATE["stats"].items()}
            b = Backend(lib, sel, stats)
            _STATE["backends"][sel] = b
        return b


def backend_for_queue(queue_ptr: int) -> Backend:
    """The backend of an existing ``sycl::queue`` (its address, e.g. torch's
    ``torch.xpu.current_stream().sycl_queue``), kernels built for its device on first use:
    work launched through it is ordered with the queue owner's (torch's) work."""
    key = f"queue@{int(queue_ptr):#x}"
    with _STATE_LOCK:
        b = _STATE["backends"].get(key)
        if b is None:
            lib = _load()
            b = Backend(lib, key, dict(_STATE["stats"]), adopt=int(queue_ptr))
            _STATE["backends"][key] = b
        return b


def info(selector: Optional[str] = None) -> dict:
    """What the backend uses: runtime, device, driver, fp64, cache, compile times."""
    b = backend(selector)
    d = b.device
    out = {"backend": d["backend"], "device": d["name"], "type": d["type"],
           "vendor": d["vendor"], "driver": d["driver"], "fp64": d["fp64"],
           "atomic64": d["atomic64"],
           "selector": b.selector}
    out.update({k: v for k, v in b.stats.items()})
    out["devices"] = json.loads(b._lib.ffn_sycl_devices_json().decode())
    return out


# ---------------------------------------------------------------------------- USM arrays


class _UsmBlock:
    """One USM shared allocation, freed when the last array over it goes."""

    def __init__(self, b: Backend, nbytes: int):
        self.backend = b
        self.nbytes = int(nbytes)
        self.ptr, self.cap = b.shared(nbytes)

    def array(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        buf = (ctypes.c_char * max(self.nbytes, 1)).from_address(self.ptr)
        buf._ffn_owner = self  # keeps the allocation alive as long as the array
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def __del__(self):
        try:
            self.backend.free(self.ptr, self.cap)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def empty(shape, dtype=np.float32, selector: Optional[str] = None) -> np.ndarray:
    """A C-contiguous NumPy array in USM shared memory of the device: passed to the entry
    points, it is used in place (no copies)."""
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if not isinstance(shape, int) else (shape,)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return _UsmBlock(backend(selector), nbytes).array(shape, dtype)


def _host_view(addr: int, nbytes: int) -> np.ndarray:
    """A uint8 view of host memory [addr, addr + nbytes)."""
    return np.frombuffer((ctypes.c_char * nbytes).from_address(addr), np.uint8)


class _Staged:
    """Host memory ranges staged in USM shared memory: ranges that overlap (the same
    canvas, views of one buffer) share one staging block, so writes through one are seen
    through the others, as on the host.  Ranges already in USM shared memory are used in
    place."""

    def __init__(self, b: Backend, ranges: List[Tuple[int, int]], copy_in: bool = True):
        self.backend = b
        self.blocks: List[Tuple[int, int, int, Optional[_UsmBlock]]] = []  # start, end, usm
        order = sorted(set(r for r in ranges if r[1] > r[0]))
        merged: List[List[int]] = []
        for s, e in order:
            if merged and s < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        for s, e in merged:
            if b.is_usm_shared(s):
                self.blocks.append((s, e, s, None))
                continue
            blk = _UsmBlock(b, e - s)
            if copy_in:
                np.copyto(blk.array((e - s,), np.uint8), _host_view(s, e - s))
            self.blocks.append((s, e, blk.ptr, blk))

    def device_ptr(self, addr: int) -> int:
        for s, e, usm, _ in self.blocks:
            if s <= addr < e:
                return usm + (addr - s)
        raise AssertionError("address outside the staged ranges")

    def copy_out(self) -> None:
        for s, e, _, blk in self.blocks:
            if blk is not None:
                np.copyto(_host_view(s, e - s), blk.array((e - s,), np.uint8))


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _stage_array(b: Backend, a: np.ndarray, copy_in: bool = True) -> _Staged:
    return _Staged(b, [(_addr(a), _addr(a) + a.nbytes)], copy_in)


# --------------------------------------------------------------------- argument checks
# The same checks and messages as the OpenMP bindings (csrc/fov_args.hpp,
# csrc/bind_common.hpp); tests/test_sycl_kernels.py runs the OpenMP tests' bad inputs
# through both.


def _require_f32(a, name: str, ndim: int, writeable: bool) -> np.ndarray:
    return _k._require_array(a, name, np.float32, ndim, writeable)


def _check_fov_size(f, name: str) -> None:
    if any(v < 1 or v % 2 == 0 for v in f):
        raise ValueError(f"{name}: FOV sizes must be odd and >= 1, got ({f[0]}, {f[1]}, {f[2]})")


def _canvases(canvases, k: int, writeable: bool) -> List[np.ndarray]:
    """The canvas of each FOV (csrc/fov_args.hpp resolve_canvases)."""
    if isinstance(canvases, np.ndarray):
        if canvases.ndim == 4:
            a = _require_f32(canvases, "canvases", 4, writeable)
            if a.shape[0] != k:
                raise ValueError("canvases: a 4-D canvases array must hold one canvas per FOV: "
                                 f"shape {a.shape} for {k} FOVs")
            return [a[i] for i in range(k)]
        a = _require_f32(canvases, "canvases", 3, writeable)
        return [a] * k
    if isinstance(canvases, (str, bytes)) or not hasattr(canvases, "__len__") \
            or not hasattr(canvases, "__getitem__"):
        raise ValueError("canvases: expected a list of 3-D float32 arrays, got "
                         f"{type(canvases).__name__}")
    if len(canvases) != k:
        raise ValueError(f"canvases: got {len(canvases)} canvases for {k} FOVs")
    return [_require_f32(canvases[i], f"canvases[{i}]", 3, writeable) for i in range(k)]


def _centers(centers, k: int, f, shapes) -> np.ndarray:
    """(K, 3) int64 centres whose boxes fit their canvases (resolve_centers)."""
    raw = centers if isinstance(centers, np.ndarray) else np.asarray(centers)
    is_int = raw.dtype.kind in "iu" and raw.dtype.isnative
    if not is_int and not (raw.size == 0 and raw.ndim == 2):
        raise ValueError(f"centers: expected an integer array, got dtype {raw.dtype}")
    if raw.ndim != 2 or raw.shape[0] != k or raw.shape[1] != 3:
        raise ValueError(f"centers: expected shape ({k}, 3), got {raw.shape}")
    c = np.ascontiguousarray(raw).astype(np.int64, casting="unsafe")  # uint64 wraps, as in C++
    for i in range(k):
        for d in range(3):
            if c[i, d] - f[d] // 2 < 0 or c[i, d] + f[d] // 2 >= shapes[i][d]:
                s = shapes[i]
                raise ValueError(
                    f"centers[{i}] = ({c[i, 0]}, {c[i, 1]}, {c[i, 2]}): the FOV box of size "
                    f"({f[0]}, {f[1]}, {f[2]}) does not fit inside canvas {i} of shape "
                    f"({s[0]}, {s[1]}, {s[2]})")
    return c


def _targets(b: Backend, cvs: List[np.ndarray], centers: np.ndarray,
             staged: _Staged) -> _UsmBlock:
    """The (K, 7) int64 FOV targets (device canvas pointer, shape, centre) in USM."""
    k = len(cvs)
    blk = _UsmBlock(b, 7 * 8 * k)
    t = blk.array((k, 7), np.int64)
    for i, c in enumerate(cvs):
        t[i, 0] = np.uint64(staged.device_ptr(_addr(c))).astype(np.int64)
        t[i, 1:4] = c.shape
    t[:, 4:7] = centers
    return blk


def _shares_memory(cvs: List[np.ndarray]) -> bool:
    """Whether two canvases share memory (the same array or views of one buffer)."""
    r = sorted((_addr(c), _addr(c) + c.nbytes) for c in cvs)
    return any(r[i][0] < r[i - 1][1] or r[i][0] == r[i - 1][0] for i in range(1, len(r)))


# ------------------------------------------------------------------------- entry points


def gather_fovs(canvases, centers, fov_size, pad_value: float, out: np.ndarray) -> np.ndarray:
    """:func:`floodfilling.kernels.gather_fovs` on the SYCL device."""
    f = _k._fov3(fov_size)
    pad = float(pad_value)
    _require_f32(out, "out", 4, True)
    _check_fov_size(f, "fov_size")
    if out.shape[1:] != f:
        raise ValueError(f"out: shape {out.shape} does not match fov_size ({f[0]}, {f[1]}, "
                         f"{f[2]})")
    k = out.shape[0]
    cvs = _canvases(canvases, k, False)
    c = _centers(centers, k, f, [a.shape for a in cvs])
    if k == 0:
        return out
    b = backend()
    with b._lock:
        staged = _Staged(b, [(_addr(a), _addr(a) + a.nbytes) for a in cvs])
        targets = _targets(b, cvs, c, staged)
        dout = _stage_array(b, out, copy_in=False)
        _launch_gather(b, f, targets.ptr, k, dout.device_ptr(_addr(out)), pad, wait=True)
        dout.copy_out()
    return out


def update_fovs(canvases, logits: np.ndarray, centers, *, move_threshold: float,
                deltas=(8, 8, 8), disco_seed_threshold: float = 0.0):
    """:func:`floodfilling.kernels.update_fovs` on the SYCL device."""
    d = _k._deltas3(deltas)
    thr, disco = float(move_threshold), float(disco_seed_threshold)
    _require_f32(logits, "logits", 4, True)
    f = tuple(int(v) for v in logits.shape[1:])
    _check_fov_size(f, "logits")
    if any(d[i] < 0 or d[i] > f[i] // 2 for i in range(3)):
        raise ValueError(f"deltas: each delta must lie in [0, fov_size // 2]; got ({d[0]}, "
                         f"{d[1]}, {d[2]}) for FOV size {logits.shape}")
    k = logits.shape[0]
    cvs = _canvases(canvases, k, True)
    c = _centers(centers, k, f, [a.shape for a in cvs])
    scores = np.empty((k, 6), np.float32)
    offsets = np.empty((k, 6, 3), np.int64)
    if k == 0:
        return scores, offsets
    serial = k > 1 and _shares_memory(cvs)
    b = backend()
    with b._lock:
        staged = _Staged(b, [(_addr(a), _addr(a) + a.nbytes) for a in cvs])
        targets = _targets(b, cvs, c, staged)
        dl = _stage_array(b, logits)
        res = _UsmBlock(b, k * 6 * 4 + k * 18 * 8)
        _launch_update(b, f, targets.ptr, k, dl.device_ptr(_addr(logits)), thr, d, disco,
                       res.ptr + k * 18 * 8, res.ptr, serial, wait=True)
        staged.copy_out()
        dl.copy_out()
        raw = res.array((k * 18 * 8 + k * 6 * 4,), np.uint8)
        offsets[...] = raw[: k * 18 * 8].view(np.int64).reshape(k, 6, 3)
        scores[...] = raw[k * 18 * 8:].view(np.float32).reshape(k, 6)
    return scores, offsets


def commit_object(logits: np.ndarray, logits_start, seg: np.ndarray, seg_start, size, *,
                  seg_threshold: float, min_size: int, new_id: int):
    """:func:`floodfilling.kernels.commit_object` on the SYCL device: a work-item per box row
    counts, then claims (sycl/kernels.cpp); the rows' runs are merged by id on the host."""
    ls, ss, sz = _k._commit_args(logits, logits_start, seg, seg_start, size, new_id)
    t = float(np.float32(seg_threshold))
    rows, bx = sz[0] * sz[1], sz[2]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if rows * bx == 0:
        return 0, *empty
    lsy, lsz = logits.shape[2], logits.shape[1] * logits.shape[2]
    ssy, ssz = seg.shape[2], seg.shape[1] * seg.shape[2]
    b = backend()
    with b._lock:
        dl = _stage_array(b, logits)
        dseg = _stage_array(b, seg)
        lp = dl.device_ptr(_addr(logits)) + 4 * (ls[0] * lsz + ls[1] * lsy + ls[2])
        sp = dseg.device_ptr(_addr(seg)) + 4 * (ss[0] * ssz + ss[1] * ssy + ss[2])
        geometry = [(_I64, lsz), (_I64, lsy), (_PTR, sp), (_I64, ssz), (_I64, ssy),
                    (_I64, sz[0]), (_I64, sz[1]), (_I64, bx), (_F32, t)]
        counts = _UsmBlock(b, 8 * rows)
        b.launch("ffn_commit_count", rows, 64, [(_PTR, lp), *geometry, (_PTR, counts.ptr)])
        n_new = int(counts.array((rows,), np.int64).sum())
        if n_new < min_size:
            return n_new, *empty
        runs = _UsmBlock(b, rows * bx * 12 + rows * 16)
        ids_p, lens_p = runs.ptr, runs.ptr + rows * bx * 4
        nruns_p, nnew_p = lens_p + rows * bx * 8, lens_p + rows * bx * 8 + rows * 8
        b.launch("ffn_commit_claim", rows, 64,
                 [(_PTR, lp), *geometry, (_I32, int(new_id)), (_PTR, ids_p), (_PTR, lens_p),
                  (_PTR, nruns_p), (_PTR, nnew_p)])
        dseg.copy_out()
        raw = runs.array((rows * bx * 12 + rows * 16,), np.uint8)
        run_ids = raw[: rows * bx * 4].view(np.int32).reshape(rows, bx)
        run_lens = raw[rows * bx * 4: rows * bx * 12].view(np.int64).reshape(rows, bx)
        tail = raw[rows * bx * 12:].view(np.int64)
        n_runs, n_new = tail[:rows], int(tail[rows:].sum())
        used = np.arange(bx)[None, :] < n_runs[:, None]
        ids, inverse = np.unique(run_ids[used].astype(np.int64), return_inverse=True)
        totals = np.bincount(inverse, weights=run_lens[used], minlength=ids.size)
    return n_new, ids, totals.astype(np.int64)


def union_find(edges):
    """:func:`floodfilling.kernels.union_find` with the components found on the SYCL device
    (hooking and pointer jumping, sycl/kernels.cpp); the distinct ids sorted on the host."""
    e = _k._edges_input(edges)
    ids = np.unique(e)
    m, n = e.shape[0], ids.size
    if m == 0:
        return ids, ids.copy()
    b = backend()
    with b._lock:
        blocks = {name: _UsmBlock(b, 8 * size) for name, size in
                  (("ends", 2 * m), ("ids", n), ("index", 2 * m), ("parent", n), ("flag", 1))}
        blocks["ends"].array((2 * m,), np.uint64)[...] = e.reshape(-1)
        blocks["ids"].array((n,), np.uint64)[...] = ids
        parent = blocks["parent"].array((n,), np.int64)
        parent[...] = np.arange(n)
        flag = blocks["flag"].array((1,), np.uint32)
        ptr = {name: blk.ptr for name, blk in blocks.items()}
        b.launch("ffn_uf_index", 2 * m, 256,
                 [(_PTR, ptr["ends"]), (_I64, 2 * m), (_PTR, ptr["ids"]), (_I64, n), (_PTR, ptr["index"])])
        while True:
            flag[0] = 0
            b.launch("ffn_uf_hook", m, 256,
                     [(_PTR, ptr["index"]), (_I64, m), (_PTR, ptr["parent"]), (_PTR, ptr["flag"])])
            b.launch("ffn_uf_compress", n, 256, [(_PTR, ptr["parent"]), (_I64, n)])
            if not flag[0]:
                break
        roots = ids[parent]
    return ids, roots


class FovSteps:
    """The flood step's FOV gather and update on memory the caller owns, with no copies and
    no checks: the canvases, the FOV buffers and the results are device-accessible memory
    (torch tensors on an xpu device, or USM shared host memory on a CPU device), passed as
    addresses.  Used by the device-resident flood (:mod:`floodfilling.inference.device`)
    under ``kernels="sycl"``, which checks the geometry once per step on the host.

    ``targets``: the address of a (K, 7) int64 table in device-accessible memory, one row per
    FOV: canvas address, canvas shape (z, y, x), FOV centre (z, y, x) (the box inside the
    canvas).  ``wait``: wait for the kernel (needed when the host reads its results next and
    the queue is not the one the reading copy is ordered on)."""

    def __init__(self, b: Backend, fov_size):
        self.backend = b
        self.f = tuple(int(v) for v in fov_size)
        _check_fov_size(self.f, "fov_size")

    def gather(self, targets: int, k: int, out: int, pad_value: float, wait: bool) -> None:
        """out (K, fz, fy, fx) float32 = the canvas boxes, NaN replaced by ``pad_value``."""
        _launch_gather(self.backend, self.f, targets, k, out, pad_value, wait)

    def update(self, targets: int, k: int, logits: int, *, move_threshold: float,
               deltas, disco_seed_threshold: float, scores: int, offsets: int,
               wait: bool) -> None:
        """The disco rule and the write of K FOVs of ``logits`` (K, fz, fy, fx) float32 into
        distinct canvases, ``logits`` left holding what was written; the six face maxima into
        ``scores`` (K, 6) float32 and their offsets into ``offsets`` (K, 6, 3) int64."""
        _launch_update(self.backend, self.f, targets, k, logits, move_threshold, _k._deltas3(deltas),
                       disco_seed_threshold, scores, offsets, False, wait)


# The two FOV kernels' launches (arguments in the order of sycl/kernels.cpp), for the entry
# points (host arrays, staged) and FovSteps (memory the caller owns) alike.

def _launch_gather(b: Backend, f, targets: int, k: int, out: int, pad_value: float, wait: bool) -> None:
    b.launch("ffn_gather_fovs", k * f[0] * f[1], 64,
             [(_PTR, targets), (_I64, k), (_PTR, out), (_I64, f[0]), (_I64, f[1]), (_I64, f[2]),
              (_F32, float(pad_value))], wait)


def _launch_update(b: Backend, f, targets: int, k: int, logits: int, move_threshold: float, d,
                   disco_seed_threshold: float, scores: int, offsets: int, serial: bool, wait: bool) -> None:
    """``serial``: the FOVs in order by one work-item (canvases that share memory)."""
    b.launch("ffn_update_fovs_serial" if serial else "ffn_update_fovs", 1 if serial else k, 1,
             [(_PTR, targets), (_I64, k), (_PTR, logits), (_I64, f[0]), (_I64, f[1]), (_I64, f[2]),
              (_F32, float(move_threshold)), (_F64, float(disco_seed_threshold)), (_I64, d[0]),
              (_I64, d[1]), (_I64, d[2]), (_PTR, scores), (_PTR, offsets)], wait)


def _greedy_spacing(idx: np.ndarray, shape, d: int) -> np.ndarray:
    """kernels/peaks.hpp greedy_spacing over candidates already sorted (descending value,
    ties in raster order): a candidate is dropped when an accepted one lies at Chebyshev
    distance < d; accepted points are kept in a grid of d^3 cells (at most one per cell)."""
    nz, ny, nx = shape
    zyx = np.stack(np.unravel_index(idx, shape), 1).tolist()
    g = [(nz + d - 1) // d, (ny + d - 1) // d, (nx + d - 1) // d]
    grid: Dict[Tuple[int, int, int], Tuple[int, int, int]] = {}
    out = []
    for i, (z, y, x) in zip(idx.tolist(), zyx):
        cz, cy, cx = z // d, y // d, x // d
        ok = True
        for a in range(max(cz - 1, 0), min(cz + 2, g[0])):
            for b in range(max(cy - 1, 0), min(cy + 2, g[1])):
                for e in range(max(cx - 1, 0), min(cx + 2, g[2])):
                    p = grid.get((a, b, e))
                    if p is not None and abs(p[0] - z) < d and abs(p[1] - y) < d \
                            and abs(p[2] - x) < d:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid[(cz, cy, cx)] = (z, y, x)
            out.append(i)
    return np.array(out, np.int64)


def find_peaks(image: np.ndarray, min_distance: int = 3, threshold: float | None = 0.0,
               exclude_border=True) -> np.ndarray:
    """:func:`floodfilling.kernels.find_peaks` with its maximum filter and candidate test on
    the SYCL device; the candidates' sort and the greedy spacing (serial) on the host."""
    args = _k._find_peaks_args(image, min_distance, threshold, exclude_border)
    if args is None:
        return np.zeros((0, 3), np.int64)
    image, md, thr, border = args
    nz, ny, nx = image.shape
    n, rows = image.size, nz * ny
    plain = md == 0 or n == 1
    sfx, tkind = ("f32", _F32) if image.dtype == np.float32 else ("f64", _F64)
    b = backend()
    with b._lock:
        img = _stage_array(b, image)
        ip = img.device_ptr(_addr(image))
        work = _UsmBlock(b, 2 * image.nbytes + n + rows)
        xmax, max2d = work.ptr, work.ptr + image.nbytes
        cand, flags = work.ptr + 2 * image.nbytes, work.ptr + 2 * image.nbytes + n
        if not plain:
            b.launch(f"ffn_peaks_xmax_{sfx}", rows, 64,
                     [(_PTR, ip), (_PTR, xmax), (_I64, rows), (_I64, nx), (_I64, md)])
            b.launch(f"ffn_peaks_ymax_{sfx}", rows, 64,
                     [(_PTR, xmax), (_PTR, max2d), (_I64, nz), (_I64, ny), (_I64, nx),
                      (_I64, md)])
        b.launch(f"ffn_peaks_test_{sfx}", rows, 64,
                 [(_PTR, ip), (_PTR, max2d), (_PTR, xmax), (_PTR, cand), (_PTR, flags),
                  (_I64, nz), (_I64, ny), (_I64, nx), (_I64, md), (tkind, thr),
                  (_I64, border[0]), (_I64, border[1]), (_I64, border[2]), (_I64, int(plain))])
        raw = work.array((2 * image.nbytes + n + rows,), np.uint8)
        idx = np.flatnonzero(raw[2 * image.nbytes: 2 * image.nbytes + n])
        fl = np.bitwise_or.reduce(raw[2 * image.nbytes + n:])
    if fl & 1:
        raise ValueError("image: contains NaN (not supported by find_peaks)")
    if (not plain and not fl & 2) or idx.size == 0:
        return np.zeros((0, 3), np.int64)
    if md > 1:
        order = np.argsort(-image.reshape(-1)[idx], kind="stable")
        idx = np.sort(_greedy_spacing(idx[order], image.shape, md))
    return np.stack(np.unravel_index(idx, image.shape), 1).astype(np.int64)


def count_pairs(a: np.ndarray, b: np.ndarray, *, ignore_zero: bool = False):
    """:func:`floodfilling.kernels.count_pairs`: run starts and the counting (device hash
    tables, sycl/kernels.cpp) on the SYCL device; the M distinct pairs sorted on the host.
    Labels are widened to uint64 on the device; the tables take 4 x 16 bytes per run."""
    a, b = _k._count_pairs_args(a, b)
    n = a.size
    if n == 0:
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    b_ = backend()
    if not b_.device.get("atomic64"):
        raise SyclError(f"the SYCL device {b_.device['name']} has no 64-bit atomics, which "
                        "count_pairs uses")
    with b_._lock:
        ab = _UsmBlock(b_, 16 * n + n)
        view = ab.array((16 * n + n,), np.uint8)
        la, lb = view[: 8 * n].view(np.uint64), view[8 * n: 16 * n].view(np.uint64)
        np.copyto(la, a.reshape(-1), casting="safe")
        np.copyto(lb, b.reshape(-1), casting="safe")
        pa, pb, ps = ab.ptr, ab.ptr + 8 * n, ab.ptr + 16 * n
        b_.launch("ffn_count_pairs_starts", n, 256,
                  [(_PTR, pa), (_PTR, pb), (_I64, n), (_PTR, ps)])
        runs = int(np.count_nonzero(view[16 * n:]))
        cap = 1 << max(2 * runs - 1, 15).bit_length()  # >= 2 runs: the tables never fill
        tables = _UsmBlock(b_, 4 * 8 * (cap + 1))
        t = tables.array((4, cap + 1), np.uint64)
        t[...] = 0
        ta, tb, tp, tc = (tables.ptr + i * 8 * (cap + 1) for i in range(4))
        b_.launch("ffn_count_pairs_insert", n, 256,
                  [(_PTR, pa), (_PTR, pb), (_I64, n), (_PTR, ps), (_PTR, ta), (_I64, cap),
                   (_PTR, tb), (_I64, cap), (_PTR, tp), (_I64, cap), (_PTR, tc)])
        occ = np.flatnonzero(t[2, :cap])
        key = t[2, occ] - np.uint64(1)
        counts = t[3, occ].astype(np.int64)
        sa = (key // np.uint64(cap + 1)).astype(np.int64)
        sb = (key % np.uint64(cap + 1)).astype(np.int64)
        top = np.uint64(0xFFFFFFFFFFFFFFFF)
        lab_a = np.where(sa == cap, top, t[0, sa] - np.uint64(1))
        lab_b = np.where(sb == cap, top, t[1, sb] - np.uint64(1))
    if ignore_zero:
        keep = (lab_a != 0) & (lab_b != 0)
        lab_a, lab_b, counts = lab_a[keep], lab_b[keep], counts[keep]
    order = np.lexsort((lab_b, lab_a))
    return np.stack([lab_a[order], lab_b[order]], 1).astype(np.uint64), counts[order]


def relabel(labels: np.ndarray, keys, values) -> np.ndarray:
    """:func:`floodfilling.kernels.relabel` on the SYCL device."""
    labels, keys, values = _k._relabel_args(labels, keys, values)
    if labels.dtype == np.uint32 and keys.size:
        lim = np.uint64(0xFFFFFFFF)
        bad = np.nonzero((keys <= lim) & (values > lim))[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"values: values[{i}] = {int(values[i])} does not fit in the "
                             "uint32 labels")
    if labels.size == 0 or keys.size == 0:
        return labels
    b = backend()
    with b._lock:
        dlab = _stage_array(b, labels)
        kv = _UsmBlock(b, 16 * keys.size)
        kv.array((2, keys.size), np.uint64)[...] = (keys, values)
        name = "ffn_relabel_u32" if labels.dtype == np.uint32 else "ffn_relabel_u64"
        b.launch(name, labels.size, 256,
                 [(_PTR, dlab.device_ptr(_addr(labels))), (_I64, labels.size),
                  (_PTR, kv.ptr), (_PTR, kv.ptr + 8 * keys.size), (_I64, keys.size)])
        dlab.copy_out()
    return labels


# ------------------------------------------------------------------------------ report


def _report(argv: Optional[List[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m floodfilling.sycl_backend",
                                description="What the SYCL backend uses (device, driver, fp64, "
                                            "cache, compile times).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default=None, help="selector, e.g. cpu, gpu, level_zero:gpu")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rep = info(a.device)
    except SyclError as e:
        if a.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"SYCL backend: {e}", file=sys.stderr)
        return 1
    rep["first_call_s"] = round(time.perf_counter() - t0, 3)
    if a.json:
        print(json.dumps(rep, indent=2))
        return 0
    for key in ("backend", "device", "type", "vendor", "driver", "fp64", "atomic64", "selector",
                "runtime", "runtime_version", "cache", "host_library", "host_cached",
                "host_compile_s", "open_s", "kernel_compile_s", "first_call_s"):
        if key in rep:
            print(f"{key:17s} {rep[key]}")
    print("devices           " + "; ".join(f"{d['backend']}:{d['type']} {d['name']}"
                                            for d in rep["devices"]))
    return 0


if __name__ == "__main__":
    sys.exit(_report())
