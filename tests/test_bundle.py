"""The model bundle: save/load round trip, validation errors, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from neuralcpm_plugin import bundle as bundle_mod
from neuralcpm_plugin.bundle import FORMAT_VERSION, MODEL_JSON, WEIGHTS, ModelBundle, load_bundle, save_bundle
from neuralcpm_plugin.errors import BundleError
from neuralcpm_plugin.hamiltonian.base import TERM_KINDS, Hamiltonian, LatticeSpec, Term, register_term


class _Dummy(Term):
    """A tiny term: one JSON parameter and one tensor."""

    kind = "test_dummy"

    def __init__(self, a: float, field: torch.Tensor, scale: float = 1.0):
        super().__init__(scale)
        self.a = float(a)
        self.register_buffer("field", field)

    def spec(self):
        return {"kind": self.kind, "params": {"a": self.a, "nested": [1, 2, {"x": "y"}]}}

    def tensors(self):
        return {"field": self.field}

    @classmethod
    def from_spec(cls, spec, tensors, lattice):
        if spec["params"]["a"] < 0:
            raise ValueError("a must be >= 0")
        return cls(spec["params"]["a"], tensors["field"], scale=spec["scale"])


@pytest.fixture
def dummy_kind():
    register_term(_Dummy)
    yield _Dummy
    TERM_KINDS.pop(_Dummy.kind, None)


def _ham(a=1.5, scale=2.0):
    lat = LatticeSpec((4, 5), periodic=True, copy_order=2, contact_order=1)
    field = torch.arange(20, dtype=torch.float64).reshape(4, 5)
    return Hamiltonian([_Dummy(a, field, scale=scale)], lat, temperature=3.0, type_names=["medium", "a", "b"])


def _edit(path, fn):
    mj = path / MODEL_JSON
    doc = json.loads(mj.read_text())
    fn(doc)
    mj.write_text(json.dumps(doc))


def test_round_trip(tmp_path, dummy_kind):
    h = _ham()
    p = save_bundle(tmp_path / "m", h, provenance={"data": "P1"}, extra={"note": 1})
    b = load_bundle(p)
    assert isinstance(b, ModelBundle)
    assert b.lattice == h.lattice and b.temperature == 3.0 and b.type_names == ["medium", "a", "b"]
    (t,) = b.hamiltonian.terms
    assert isinstance(t, _Dummy) and t.a == 1.5 and t.scale_value() == 2.0
    assert torch.equal(t.field, h.terms[0].field) and t.field.dtype == torch.float64
    assert b.provenance["data"] == "P1" and "package_version" in b.provenance and "created" in b.provenance
    assert b.extra == {"note": 1}
    doc = json.loads((p / MODEL_JSON).read_text())
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["terms"][0] == {"kind": "test_dummy", "params": {"a": 1.5, "nested": [1, 2, {"x": "y"}]},
                               "scale": 2.0}
    # model.json path works too, and ModelBundle.save writes an equivalent bundle
    assert load_bundle(p / MODEL_JSON).temperature == 3.0
    b.save(tmp_path / "m2")
    assert torch.equal(load_bundle(tmp_path / "m2").hamiltonian.terms[0].field, t.field)
    # no temporary or backup directories are left behind
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m", "m2"]


def test_overwrite_replaces(tmp_path, dummy_kind):
    save_bundle(tmp_path / "m", _ham(a=1.0))
    save_bundle(tmp_path / "m", _ham(a=7.0))
    assert load_bundle(tmp_path / "m").hamiltonian.terms[0].a == 7.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def test_unknown_version(tmp_path, dummy_kind):
    p = save_bundle(tmp_path / "m", _ham())
    _edit(p, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match=r"model\.json: unknown bundle format version 99; this package reads "
                                          r"version 1 \(upgrade"):
        load_bundle(p)


def test_unknown_kind(tmp_path, dummy_kind):
    p = save_bundle(tmp_path / "m", _ham())
    _edit(p, lambda d: d["terms"][0].update(kind="no_such_kind"))
    with pytest.raises(BundleError, match=r"model\.json: term 0: unknown Hamiltonian term kind 'no_such_kind'; "
                                          r"known kinds: .*test_dummy"):
        load_bundle(p)


def test_kind_not_registered_any_more(tmp_path, dummy_kind):
    p = save_bundle(tmp_path / "m", _ham())
    TERM_KINDS.pop("test_dummy")
    with pytest.raises(BundleError, match="unknown Hamiltonian term kind 'test_dummy'"):
        load_bundle(p)


def test_corrupt_json(tmp_path, dummy_kind):
    p = save_bundle(tmp_path / "m", _ham())
    (p / MODEL_JSON).write_text('{"format": "neuralcpm-bundle", "format_version": 1,')
    with pytest.raises(BundleError, match=r"model\.json: corrupt JSON"):
        load_bundle(p)
    (p / MODEL_JSON).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match=r"corrupt JSON"):
        load_bundle(p)
    (p / MODEL_JSON).write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"not a neuralcpm-bundle file"):
        load_bundle(p)
    (p / MODEL_JSON).write_text('{"format": "other"}')
    with pytest.raises(BundleError, match=r"not a neuralcpm-bundle file \(format = 'other'\)"):
        load_bundle(p)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "huge_header"])
def test_corrupt_safetensors(tmp_path, dummy_kind, damage):
    p = save_bundle(tmp_path / "m", _ham())
    w = p / WEIGHTS
    raw = w.read_bytes()
    new = {"garbage": b"\x00\x01not safetensors at all" * 3, "truncated": raw[: len(raw) // 2], "empty": b"",
           "huge_header": (2 ** 40).to_bytes(8, "little") + raw[8:]}[damage]
    w.write_bytes(new)
    with pytest.raises(BundleError, match=r"weights\.safetensors: corrupt weights file"):
        load_bundle(p)


def test_missing_weights_tensor(tmp_path, dummy_kind):
    p = save_bundle(tmp_path / "m", _ham())
    (p / WEIGHTS).unlink()
    with pytest.raises(BundleError, match=r"term 0 \(test_dummy\): invalid parameters \('field'\)"):
        load_bundle(p)


@pytest.mark.parametrize(("edit", "msg"), [
    (lambda d: d.pop("lattice"), r"missing key 'lattice'"),
    (lambda d: d.update(lattice=[4, 5]), r"'lattice' must be dict, got list"),
    (lambda d: d.update(lattice={"shape": ["a", 5]}), r"invalid 'lattice' entry"),
    (lambda d: d.update(lattice={"shape": [4]}), r"lattice shape must be 2-D or 3-D and positive, got \[4\]"),
    (lambda d: d.update(lattice={"shape": [4, 0]}), r"lattice shape must be 2-D or 3-D and positive"),
    (lambda d: d.update(temperature="hot"), r"'temperature' must be"),
    (lambda d: d.update(temperature=True), r"temperature must be > 0, got True"),
    (lambda d: d["lattice"].update(periodic="false"), r"lattice 'periodic' must be true or false, got 'false'"),
    (lambda d: d["lattice"].update(copy_order=0), r"lattice 'copy_order' must be an integer >= 1, got 0"),
    (lambda d: d["lattice"].update(contact_order=1.5), r"lattice 'contact_order' must be an integer >= 1"),
    (lambda d: d.update(temperature=0), r"temperature must be > 0, got 0"),
    (lambda d: d.update(type_names=[]), r"'type_names' must be a non-empty list of strings"),
    (lambda d: d.update(type_names=["medium", 3]), r"'type_names' must be a non-empty list of strings"),
    (lambda d: d.update(terms={}), r"'terms' must be list, got dict"),
    (lambda d: d["terms"].append({"params": {}}), r"term 1 has no 'kind'"),
    (lambda d: d["terms"][0]["params"].update(a=-1), r"term 0 \(test_dummy\): invalid parameters \(a must be >= 0\)"),
    (lambda d: d.update(provenance=[1]), r"'provenance' must be dict, got list"),
])
def test_invalid_documents(tmp_path, dummy_kind, edit, msg):
    p = save_bundle(tmp_path / "m", _ham())
    _edit(p, edit)
    with pytest.raises(BundleError, match=msg):
        load_bundle(p)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"not a model bundle \(no model\.json\)"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match=r"not a model bundle"):
        load_bundle(tmp_path / "missing")


def test_save_requires_type_names(tmp_path, dummy_kind):
    h = _ham()
    h.type_names = None
    with pytest.raises(BundleError, match=r"needs type_names"):
        save_bundle(tmp_path / "m", h)
    assert not (tmp_path / "m").exists()


def test_failed_save_keeps_old_bundle_json(tmp_path, dummy_kind):
    save_bundle(tmp_path / "m", _ham(a=1.0))
    bad = _ham(a=2.0)
    bad.terms[0].spec = lambda: {"kind": "test_dummy", "params": {"a": {1, 2}}}  # a set: not JSON
    with pytest.raises(TypeError):
        save_bundle(tmp_path / "m", bad)
    assert load_bundle(tmp_path / "m").hamiltonian.terms[0].a == 1.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]  # temporary directory removed


def test_failed_rename_restores_old_bundle(tmp_path, dummy_kind, monkeypatch):
    save_bundle(tmp_path / "m", _ham(a=1.0))
    real = os.replace

    def flaky(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full (simulated)")
        return real(src, dst)

    monkeypatch.setattr(bundle_mod.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        save_bundle(tmp_path / "m", _ham(a=5.0))
    monkeypatch.setattr(bundle_mod.os, "replace", real)
    assert load_bundle(tmp_path / "m").hamiltonian.terms[0].a == 1.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def test_failed_weights_write_keeps_old_bundle(tmp_path, dummy_kind, monkeypatch):
    save_bundle(tmp_path / "m", _ham(a=1.0))

    def boom(*a, **k):
        raise RuntimeError("safetensors failed (simulated)")

    monkeypatch.setattr(bundle_mod, "save_file", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        save_bundle(tmp_path / "m", _ham(a=5.0))
    monkeypatch.undo()
    assert load_bundle(tmp_path / "m").hamiltonian.terms[0].a == 1.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]
