"""Tissue-scale pieces: the Voronoi start, the `generate tissue` command (small), the pseudo-likelihood's
site cap (``max_sites``) that bounds its memory on 1,000×1,000 data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.metrics.params import KNOWN_TRUTHS, param_vector
from training.gen_cellsort import cellsort_hamiltonian_for
from training.gen_tissue import voronoi_start
from training.generate import main as generate_main
from training.pseudolikelihood import fit_pl


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), g=st.integers(2, 9), a=st.integers(8, 14))
def test_voronoi_start(seed, g, a):
    size = g * a
    target = 0.8 * a * a
    s = voronoi_start(np.random.default_rng(seed), size, g * g, target)
    v = np.bincount(s.ids.ravel(), minlength=g * g + 1)
    assert s.ids.shape == (size, size) and len(s.types) == g * g + 1
    assert np.all(v[1:] > 0)  # every cell present
    assert abs(v[1:].mean() - target) < 0.25 * target  # cells start near V*
    assert v[0] > 0  # medium between cells
    t = s.types[1:]
    assert set(np.unique(t)) <= {1, 2} and abs(int((t == 1).sum()) - int((t == 2).sum())) <= 1
    # a cell's sites lie around one seed: its bounding extent (periodic) is below 2 grid spacings
    for c in range(1, g * g + 1, max(1, g)):
        ys, xs = np.nonzero(s.ids == c)
        for coord in (ys, xs):
            d = (coord - coord[0] + size // 2) % size
            assert d.max() - d.min() < 2 * a


def test_voronoi_start_refuses_too_many_cells():
    with pytest.raises(ConfigError, match="do not fit"):
        voronoi_start(np.random.default_rng(0), 10, 100, 1.0)


def test_generate_tissue_small_writes_data_and_truth(tmp_path, capsys):
    out = tmp_path / "t.npz"
    rc = generate_main(["tissue", "--size", "60", "--cells", "36", "--mcs", "5", "--snapshots", "2", "--out",
                        str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "36 cells" in text and "fit: python -m training.fit" in text
    d = np.load(out)
    assert d["data"].shape == (2, 2, 60, 60)
    truth = json.loads(out.with_name("t.truth.json").read_text())
    assert truth["lambda"] == 0.5 and truth["J"]["1-2"] == pytest.approx(4.5 / 4)
    params = json.loads(bytes(d["params_json"]).decode())
    assert params["scale"] == "tissue" and params["size"] == 60 and params["dataset"] == "tissue"
    again = ["tissue", "--size", "60", "--cells", "36", "--mcs", "1", "--snapshots", "1", "--out", str(out),
             "--no-progress"]
    assert generate_main(again) == 2  # an existing output is not overwritten without --overwrite
    assert "exists already" in capsys.readouterr().err
    assert np.load(out)["data"].shape[0] == 2


def test_pl_site_cap_subsamples_and_still_recovers(tmp_path):
    """The convex pseudo-likelihood with ``max_sites``: it uses that many sites (equal share per state) and its
    estimate is still near the truth (noisier than the full fit's: fewer medium contacts inform J(·,0))."""
    from neuralcpm_plugin.sampling.exact import ExactSampler
    ham = cellsort_hamiltonian_for("b", (80, 80), 64.0)
    states = []
    for i in range(4):
        s = ExactSampler(voronoi_start(np.random.default_rng(i), 80, 100, 64.0), ham, seed=i)
        s.step(30)
        states.append(s.state)
    full = cellsort_hamiltonian_for("b", (80, 80), 64.0, learnable=True)
    sub = cellsort_hamiltonian_for("b", (80, 80), 64.0, learnable=True)
    r_full = fit_pl(full, states)
    r_sub = fit_pl(sub, states, max_sites=4 * 2000, seed=1)
    assert r_sub.n_sites == 4 * 2000 < r_full.n_sites
    vf, vs = param_vector(full), param_vector(sub)
    truth = np.asarray(KNOWN_TRUTHS["cellsort-b"]["vector"])
    assert np.sqrt(np.mean((vf - truth) ** 2)) < 0.15
    assert np.sqrt(np.mean((vs - truth) ** 2)) < 0.25
    assert not np.allclose(vs, vf)  # a different (sub)set of sites was used
    with pytest.raises(ConfigError, match="max_sites"):
        fit_pl(cellsort_hamiltonian_for("b", (80, 80), 64.0, learnable=True), states, max_sites=2)


def test_generate_tissue_with_the_checkerboard_sampler(tmp_path, capsys):
    out = tmp_path / "c.npz"
    assert generate_main(["tissue", "--size", "80", "--cells", "64", "--mcs", "2", "--snapshots", "1", "--threads",
                          "2", "--out", str(out), "--no-progress"]) == 0
    assert "checkerboard, 2 thread(s)" in capsys.readouterr().out
    d = np.load(out)
    v = np.bincount(d["data"][0, 0].ravel())
    assert (v[1:] > 0).sum() == 64
    params = json.loads(bytes(d["params_json"]).decode())
    assert params["sampler"] == "checkerboard" and params["threads"] == 2
