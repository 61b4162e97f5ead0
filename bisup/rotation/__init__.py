"""Orthogonal rotations: Hadamard constructions of any order (hadamard.py) and the helpers that
fold norms and rotations into linear layers (fuse.py)."""
from bisup.rotation.hadamard import (  # noqa: F401
    hadamard_base,
    hadamard_factors,
    hadamard_matrix,
    hadamard_plan,
    hadamard_pm1,
    random_hadamard,
    random_orthogonal,
    random_signs,
)
