"""NeuralCPM: learn Cellular Potts Hamiltonians from snapshots and run them in CompuCell3D and Morpheus.

Public names are re-exported here; see the README for a tutorial.
"""

from ._startup import install_interrupt_hook as _install_interrupt_hook

_install_interrupt_hook()    # in `python -m <a command of the package>` only: Ctrl-C during the imports below

from .bundle import ModelBundle, load_bundle, save_bundle
from .errors import BundleError, ConfigError, DataError, ExportError, ModelImportError, NeuralCPMError
from .hamiltonian import Batch, Hamiltonian, LatticeSpec, Term, register_term
from .lattice import (
    CellState,
    boundary_mask,
    half_offsets,
    neighbour_offsets,
    relabel,
    states_from_channels,
    states_to_channels,
    validate_state,
    volumes,
)

__version__ = "0.1.0"

__all__ = [
    "Batch", "BundleError", "CellState", "ConfigError", "DataError", "ExportError", "Hamiltonian",
    "LatticeSpec", "ModelBundle", "ModelImportError", "NeuralCPMError", "Term", "boundary_mask",
    "half_offsets", "load_bundle", "neighbour_offsets", "register_term", "relabel", "save_bundle",
    "states_from_channels", "states_to_channels", "validate_state", "volumes",
]
