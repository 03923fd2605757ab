"""Native CPU decode attention: `cpu/paged_decode.c`, compiled at first use, called via ctypes.

One `cc` call and no torch headers, ninja or pybind, so the first build takes a second or less.
The library is cached per user under `$LLMSERVE_CACHE/native` (default
`~/.cache/llmserve/native`), named by a hash of the source, flags, compiler and CPU (it is built
with -march=native), and written under a temporary name then renamed, so processes building at
once never load a half-written file. Whenever it cannot be used (LLMSERVE_NATIVE_KERNELS=0, no
compiler, a failed build, another OS) `load()` returns None, says why once in the log, and
callers stay on the pure-torch path. `build(source=...)` builds and caches other C sources the
same way (the fused element-wise ops of `cpu_fused`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "paged_decode.c"
ENV_SWITCH = "LLMSERVE_NATIVE_KERNELS"
# No -ffast-math, so sums are reordered only where the source says so (`omp simd`). -march=native
# is safe because the library is built where it runs (the CPU is in the cache key). -fopenmp
# links libgomp, which resolves to the copy torch has loaded (same soname), so the kernel's
# threads are torch's; without it, -fopenmp-simd honours the simd pragmas in one thread.
# Compilers (or runtimes) that reject a set get the next one.
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast")
FLAG_SETS = (FLAGS + ("-fopenmp", "-march=native"), FLAGS + ("-fopenmp-simd", "-march=native"),
             FLAGS + ("-fopenmp-simd",))
_SYMBOL = "llmserve_paged_decode_f32"
_ERRORS = {
    -1: "a decode sequence length is below 1 or longer than its block table row",
    -2: "a block table entry is outside the KV cache",
    -3: "out of memory",
}
_P, _I = ctypes.c_void_p, ctypes.c_int64
# (out, q, q row/head strides, k, v, num_blocks, block_size, heads, kv heads, head_dim, scale)
# per layer, then (table, its element size and width, seq_lens, rows, num_seqs, window) per
# step (window 0 = full attention).
_ARGTYPES = [_P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I, _I, _P, _P, _I, _I]


class NativeUnavailable(RuntimeError):
    """The native library cannot be built or loaded here (the torch path is used instead)."""


def cache_dir() -> Path:
    """`$LLMSERVE_CACHE/native` (default ~/.cache/llmserve/native), or a per-user folder under the
    temporary directory when that one cannot be created or written (a read-only home)."""
    base = os.environ.get("LLMSERVE_CACHE") or Path.home() / ".cache/llmserve"
    preferred = Path(base) / "native"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"llmserve-native-{os.getuid()}"


def find_compiler() -> str | None:
    """Python's configured C compiler if it exists here (CC may carry flags), else `cc`."""
    for name in (sysconfig.get_config_var("CC") or "", "cc"):
        exe = shutil.which(name.split()[0]) if name.strip() else None
        if exe:
            return exe
    return None


def _machine_id() -> str:
    """The CPU the library is tuned for: -march=native output may not run on another one."""
    ident = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            ident += sorted({ln for ln in f if ln.startswith(("model name", "flags"))})
    except OSError:
        pass
    return "\n".join(ident)


def build(directory: Path | None = None, source: Path | None = None,
          flag_sets: tuple[tuple[str, ...], ...] | None = None) -> Path:
    """Path of the compiled library of `source` (default: the decode kernel), compiling it first
    unless a build for this source, compiler, flags and CPU is cached. `flag_sets` (default:
    FLAG_SETS) are tried in order. Raises NativeUnavailable."""
    source = source or SOURCE
    flag_sets = FLAG_SETS if flag_sets is None else flag_sets
    cc = find_compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (looked for sysconfig CC and cc)")
    directory = directory or cache_dir()
    real = os.path.realpath(cc)
    stat = os.stat(real)
    # The headers next to the source are part of it (#include "..."): a change rebuilds.
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    ident = (source.read_bytes(), headers, real, stat.st_size, stat.st_mtime_ns, _machine_id())
    targets = []
    for flags in flag_sets:
        key = hashlib.sha256(repr((ident, flags)).encode()).hexdigest()[:20]
        targets.append((flags, directory / f"{source.stem}-{key}.so"))
    for _, target in targets:
        if target.exists():
            return target
    errors = []
    for flags, target in targets:
        try:
            _compile(cc, flags, target, source)
            return target
        except NativeUnavailable as exc:
            errors.append(str(exc))
    raise NativeUnavailable("; ".join(errors))


def _compile(cc: str, flags: tuple[str, ...], target: Path, source: Path) -> None:
    """Compile to a temporary name and rename: concurrent builders never expose a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise NativeUnavailable(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic; a concurrent builder's identical file may be replaced
        logger.info("built native CPU kernels %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_library(source: Path | None = None) -> ctypes.CDLL:
    """Build (or find cached) and load `source`. A build that compiles but does not load here
    (an OpenMP runtime this process cannot take, say) gives way to the next flag set."""
    errors = []
    for first in range(len(FLAG_SETS)):
        path = build(source=source, flag_sets=FLAG_SETS[first:])
        try:
            return ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(f"{path.name}: {exc}")
    raise NativeUnavailable("; ".join(errors))


def switched_off(name: str = ENV_SWITCH) -> bool:
    """Whether the environment variable `name` (default LLMSERVE_NATIVE_KERNELS) turns its
    feature off: 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def load_functions(source: Path, signatures: dict[str, tuple[list[Any], Any]],
                   what: str) -> list[Any] | None:
    """The functions named in `signatures` (name -> (argtypes, restype)) from `source`'s library,
    typed, in order; or None when the native kernels are switched off, not built on this OS, or
    fail to build or load, with the reason logged (`what` names the kernels). Callers cache the
    result, so each reason is logged once."""
    if switched_off():
        logger.info("%s disabled by %s; using torch", what, ENV_SWITCH)
        return None
    if sys.platform not in ("linux", "darwin"):
        logger.info("%s: native CPU kernels are built on Linux and macOS only; using torch", what)
        return None
    try:
        lib = open_library(source)
        fns = []
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
            fns.append(fn)
    except Exception as exc:  # any failure here must leave the caller on torch
        logger.warning("%s unavailable, using torch: %s", what, exc)
        return None
    return fns


@functools.cache
def load() -> Any | None:
    """The ctypes function of the native decode kernel, or None (reason logged once).

    Cached for the process; tests call `load.cache_clear()` after changing the environment.
    """
    fns = load_functions(SOURCE, {_SYMBOL: (_ARGTYPES, ctypes.c_int)}, "native CPU attention")
    return fns[0] if fns else None


@dataclass
class DecodeBatch:
    """Decode rows of one step as the kernel reads them: prepared once, used by every layer."""

    block_tables: torch.Tensor  # [n, width] int32 or int64, contiguous
    seq_lens: torch.Tensor  # [n] int64
    rows: torch.Tensor  # [n] int64: the row of q (and of the output) of each sequence
    fn: Any  # the loaded kernel
    step_args: tuple[int, ...]  # its per-step arguments (pointers into the tensors above)
    window: int | None = None  # sliding window: each row reads only its last `window` positions

    @classmethod
    def build(
        cls, block_tables: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor,
        window: int | None = None,
    ) -> DecodeBatch:
        """Needs `load()` to have succeeded."""
        if block_tables.dtype not in (torch.int32, torch.int64):
            block_tables = block_tables.long()
        tables = block_tables.contiguous()
        lens, rows = seq_lens.long().contiguous(), rows.long().contiguous()
        args = (tables.data_ptr(), tables.element_size(), tables.shape[1], lens.data_ptr(),
                rows.data_ptr(), rows.numel(), window or 0)
        return cls(tables, lens, rows, load(), args, window)


def decode_error(status: int) -> IndexError:
    """The error for a nonzero status of the decode kernel (also returned by the decode driver)."""
    return IndexError(f"native paged decode: {_ERRORS.get(status, status)}")


def accepts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: fp32 on CPU, contiguous caches, unit-stride heads.
    (Checked per layer, so written with the cheapest tensor attributes.)"""
    if not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu):
        return False
    if not (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32):
        return False
    qs, ks = q.shape, k_cache.shape
    return (
        len(qs) == 3 and len(ks) == 4 and ks == v_cache.shape and ks[2] > 0
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and q.stride(2) == 1 and qs[2] == ks[3] and qs[1] % ks[2] == 0
    )


def paged_decode(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
) -> None:
    """Fill `out[batch.rows]` (contiguous, shaped as q) with each decode row's attention over its
    cached context. The caller checks `accepts(q, k_cache, v_cache)` first."""
    nb, bs, kvh, hd = k_cache.shape
    row_stride, head_stride, _ = q.stride()
    status = batch.fn(
        out.data_ptr(), q.data_ptr(), row_stride, head_stride, k_cache.data_ptr(),
        v_cache.data_ptr(), nb, bs, q.shape[1], kvh, hd, scale, *batch.step_args,
    )
    if status:
        raise decode_error(status)
