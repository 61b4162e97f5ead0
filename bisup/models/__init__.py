"""Model adapters (per-family layout), the embedded default model and tiny test models."""
from bisup.models.adapters import ModelAdapter, get_adapter  # noqa: F401
