"""Loads the compiled extension (bisup._C) once; torch must be imported first."""
import torch  # noqa: F401  (registers the dispatcher the extension's ops plug into)

try:
    from bisup import _C  # noqa: F401  (importing registers torch.ops.bisup.*)
except ImportError as err:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "bisup's compiled extension (bisup._C) is missing or failed to load. "
        "Build it with `pip install --no-build-isolation -e .` (or `make build`). "
        f"Original error: {err}"
    ) from err


def has_cuda_kernels() -> bool:
    """Whether this build of bisup contains the CUDA kernels."""
    return bool(_C.has_cuda_kernels())
