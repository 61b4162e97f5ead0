"""Build bisup's C++/CUDA extension (bisup._C).

CUDAExtension when torch was built with CUDA and CUDA_HOME points at a toolkit, otherwise a
CppExtension. Override with BISUP_FORCE_CUDA=0|1. Without a visible GPU and without
TORCH_CUDA_ARCH_LIST we build for sm_80, sm_86, sm_89 and sm_90a (torch's helper would
otherwise fail to pick an architecture).
"""
import os
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = "csrc"

# Explicit lists (not globs): a half-written file under csrc/ must not break everyone's build.
CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/checks.cpp",
    "csrc/cpu/pack.cpp",
    "csrc/cpu/quantize.cpp",
    "csrc/cpu/gemm.cpp",
    "csrc/cpu/kv_quantize.cpp",
    "csrc/cpu/attention.cpp",
    "csrc/cpu/hadamard.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/pack.cu",
    "csrc/cuda/quantize.cu",
    "csrc/cuda/kv_quantize.cu",
    "csrc/cuda/attention.cu",
    "csrc/cuda/gemm.cu",
    "csrc/cuda/hadamard.cu",
]
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0a"


def want_cuda() -> bool:
    forced = os.environ.get("BISUP_FORCE_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"BISUP_FORCE_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def make_extension():
    cxx_flags = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch >= 2.13)
    # CPU twins must round every fp32 op like the reference: GCC contracts a * b + c into an FMA
    # by default in C++ wherever the target has one (aarch64, -march=native).
    cxx_flags.append("-ffp-contract=off")
    if os.environ.get("BISUP_OPENMP", "1") == "1":
        cxx_flags.append("-fopenmp")
    if not want_cuda():
        return cpp_extension.CppExtension(
            "bisup._C",
            CPU_SOURCES,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # torch defines these to keep half operators out of the way; our kernels use cuda_fp16.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    return cpp_extension.CUDAExtension(
        "bisup._C",
        CPU_SOURCES + CUDA_SOURCES,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=[("BISUP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )


# BISUP_SKIP_EXT=1: install the Python package only (make build compiles the extension in place,
# incrementally, with ninja; a plain `pip install -e .` builds it from scratch).
setup(
    ext_modules=[] if os.environ.get("BISUP_SKIP_EXT") == "1" else [make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
