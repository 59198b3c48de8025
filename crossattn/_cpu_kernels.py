"""Compiled CPU helpers of the torch backend (``_cpu_kernels.c``), built at first use: the
Philox dropout mask, and float32 softmax (+ dropout) and softmax-backward kernels.

Plain C, compiled with the system compiler (``$CC``, else ``cc``/``gcc``/``clang``) in a
fraction of a second and loaded with ctypes -- no PyTorch headers, no build step at install.
The library is cached per source, compiler and CPU under ``$CROSSATTN_CACHE_DIR`` (default
``~/.cache/crossattn``). Where it cannot be built (no compiler, Windows, a read-only home and
temp) or ``CROSSATTN_CPU_KERNELS=0``, callers run their torch-op versions: the same dropout
bits, and torch's softmax (the kernels' softmax is within twice its float32 error).

Only eager CPU calls on plain tensors use it: fake, meta and traced tensors (and tensors that
autograd records) take the torch ops, which the tracers understand.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_lock = threading.Lock()
_lib = None
_why_not: str | None = None  # why the library is unavailable, once tried

# Bit pattern of 1 in each output format: the mask is written as 0 / one.
_ONE = {torch.bool: 1, torch.uint8: 1, torch.float16: 0x3C00, torch.bfloat16: 0x3F80,
        torch.float32: 0x3F800000, torch.float64: 0x3FF0000000000000}


def _cpu_id() -> str:
    """What the compiled code depends on (-march=native): the machine and its CPU flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    except OSError:
        info = []
    return "|".join([platform.machine(), platform.processor(), *info])


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (which may carry a wrapper, e.g. ``ccache gcc``), else the
    first of cc, gcc, clang on the PATH."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        first = shutil.which(cc[0])
        return None if first is None else [first, *cc[1:]]
    found = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    return None if found is None else [found]


def _cache_dirs() -> list[Path]:
    env = os.environ.get("CROSSATTN_CACHE_DIR")
    dirs = [Path(env)] if env else []
    if not env:
        try:
            dirs.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossattn")
        except RuntimeError:  # no home directory
            pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return dirs + [Path(tempfile.gettempdir()) / f"crossattn-{uid}"]


def _private(path: Path) -> bool:
    """Ours alone to write (a library loaded from a folder others can write could be theirs)."""
    st = path.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


_BUILD_TIMEOUT_S = 60


def _build() -> ctypes.CDLL:
    if sys.platform == "win32":
        raise OSError("compiled CPU kernels are built on POSIX systems only")
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    source = _SOURCE.read_bytes()
    # a compiler without -march=native gets the portable build; -ffp-contract=fast: FMAs (ISO C
    # mode would forbid contracting a * b + c, doubling the softmax's arithmetic)
    attempts = (["-O3", "-march=native", "-ffp-contract=fast"], ["-O3", "-ffp-contract=fast"], ["-O3"])
    last = ""
    for flags in attempts:
        tag = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), " ".join(flags).encode(),
                                         _cpu_id().encode(), platform.python_version().encode()])).hexdigest()[:16]
        for folder in _cache_dirs():
            lib = folder / f"cpu_kernels-{tag}.so"
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not _private(folder):
                    last = f"{folder} is writable by others: not used"
                    continue
                if lib.exists() and _private(lib):
                    try:
                        return ctypes.CDLL(str(lib))
                    except OSError:
                        pass  # a broken file (a full disk, another machine's build): rebuilt below
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
            except OSError as exc:
                last = f"cannot use {folder}: {exc}"
                continue
            try:
                cmd = [*cc, *flags, "-std=c11", "-fPIC", "-shared", "-pthread", "-o", tmp, str(_SOURCE)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    last = f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
                    break  # the same flags fail in every folder: try the next flags
                os.chmod(tmp, 0o755)
                os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
                return ctypes.CDLL(str(lib))
            except subprocess.TimeoutExpired:
                raise OSError(f"{' '.join(cmd)} took over {_BUILD_TIMEOUT_S} s: not retried") from None
            except (OSError, subprocess.SubprocessError) as exc:
                last = f"building {lib} failed: {exc}"
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    raise OSError(last or "the CPU kernels could not be built")


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the C signatures (ctypes would otherwise pass every integer as a C int)."""
    u64, i64, ptr, c_int = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    f32, u32 = ctypes.c_float, ctypes.c_uint32
    for fn, args in ((lib.crossattn_philox_mask, [u64, u64, c_int, ptr, i64, ptr, i64, i64, u32, c_int, u64, ptr, ptr,
                                                  c_int]),
                     (lib.crossattn_softmax_f32, [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, u64, u64, ptr,
                                                  ptr, u32, c_int]),
                     (lib.crossattn_softmax_bwd_f32, [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, ptr, i64, i64,
                                                      i64, i64, i64, c_int])):
        fn.argtypes, fn.restype = args, c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on first call; None where it is unavailable."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is None and _why_not is None:
            if os.environ.get("CROSSATTN_CPU_KERNELS", "1") == "0":
                _why_not = "CROSSATTN_CPU_KERNELS=0"
                return None
            try:
                _lib = bind(_build())
            except OSError as exc:
                _why_not = str(exc)
    return _lib


def unavailable_reason() -> str | None:
    """Why the compiled CPU kernels are not used (None when they are), after trying to build them."""
    library()
    return _why_not


def _plain_cpu(t: torch.Tensor) -> bool:
    """A real CPU tensor whose memory the C code may read or write behind autograd's back."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()
            and not (t.requires_grad and torch.is_grad_enabled()))


def philox_mask(seed, threshold: int, *, bh: torch.Tensor, rows: torch.Tensor, cols: int, direction: int,
                dropped: bool, out: torch.Tensor, src: torch.Tensor | None = None, lib: ctypes.CDLL | None = None
                ) -> bool:
    """Writes the dropout mask of ``crossattn._philox`` into ``out`` ([len(bh), len(rows), cols]
    elements, contiguous): 0/1 in ``out``'s dtype, or with ``src`` (same shape and dtype) ``src``
    where kept and 0 where dropped. Returns False, touching nothing, where the compiled code
    cannot serve the call (the caller then runs its torch ops). ``lib``: another build (tests)."""
    if torch.compiler.is_compiling() or out.dtype not in _ONE:
        return False
    tensors = [out, bh, rows] + ([] if src is None else [src])
    if isinstance(seed, torch.Tensor):
        tensors.append(seed)
    if not all(_plain_cpu(t) for t in tensors) or bh.dtype != torch.int64 or rows.dtype != torch.int64:
        return False
    if out.numel() != len(bh) * len(rows) * cols or (src is not None and (src.dtype != out.dtype
                                                                           or src.shape != out.shape)):
        return False
    lib = library() if lib is None else lib
    if lib is None:
        return False
    seed = int(seed)  # a CPU value: reading it costs no device sync
    rc = lib.crossattn_philox_mask(
        seed & 0xFFFFFFFFFFFFFFFF, threshold, int(dropped), bh.data_ptr(), len(bh), rows.data_ptr(), len(rows),
        cols, direction, out.element_size(), _ONE[out.dtype], None if src is None else src.data_ptr(),
        out.data_ptr(), _threads(out.numel()))
    return rc == 0


def _threads(numel: int) -> int:
    return min(torch.get_num_threads(), max(1, numel >> 16))  # a thread per 64 Ki elements or more


def _f32_rows(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (_plain_cpu(t) and t.dtype == torch.float32) for t in tensors)


def can_softmax() -> bool:
    """Whether eager calls here may take the fused float32 softmax kernels (the library is
    built, nothing is being traced): the caller then keeps its buffers in their layout."""
    return not torch.compiler.is_compiling() and library() is not None


def softmax(s: torch.Tensor, p: torch.Tensor, coef: torch.Tensor, *, heads: int, pd: torch.Tensor | None = None,
            keep_scale: float = 1.0, seed=0, threshold: int = 0, bh: torch.Tensor | None = None,
            rows: torch.Tensor | None = None, direction: int = 0, lib: ctypes.CDLL | None = None) -> bool:
    """``p = softmax(s * coef[head])`` over the last dim of float32 ``[B, H, R, Lk]`` logits
    (``p`` may be ``s``; a -inf logit is a masked key, a row without one gives 0), and with
    ``pd`` the dropout of :mod:`crossattn._philox` (``seed``, ``threshold``, counters ``bh``
    ``[B * H]`` and ``rows`` ``[R]``, ``direction``): ``pd = p * keep_scale`` where kept, 0
    where dropped (``pd`` may be ``s``). ``coef``: float32, 1 or H values. Returns False,
    touching nothing, where the compiled code cannot serve the call. ``lib``: another build (tests)."""
    lib = (library() if lib is None else lib) if can_softmax() else None
    if lib is None or s.dim() != 4 or not _f32_rows(s, p, pd, coef) or p.shape != s.shape:
        return False
    B, H, R, Lk = s.shape
    if s.numel() == 0:
        return True  # nothing to write
    if H != heads or coef.numel() not in (1, heads) or (pd is not None and (
            pd.shape != s.shape or bh is None or rows is None or not all(_plain_cpu(t) for t in (bh, rows))
            or bh.dtype != torch.int64 or rows.dtype != torch.int64 or bh.numel() != B * H or rows.numel() != R)):
        return False
    rc = lib.crossattn_softmax_f32(
        s.data_ptr(), p.data_ptr(), None if pd is None else pd.data_ptr(), coef.data_ptr(), coef.numel(), H, B * H,
        R, Lk, keep_scale, int(seed) & 0xFFFFFFFFFFFFFFFF, threshold, None if bh is None else bh.data_ptr(),
        None if rows is None else rows.data_ptr(), direction, _threads(s.numel()))
    return rc == 0


def softmax_backward(out: torch.Tensor, p: torch.Tensor, coef: torch.Tensor, *, heads: int,
                     dp: torch.Tensor | None = None, pd: torch.Tensor | None = None, dw: torch.Tensor | None = None,
                     dw_scale: float = 1.0, lib: ctypes.CDLL | None = None) -> bool:
    """The gradient of the logits ``s`` of :func:`softmax`, into ``out`` (which may be
    ``dp``): ``coef * (t - p * rowsum(t))`` with ``t = pd * dp + p * dw * dw_scale`` (``pd``
    None: ``p``; ``dp`` or ``dw`` None: that term is 0). float32 ``[B, H, R, Lk]`` for all
    but ``dw``: ``[B, H, R, Lk]`` or ``[B, R, Lk]`` (head means: the same for every head),
    any strides with contiguous keys. Returns False, touching nothing, where it cannot serve."""
    lib = (library() if lib is None else lib) if can_softmax() else None
    if lib is None or p.dim() != 4 or not _f32_rows(out, p, coef, dp, pd):
        return False
    B, H, R, Lk = p.shape
    if (H != heads or coef.numel() not in (1, heads) or out.shape != p.shape
            or any(t is not None and t.shape != p.shape for t in (dp, pd))):
        return False
    if p.numel() == 0:
        return True  # nothing to write (an empty dw may have any strides)
    strides = (0, 0, 0)
    if dw is not None:
        if type(dw) is not torch.Tensor or dw.device.type != "cpu" or dw.dtype != torch.float32 or (
                dw.requires_grad and torch.is_grad_enabled()):
            return False
        if dw.shape == p.shape and (dw.stride(-1) == 1 or Lk <= 1):
            strides = (dw.stride(0), dw.stride(1), dw.stride(2))
        elif dw.shape == (B, R, Lk) and (dw.stride(-1) == 1 or Lk <= 1):
            strides = (dw.stride(0), 0, dw.stride(1))
        else:
            return False
    rc = lib.crossattn_softmax_bwd_f32(
        out.data_ptr(), None if dp is None else dp.data_ptr(), None if pd is None else pd.data_ptr(), p.data_ptr(),
        None if dw is None else dw.data_ptr(), *strides, dw_scale, coef.data_ptr(), coef.numel(), H, B * H, R, Lk,
        _threads(p.numel()))
    return rc == 0
