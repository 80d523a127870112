"""The CPU decoding step's kernels (csrc/decode_cpu.c: a layer's element-wise work, its low-rank
products and matrix-vector products on fp32 or bf16 weights), built on first use.

Why C through ctypes and not a torch C++ extension: the file needs no torch headers, so the
system compiler builds it in ~2 s (a torch extension takes ~30 s), and the library does not
depend on torch's C++ ABI. `kernels()` returns the loaded library, or None when
it cannot be had (no C compiler; a failed build or a $CC that is not there says so once, in one
line on stderr); the decoding step then
runs its plain-PyTorch path, which computes the same thing (as it does with RWKV_SFT_DECODE_KERNELS=0).
"""
from __future__ import annotations

import ctypes
import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .. import env
from ..utils import atomic_write

SOURCE = Path(__file__).parent / "csrc" / "decode_cpu.c"
HEADERS = [Path(__file__).parent / "csrc" / "decode_cpu_weights.h"]  # included by SOURCE
FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu99", "-fopenmp-simd"]
# Tried in turn: threads from torch's OpenMP runtime (already loaded); one thread, for a compiler
# without OpenMP (Apple clang); also no per-CPU clones, for a C library without ifunc (musl).
VARIANTS = (["-fopenmp"], [], ["-DNO_VECTOR_CLONES"])

_INT, _FLOAT, _LONG, _PTR = ctypes.c_int, ctypes.c_float, ctypes.c_long, ctypes.c_void_p
_SIGNATURES = {  # function -> argument types, so that ctypes converts and checks every argument
    "rwkv7_relu_square": [_LONG, _PTR],
    **{f"{name}_{weights}": argtypes for weights in ("f32", "bf16") for name, argtypes in {
        "rwkv7_add_norm_mix": [_INT, _INT, _PTR, _PTR, _PTR, _PTR, _FLOAT, _PTR, _PTR, _INT, _PTR, _PTR],
        "rwkv7_time_mix": [_INT] * 4 + [_PTR] * 7 + [_PTR, _PTR, _INT] * 4 + [_PTR] * 9 + [_FLOAT] + [_PTR] * 4,
        "rwkv7_matvec": [_INT, _PTR, _PTR, _PTR, _INT, _INT, _INT],
    }.items()},
}
_loaded: dict[str, object] = {}  # "lib" -> the library, or None once it failed


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the first of cc, gcc, clang on the PATH."""
    if env.c_compiler():
        return shutil.which(env.c_compiler())
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def library_path(cc: str) -> Path:
    """Where the build of this source by this compiler is kept (rebuilt when either changes)."""
    sources = b"".join(f.read_bytes() for f in (SOURCE, *HEADERS))
    key = hashlib.sha1(sources + "\0".join([cc, *FLAGS, *sum(VARIANTS, []), platform.machine()]).encode())
    return env.cache_home() / "decode_cpu" / f"decode_cpu_{key.hexdigest()[:16]}.so"


def build(cc: str) -> Path:
    """Compile the library (atomically: concurrent builds each write their own file, then rename)."""
    target = library_path(cc)
    if not target.exists():
        with atomic_write(target) as partial:
            for variant in VARIANTS:
                result = subprocess.run([cc, *FLAGS, *variant, str(SOURCE), "-o", str(partial), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                lines = result.stderr.strip().splitlines() or ["no output"]
                raise RuntimeError(f"{cc} could not build {SOURCE}: "
                                   + next((ln for ln in lines if "error" in ln), lines[0]))
    return target


def kernels():
    """The library (ctypes), or None where the plain-PyTorch decoding step must do."""
    if "lib" not in _loaded:
        _loaded["lib"] = None
        cc = compiler()
        if cc is None and env.c_compiler():  # asked for, so its absence is news
            _unavailable(f"CC={env.c_compiler()}: no such command")
        elif cc is not None:
            try:
                lib = ctypes.CDLL(str(build(cc)))
                for name, argtypes in _SIGNATURES.items():
                    getattr(lib, name).argtypes = argtypes
                    getattr(lib, name).restype = None
                _loaded["lib"] = lib
            except (OSError, RuntimeError) as e:
                _unavailable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return _loaded["lib"]


def _unavailable(reason: str) -> None:
    """One line on stderr (once per process: kernels() remembers the failure)."""
    print(f"rwkv-sft: the CPU decoding kernels are unavailable, decoding runs in PyTorch ({reason})",
          file=sys.stderr, flush=True)
