"""CompuCell3D export and import for NeuralCPM models.

* ``python -m cc3d_steppables.export BUNDLE --out DIR`` / :func:`export_project` — a runnable ``.cc3d``
  project whose ΔH equals the bundle's (C++ Contact/Volume plugins + a Python energy term).
* :func:`load_model` — a CC3DML model (+ PIFF initial state) as the package's analytic Hamiltonian.
* :class:`ProjectEvaluator` — ΔH of copy attempts computed from a project's files' text.

``cc3d`` itself is imported only by :mod:`cc3d_steppables.steppables`, which runs inside CompuCell3D.
"""

from .importer import ImportedModel, load_model

__all__ = ["ImportedModel", "ProjectEvaluator", "export_project", "load_model"]


def __getattr__(name):  # lazy: the exporter pulls in torch-backed modules
    if name == "export_project":
        from .export import export_project
        return export_project
    if name == "ProjectEvaluator":
        from .evaluator import ProjectEvaluator
        return ProjectEvaluator
    raise AttributeError(name)
