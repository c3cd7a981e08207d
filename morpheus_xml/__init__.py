"""Morpheus (MorpheusML 4) export, import and the external energy hook.

* :func:`load_model` — a MorpheusML model → the package's analytic Hamiltonian + initial state.
* ``python -m morpheus_xml.export BUNDLE --out model.xml`` — a bundle → a runnable MorpheusML model.
* ``python -m morpheus_xml.run BUNDLE --morpheus PATH --mcs N --refresh K`` — the energy hook.
* :mod:`morpheus_xml.readers` — Morpheus outputs (TIFF stacks, ``.xml.gz`` checkpoints) as snapshots.
* :class:`morpheus_xml.evaluator.MorpheusEvaluator` — ΔH from a model's text with Morpheus's formulas.
"""

from .importer import ImportedModel, load_model, parse_model

__all__ = ["ImportedModel", "load_model", "parse_model"]
