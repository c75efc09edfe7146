"""C kernels compiled on first use for the machine they run on, loaded through ctypes.

Some of the engine's loops (the trilinear sampler) gather values at computed addresses; others
(separable filters) are cheaper as loops over a kernel's taps than as BLAS matrix products. A C
compiler at `-O3 -march=native` turns those loops into SIMD code (with gather instructions where
they gather), 16 float32 or 8 float64 values at a time on AVX-512, so that float32 costs about half
of float64 there; numba's loops, the sampler's fallback, stay scalar and cost the same in both
formats (docs/benchmarks.md).

`library(name)` compiles `dynomp/<name>.c` (name: a path inside the package, such as
"registration/sampler") with the system C compiler (`$CC`, else `cc`) into a cache folder, once
per source, compiler and CPU, and returns the loaded library, or None where there is no compiler,
the build fails, or `DYNOMP_NATIVE=0`; the caller then keeps its fallback (numba kernels, or torch
operations). The build writes a temporary file and renames it into place, so concurrent jobs that
build the same library never load a half-written one.

Cache folder: `$DYNOMP_CACHE_DIR`, else `$XDG_CACHE_HOME/dynomp` (`~/.cache/dynomp`), else, if that
cannot be written (a read-only home inside a container), a `dynomp-native-<uid>` folder in the
system's temporary folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent
# -march=native: the host's vector instructions; 512-bit vectors where the CPU has them (GCC and
# clang default to 256 on most x86 CPUs); no errno or trap semantics, so floor/compare vectorise
FLAGS = ("-std=c99", "-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared")
X86_FLAGS = ("-mprefer-vector-width=512",)
# the library's loops split over OpenMP threads; loaded after torch, its libgomp.so.1 is torch's own
OPENMP_FLAGS = ("-fopenmp",)

_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False where `DYNOMP_NATIVE` is 0, off, false or no."""
    return os.environ.get("DYNOMP_NATIVE", "1").strip().lower() not in {"0", "off", "false", "no"}


def compiler() -> str | None:
    """The C compiler's path: `$CC` (its first word), else `cc`; None where neither is found."""
    command = os.environ.get("CC", "").split() or ["cc"]
    return shutil.which(command[0])


def cache_folder() -> Path:
    """Where compiled libraries are kept (see the module's docstring)."""
    configured = os.environ.get("DYNOMP_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "dynomp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(folder, os.W_OK):
        return folder
    return Path(tempfile.gettempdir()) / f"dynomp-native-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cpu_signature() -> str:
    """The CPU model and feature flags (a library built for one CPU may not run on another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part", "CPU implementer")
    lines = {line.split(":", 1)[0].strip(): line for line in text.splitlines() if ":" in line}
    return "\n".join(lines.get(key, "") for key in wanted) + platform.machine()


def _flag_sets() -> list[tuple[str, ...]]:
    """Flags to try in order: OpenMP, and the x86 vector-width hint where it may apply, first."""
    hints = [X86_FLAGS, ()] if platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"} else [()]
    return [FLAGS + hint + openmp for openmp in (OPENMP_FLAGS, ()) for hint in hints]


def build(name: str, *, folder: Path | None = None) -> Path:
    """Compile `dynomp/<name>.c` into the cache (or `folder`) unless it is there; return its path.

    Raises RuntimeError with the compiler's first error line where every flag set fails, and
    FileNotFoundError where there is no C compiler.
    """
    source = SOURCES / f"{name}.c"
    cc = compiler()
    if cc is None:
        raise FileNotFoundError(f"{name}.c: no C compiler found (set CC, or install gcc or clang)")
    extra = os.environ.get("CC", "").split()[1:]
    text = source.read_bytes()
    stem = name.replace("/", "-")
    folder = folder or cache_folder()
    targets = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([text, cc.encode(), *(f.encode() for f in (*extra, *flags)),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        targets.append((flags, folder / f"{stem}-{key}.so"))
    for _, target in targets:
        if target.exists():
            return target
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags, target in targets:
        handle, partial = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=folder)
        os.close(handle)
        try:
            finished = subprocess.run([cc, *extra, *flags, str(source), "-o", partial],
                                      capture_output=True, text=True, check=False)
            if finished.returncode == 0:
                os.replace(partial, target)
                return target
            lines = [line for line in finished.stderr.splitlines() if "error" in line] or finished.stderr.splitlines()
            errors.append(lines[0] if lines else f"exit status {finished.returncode}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise RuntimeError(f"{source}: the C compiler failed: {errors[-1]}")


def library(name: str, *, fallback: str = "the numba kernels") -> ctypes.CDLL | None:
    """The compiled library `name`, built and loaded once per process; None where unavailable
    (the warning then says that `fallback` runs instead)."""
    if name in _loaded:
        return _loaded[name]
    loaded = None
    if enabled():
        try:
            loaded = ctypes.CDLL(str(build(name)))
        except (OSError, RuntimeError) as error:
            log.warning("%s; %s run instead", error, fallback)
    _loaded[name] = loaded
    return loaded
