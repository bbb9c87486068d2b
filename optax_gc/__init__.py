"""optax_gc: Gradient Centralization for optax, each leaf's fan-in read from the model or a rule."""

from optax_gc._src.derive import rules_for
from optax_gc._src.factored import FactoredRmsState, scale_by_factored_rms
from optax_gc._src.optimizers import AdamWReference, adam_gc, adamw_gc, sgd_gc
from optax_gc._src.plan import Plan, Row, explain
from optax_gc._src.roles import (
  fan_sizes,
  galore_dimension_numbers,
  muon_dimension_numbers,
  scanned_layers,
)
from optax_gc._src.rules import Axes, LayerRule, LayerRules, Preset, Rule, RulesLike
from optax_gc._src.transform import On, centralize, with_centralization

__version__ = "0.1.0"

__all__ = [
  "AdamWReference",
  "Axes",
  "FactoredRmsState",
  "LayerRule",
  "LayerRules",
  "On",
  "Plan",
  "Preset",
  "Row",
  "Rule",
  "RulesLike",
  "adam_gc",
  "adamw_gc",
  "centralize",
  "explain",
  "fan_sizes",
  "galore_dimension_numbers",
  "muon_dimension_numbers",
  "rules_for",
  "scale_by_factored_rms",
  "scanned_layers",
  "sgd_gc",
  "with_centralization",
]
