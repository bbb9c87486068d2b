"""optax_gc: Gradient Centralization for optax, with per-leaf fan-in axes chosen by path rules."""

from optax_gc._src.optimizers import adam_gc, adamw_gc, sgd_gc
from optax_gc._src.plan import Plan, Row, explain
from optax_gc._src.transform import centralize, with_centralization

__version__ = "0.1.0"

__all__ = [
  "Plan",
  "Row",
  "adam_gc",
  "adamw_gc",
  "centralize",
  "explain",
  "sgd_gc",
  "with_centralization",
]
