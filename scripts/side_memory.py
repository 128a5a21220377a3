"""Peak working memory of one call on the CPU, one measure for relfast's benchmarks
(benchmarks/bench_scaling.py's ``working_memory``) and for the scripts that run in the peers'
side environments (scripts/bench_lxt.py, scripts/captum_generate.py): it imports neither relfast
nor torch, so it runs in any of those environments."""
import ctypes
import gc

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed: large blocks mmapped and returned on free
except OSError:
    _LIBC = None


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def working_memory(fn):
    """Peak bytes resident during ``fn()`` beyond those resident before it (Linux)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return _status_bytes("VmHWM") - before
