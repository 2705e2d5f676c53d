"""Shared linear algebra of locate-then-edit methods: written once, imported by all."""

from .context import context_templates
from .covariance import covariance
from .keys import (
    LayerByLayerReads,
    capture_at_subject,
    compute_keys,
    hidden_at_subject,
    subject_rows,
)
from .solve import SingularMatrixError, WoodburySolver, condition_number, spd_solve
from .update import (
    condition_estimate,
    keys_added_solve,
    memit_solve_is_low_rank,
    memit_system,
    memit_system_operator,
    memit_update,
    null_space_basis,
    null_space_update,
    preserved_factor,
    residual_to_mlp_output,
    site_values,
    solve_update,
    spread_residual,
    weight_stats,
)
from .values import (
    TargetValues,
    optimise_joint_target_values,
    optimise_target_values,
    site_module_name,
)

__all__ = [
    "LayerByLayerReads", "SingularMatrixError", "TargetValues", "WoodburySolver",
    "capture_at_subject", "compute_keys",
    "condition_estimate", "condition_number", "context_templates", "covariance",
    "hidden_at_subject", "keys_added_solve", "memit_solve_is_low_rank", "memit_system",
    "memit_system_operator", "memit_update", "null_space_basis", "null_space_update",
    "optimise_joint_target_values", "optimise_target_values", "preserved_factor",
    "residual_to_mlp_output", "site_module_name", "site_values", "solve_update", "spd_solve",
    "spread_residual", "subject_rows", "weight_stats",
]
