"""Building the C++ examples of CMakeLists.txt for tests (shared by the C++ test files).

The build lives in ``build/cmake``, kept between runs (incremental). Test modules call
:func:`skip_without_toolchain` at import and :func:`build_target` in a module-scoped fixture.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cmake"


def _cxx_compiler():
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def skip_without_toolchain():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ build of relfast cannot be tested", allow_module_level=True)
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) found: the C++ build of relfast cannot be tested",
                    allow_module_level=True)


def run(cmd, what, timeout, expect_success=True):
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if expect_success and proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{log}")
    return proc


def build_target(name: str) -> Path:
    """Configures build/cmake when it is new or was made for another torch, then builds `name`."""
    prefix = torch.utils.cmake_prefix_path
    cache = BUILD_DIR / "CMakeCache.txt"
    generated = (BUILD_DIR / "Makefile").exists() or (BUILD_DIR / "build.ninja").exists()
    if not generated or not cache.exists() or prefix not in cache.read_text(errors="replace"):
        run(["cmake", "-S", ROOT, "-B", BUILD_DIR, f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release",
             "-DRELFAST_BUILD_EXAMPLES=ON"], "cmake configure", timeout=900)
    run(["cmake", "--build", BUILD_DIR, "-j2", "--target", name], "cmake build", timeout=3600)
    exe = BUILD_DIR / name
    assert exe.is_file(), f"the build did not produce {exe}"
    return exe
