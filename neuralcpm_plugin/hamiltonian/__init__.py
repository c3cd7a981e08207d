"""Hamiltonians: analytic terms, neural terms and their sums (see :mod:`.base` for the interface)."""

from . import _register_builtin  # noqa: F401  (registers the built-in term kinds)
from .base import TERM_KINDS, Batch, Hamiltonian, LatticeSpec, Term, deletion_mask, register_term, term_class

__all__ = ["TERM_KINDS", "Batch", "Hamiltonian", "LatticeSpec", "Term", "deletion_mask", "register_term",
           "term_class"]
