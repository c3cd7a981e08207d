"""The model bundle: ``model.json`` + ``weights.safetensors`` in one directory.

``model.json`` (format version 1)::

    {
      "format": "neuralcpm-bundle",
      "format_version": 1,
      "lattice": {"shape": [H, W], "periodic": true, "copy_order": 2, "contact_order": 2},
      "temperature": 1.0,
      "type_names": ["medium", "type1", "type2"],
      "terms": [
        {"kind": "contact", "scale": 1.0, "params": {...}},      # physical units, JSON
        {"kind": "local_nh", "scale": 0.9, "weight": "w_l", "params": {...}},  # "weight" (optional): the
                                                                  # closure weight this scale is (w_a, w_n, ...)
        ...
      ],
      "provenance": {"package_version": ..., "created": ..., ...}
    }

Large arrays of term ``i`` (fields, network weights) are stored in ``weights.safetensors`` under the key
``"terms.{i}.{name}"``. Loading never unpickles: JSON + safetensors only. Unknown format versions and
unknown term kinds are :class:`~neuralcpm_plugin.errors.BundleError`.

Bundles are written atomically: into a temporary sibling directory, then renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._fsutil import make_temp_dir
from .errors import BundleError
from .hamiltonian.base import Hamiltonian, LatticeSpec, term_class

__all__ = ["FORMAT_VERSION", "ModelBundle", "load_bundle", "save_bundle"]

FORMAT_NAME = "neuralcpm-bundle"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("neuralcpm-plugin")
    except PackageNotFoundError:  # not installed (running from a checkout)
        return "0+unknown"


@dataclass
class ModelBundle:
    """A loaded bundle: the Hamiltonian (with its lattice, temperature, type names) and its metadata."""

    hamiltonian: Hamiltonian
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def lattice(self) -> LatticeSpec:
        return self.hamiltonian.lattice

    @property
    def temperature(self) -> float:
        return self.hamiltonian.temperature

    @property
    def type_names(self) -> list[str]:
        return self.hamiltonian.type_names

    def save(self, path) -> Path:
        return save_bundle(path, self.hamiltonian, provenance=self.provenance, extra=self.extra)


def _atomic_replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``; an existing ``dest`` is restored if the move fails."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(dest.name + f".old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def save_bundle(path, hamiltonian: Hamiltonian, *, provenance: dict | None = None,
                extra: dict | None = None) -> Path:
    """Write ``hamiltonian`` as a bundle directory at ``path`` (atomically); return the path."""
    path = Path(path)
    names = hamiltonian.type_names
    if not names or not all(isinstance(t, str) for t in names):
        raise BundleError(f"{path}: the Hamiltonian needs type_names, a non-empty list of strings (medium first), "
                          f"got {names!r}")
    terms_json, tensors = [], {}
    for i, term in enumerate(hamiltonian.terms):
        spec = dict(term.spec())
        spec.setdefault("kind", term.kind)
        spec["scale"] = term.scale_value()
        if getattr(term, "closure_weight", None):  # the shared closure weight its scale is (optional key)
            spec["weight"] = term.closure_weight
        terms_json.append(spec)
        for name, t in term.tensors().items():
            tensors[f"terms.{i}.{name}"] = t.detach().cpu().contiguous()
    prov = {"package_version": _package_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(provenance or {})
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "lattice": hamiltonian.lattice.to_json(), "temperature": hamiltonian.temperature,
           "type_names": hamiltonian.type_names, "terms": terms_json, "provenance": prov}
    if extra:
        doc["extra"] = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)     # umask permissions; stale temporaries of killed writes removed
    try:
        with open(tmp / MODEL_JSON, "w") as f:
            json.dump(doc, f, indent=2)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME})
        _atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _require(doc: dict, key: str, typ, where: str):
    if key not in doc:
        raise BundleError(f"{where}: missing key {key!r}")
    if not isinstance(doc[key], typ):
        raise BundleError(f"{where}: {key!r} must be {getattr(typ, '__name__', typ)}, got "
                          f"{type(doc[key]).__name__}")
    return doc[key]


def load_bundle(path, *, device=None) -> ModelBundle:
    """Read a bundle directory (or its ``model.json``); validate it; rebuild the Hamiltonian."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_JSON:
        path = path.parent
    mj = path / MODEL_JSON
    if not mj.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MODEL_JSON})")
    where = str(mj)
    try:
        doc = json.loads(mj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: corrupt JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise BundleError(f"{where}: not a {FORMAT_NAME} file (format = {doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: unknown bundle format version {version!r}; this package reads version "
                          f"{FORMAT_VERSION} (upgrade neuralcpm-plugin to read newer bundles)")
    lat = _require(doc, "lattice", dict, where)
    if not isinstance(lat.get("periodic", True), bool):
        raise BundleError(f"{where}: lattice 'periodic' must be true or false, got {lat['periodic']!r}")
    for key in ("copy_order", "contact_order"):
        v = lat.get(key, 2)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BundleError(f"{where}: lattice {key!r} must be an integer >= 1, got {v!r}")
    try:
        lattice = LatticeSpec.from_json(lat)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: invalid 'lattice' entry ({e})") from None
    if len(lattice.shape) not in (2, 3) or min(lattice.shape) < 1:
        raise BundleError(f"{where}: lattice shape must be 2-D or 3-D and positive, got {list(lattice.shape)}")
    temperature = _require(doc, "temperature", (int, float), where)
    if isinstance(temperature, bool) or not (temperature > 0 and math.isfinite(temperature)):
        raise BundleError(f"{where}: temperature must be > 0, got {temperature}")
    type_names = _require(doc, "type_names", list, where)
    if not type_names or not all(isinstance(t, str) for t in type_names):
        raise BundleError(f"{where}: 'type_names' must be a non-empty list of strings (medium first)")
    terms_json = _require(doc, "terms", list, where)
    wpath = path / WEIGHTS
    if wpath.exists():
        try:
            all_t = load_file(str(wpath), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{wpath}: corrupt weights file ({e})") from None
    else:
        all_t = {}
    terms = []
    for i, spec in enumerate(terms_json):
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise BundleError(f"{where}: term {i} has no 'kind'")
        try:
            cls = term_class(spec["kind"])
        except BundleError as e:
            raise BundleError(f"{where}: term {i}: {e}") from None
        prefix = f"terms.{i}."
        tens = {k[len(prefix):]: v for k, v in all_t.items() if k.startswith(prefix)}
        try:
            term = cls.from_spec(spec, tens, lattice)
        except BundleError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise BundleError(f"{where}: term {i} ({spec['kind']}): invalid parameters ({e})") from None
        if "weight" in spec:
            if not isinstance(spec["weight"], str) or not spec["weight"]:
                raise BundleError(f"{where}: term {i} ({spec['kind']}): 'weight' must be the name of a closure "
                                  f"weight (e.g. \"w_a\"), got {spec['weight']!r}")
            term.closure_weight = spec["weight"]
        terms.append(term)
    provenance, extra = doc.get("provenance", {}), doc.get("extra", {})
    for key, val in (("provenance", provenance), ("extra", extra)):
        if not isinstance(val, dict):
            raise BundleError(f"{where}: {key!r} must be dict, got {type(val).__name__}")
    ham = Hamiltonian(terms, lattice, float(temperature), type_names)
    if device is not None:
        ham = ham.to(device)
    return ModelBundle(ham, dict(provenance), dict(extra), path)
