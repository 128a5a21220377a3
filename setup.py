"""Build relfast._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Install with `pip install --no-build-isolation .` (or `-e .`): the extension is ABI-bound to the
torch it is compiled against, so it must see the torch that will import it.

Environment:
  RELFAST_CUDA=0/1        force the CUDA kernels off / on (on fails loudly if impossible)
  CUDA_HOME               CUDA toolkit root (found from nvcc when unset)
  TORCH_CUDA_ARCH_LIST    GPU architectures; defaults to the visible GPU, else "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer GPUs to JIT


def _has_cudart(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(root, "lib64", "libcudart.so*")) or glob.glob(os.path.join(root, "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The toolkit root holding bin/nvcc and libcudart. `nvcc` on PATH may be a wrapper script
    (then its parent folder is not the toolkit), so follow `exec` lines and symlinks."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/\S+/bin/nvcc)\b", head):
                    candidates.append(os.path.dirname(os.path.dirname(path.decode())))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and _has_cudart(root):
            return os.path.realpath(root)
    return None


def want_cuda(torch_cuda_version):
    flag = os.environ.get("RELFAST_CUDA", "").strip()
    cuda_home = find_cuda_home()
    if flag == "0":
        return None, "RELFAST_CUDA=0"
    if torch_cuda_version is None:
        if flag == "1":
            raise SystemExit("relfast: RELFAST_CUDA=1 but the installed torch is a CPU-only build")
        return None, "torch is a CPU-only build"
    if cuda_home is None:
        if flag == "1":
            raise SystemExit("relfast: RELFAST_CUDA=1 but no CUDA toolkit (nvcc + libcudart) was found; set CUDA_HOME")
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    return cuda_home, None


def build_extension():
    import torch

    cuda_home, why_not = want_cuda(torch.version.cuda)
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/composite/*.cpp"))
    # -fno-trapping-math: GCC then if-converts, and so vectorises, loops with float selects (the
    # fused weight loop's exp and clamp); relfast never reads floating-point exception flags.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-DRELFAST_PYTHON_MODULE"]
    link_flags = ["-fopenmp"]
    if cuda_home:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx_flags.append("-DRELFAST_WITH_CUDA")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU")
        print(f"relfast: building C++ CPU kernels (OpenMP) and CUDA kernels (CUDA {torch.version.cuda}, "
              f"toolkit {cuda_home}, archs {archs})", flush=True)
        ext = CUDAExtension(
            "relfast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DRELFAST_WITH_CUDA", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        print(f"relfast: building C++ CPU kernels (OpenMP) only: {why_not}", flush=True)
        ext = CppExtension("relfast._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags, py_limited_api=True)
    return ext, BuildExtension


ext, BuildExtension = build_extension()


class BuildExtensionKeepObjects(BuildExtension):
    """Compile into ROOT/build/temp whoever drives the build (pip's editable install uses a
    throw-away folder otherwise), so ninja rebuilds only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtensionKeepObjects.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
