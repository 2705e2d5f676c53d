"""Shared linear algebra of locate-then-edit methods: written once, imported by all."""

from .context import context_templates
from .covariance import covariance
from .keys import capture_at_subject, compute_keys, hidden_at_subject, subject_rows
from .solve import SingularMatrixError, condition_number, spd_solve
from .values import TargetValues, optimise_target_values

__all__ = [
    "SingularMatrixError", "TargetValues", "capture_at_subject", "compute_keys",
    "condition_number", "context_templates", "covariance", "hidden_at_subject",
    "optimise_target_values", "spd_solve", "subject_rows",
]
