"""The cell-sorting generator: parameters, determinism, file format, and that scenario b sorts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
from neuralcpm_plugin.io import load_states
from neuralcpm_plugin.metrics.stats import sorting_index
from training.gen_cellsort import cellsort_hamiltonian_for, generate_cellsort, init_points
from training.generate import main as generate_main

TINY = {"size": 32, "cells": 10, "target": 40.0, "radius": 10.0, "mcs": 60.0, "progress": False}


def test_hamiltonian_is_paper_scale_over_four():
    h = cellsort_hamiltonian_for("b", (200, 200), 200.0)
    c = next(t for t in h.terms if isinstance(t, ContactEnergy))
    v = next(t for t in h.terms if isinstance(t, VolumeConstraint))
    J = c.J.detach().numpy()
    assert np.allclose(4 * J, [[0, 2.5, 1.0], [2.5, 1.0, 4.5], [1.0, 4.5, 1.0]])
    assert np.allclose(v.lam.detach().numpy()[1:], 0.5) and np.allclose(v.target.detach().numpy()[1:], 200)
    assert h.temperature == 1.0 and c.order == 2 and h.lattice.periodic
    ha = cellsort_hamiltonian_for("a")
    Ja = next(t for t in ha.terms if isinstance(t, ContactEnergy)).J.detach().numpy()
    assert np.isclose(4 * Ja[1, 2], 0.2) and np.isclose(4 * Ja[1, 1], 0.333333)
    with pytest.raises(ConfigError):
        cellsort_hamiltonian_for("z")


def test_init_points_follow_the_reference_generator():
    st = init_points(np.random.default_rng(0), (200, 200), 100, 60.0)
    pos = np.argwhere(st.ids > 0)
    assert len(pos) == 100 and np.all(np.hypot(pos[:, 0] - 100, pos[:, 1] - 100) < 60)
    assert st.types[1:51].tolist() == [1] * 50 and st.types[51:].tolist() == [2] * 50
    with pytest.raises(ConfigError):
        init_points(np.random.default_rng(0), (20, 20), 50, 2.0)


def test_generation_is_deterministic_and_seeded():
    a, _ = generate_cellsort("a", "cpu", 2, seed=3, **TINY)
    b, _ = generate_cellsort("a", "cpu", 2, seed=3, **TINY)
    c, _ = generate_cellsort("a", "cpu", 2, seed=4, **TINY)
    assert all(x == y for x, y in zip(a, b))
    assert not np.array_equal(a[0].ids, c[0].ids)
    assert a[0].meta["mcs"] == 60 and a[0].meta["seed"] == 3 * 100003


def test_scenario_b_sorts_and_a_mixes():
    rep_a, rep_b = {}, {}
    sa, _ = generate_cellsort("a", "cpu", 3, seed=0, report=rep_a, **TINY)
    sb, _ = generate_cellsort("b", "cpu", 3, seed=0, report=rep_b, **TINY)
    si_a = np.mean([sorting_index(s) for s in sa])
    si_b = np.mean([sorting_index(s) for s in sb])
    assert si_b < 0.15 and si_a > 0.4  # b: type 1–2 contacts are expensive; a: heterotypic contacts favoured
    assert len(rep_b["sorting_index"]) == len(rep_b["checkpoints"]) == 10
    # every cell survives and grows towards V*
    for s in sb:
        assert len(s.cell_ids()) == 10
        assert 20 < s.volumes()[1:].mean() <= 45


def test_cli_writes_reference_npz(tmp_path, capsys):
    out = tmp_path / "cs.npz"
    rc = generate_main(["cellsort", "--scenario", "b", "--out", str(out), "--snapshots", "2", "--size", "24",
                        "--cells", "6", "--target", "30", "--radius", "8", "--mcs", "20", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sorting index" in printed and "MCS" in printed
    # --no-progress: no bar, but a status line (at least the final one) says how far the generator got
    assert "cellsort b (cpu, exact): run 2/2 (100.0 %)" in printed and "ETA" in printed
    z = np.load(out)
    assert z["data"].shape == (2, 2, 24, 24) and z["data"].dtype == np.int32
    params = json.loads(z["params_json"].tobytes().decode())
    assert params["scenario"] == "b" and params["theta_paper"] == pytest.approx([2.5, 1.0, 1.0, 4.5, 1.0, 0.5])
    assert {t["kind"] for t in params["terms"]} == {"contact", "volume"}
    assert len(load_states(out)) == 2
