"""Table 1 / Table 2 evaluation end to end at toy scale: roll-outs, rows, paper numbers, outputs."""

import json

import numpy as np
import pytest

from neuralcpm_plugin.bundle import save_bundle
from neuralcpm_plugin.classifier import ClassifierConfig, save_classifier, train_classifier
from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
from neuralcpm_plugin.hamiltonian.base import LatticeSpec
from neuralcpm_plugin.io.npz import save_npz
from neuralcpm_plugin.lattice import CellState
from training import eval_table1, eval_table2


def _data(n=6, size=24, seed=0):
    """Blocky two-type aggregates: type 2 in two poles left/right, type 1 in the middle (bipolar-like)."""
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(n):
        ids = np.zeros((size, size), np.int32)
        oy = int(rng.integers(-2, 3))
        c = 1
        for y0 in (6, 12):
            for x0 in (4, 10, 16):
                ids[y0 + oy:y0 + oy + 5, x0:x0 + 5] = c
                c += 1
        types = np.array([0, 2, 1, 2, 2, 1, 2], np.int32)
        states.append(CellState(ids, types))
    return states


def _bundle(tmp_path, size=24, kind="analytic"):
    h = cellsort_hamiltonian({"0-1": 1.5, "0-2": 1.5, "1-1": 0.75, "1-2": 1.5, "2-2": 0.75}, 0.5, 25.0,
                             LatticeSpec((size, size)), 1.0)
    return save_bundle(tmp_path / "run" / "model", h, provenance={"model_kind": kind, "objective": "pl"})


def test_permuted_starts_keep_ids_and_type_counts():
    states = _data(3)
    starts = eval_table1.permuted_starts(states, 5, np.random.default_rng(1))
    assert len(starts) == 5
    for s in starts:
        src = states[s.meta["start_frame"]]
        assert np.array_equal(s.ids, src.ids)
        assert sorted(s.types.tolist()) == sorted(src.types.tolist())


def test_rollout_shapes_and_start_frame(tmp_path):
    states = _data(2)
    from neuralcpm_plugin.bundle import load_bundle
    ham = load_bundle(_bundle(tmp_path)).hamiltonian
    traj = eval_table1.rollout(ham, states, frames=2, mcs_per_frame=0.5, flips=10, seed=3, chains=1)
    assert traj.shape == (2, 3, 2, 24, 24)
    assert np.array_equal(traj[0, 0], states[0].to_channels())
    assert not np.array_equal(traj[0, 2, 0], traj[0, 0, 0])       # the sampler moved something
    again = eval_table1.rollout(ham, states, frames=2, mcs_per_frame=0.5, flips=10, seed=3, chains=1)
    assert np.array_equal(traj, again)                               # deterministic given the seed


def test_table1_end_to_end(tmp_path):
    states = _data(10)
    labels = np.arange(10) % 2
    data = save_npz(tmp_path / "d.npz", states, label=labels)
    model, info = train_classifier(states, labels, steps=3, config=ClassifierConfig(channels=(4, 4), mlp=(8,)))
    save_classifier(model, tmp_path / "clf", info)
    b = _bundle(tmp_path)
    res = eval_table1.evaluate_table1(data, [(None, b), ("my model", b)], scale="smoke", classifier=tmp_path / "clf",
                                      frames=2, trajectories=5, log=lambda *a: None)
    rows = res["rows"]
    assert set(rows) == {"real data", "permuted starts (no dynamics)", "Cellsort Hamiltonian", "my model"}
    assert rows["real data"]["vol"] == 1.0 and rows["real data"]["frag"] == 1.0
    # the starts row scores the first run's frame 0: the same permuted states rollout_run starts from
    starts = eval_table1.permuted_starts(states, 5, np.random.default_rng(0))
    from neuralcpm_plugin.classifier import predict_proba
    from neuralcpm_plugin.metrics.paper import classifier_score
    p0 = predict_proba(model, np.stack([s.to_channels()[1] for s in starts]))
    assert rows["permuted starts (no dynamics)"]["cs"] == pytest.approx(classifier_score(p0))
    for lab in ("Cellsort Hamiltonian", "my model"):
        assert 0 <= rows[lab]["vol"] <= 1 and 0 <= rows[lab]["frag"] <= 1 and 1 <= rows[lab]["cs"] <= 10
    md = eval_table1.table1_markdown(res)
    assert "| Cellsort Hamiltonian | 1 |" in md and "2.47" in md and "4.35" in md
    eval_table1.write_outputs(res, md, tmp_path / "out" / "t1")
    assert json.loads((tmp_path / "out" / "t1.json").read_text())["table"] == "table1"


def test_table2_end_to_end(tmp_path):
    states = _data(8)
    data = save_npz(tmp_path / "d.npz", states)
    b = _bundle(tmp_path)
    res = eval_table2.evaluate_table2(data, [(None, b)], scale="smoke", frames=2, trajectories=5,
                                      log=lambda *a: None)
    rows = res["rows"]
    assert rows["real data"]["err"] == pytest.approx(0.0, abs=1e-9)   # identical layouts in both halves
    assert rows["real data"]["org2"] > 0.5
    d = rows["Cellsort Hamiltonian"]
    assert d["err"] >= 0 and 0 <= d["vol"] <= 1 and np.isfinite(d["err_ci"])
    # the starts before any dynamics: the first run's frame 0, i.e. the permuted data states of its seed
    from neuralcpm_plugin.metrics.paper import mean_second_moments, moment_error
    starts = eval_table1.permuted_starts(states, 5, np.random.default_rng(0))
    s0 = rows["permuted starts (no dynamics)"]
    assert s0["err"] == pytest.approx(moment_error(mean_second_moments(starts), mean_second_moments(states)))
    m0 = np.asarray(res["raw"]["permuted starts (no dynamics)"][0]["second_moments"])
    assert np.allclose(m0, mean_second_moments(starts), equal_nan=True)
    m = np.asarray(res["raw"]["Cellsort Hamiltonian"][0]["second_moments"])
    assert d["err"] == pytest.approx(moment_error(m, mean_second_moments(states)))
    md = eval_table2.table2_markdown(res)
    assert "37.3" in md and "| Cellsort Hamiltonian | 1 |" in md and "| permuted starts (no dynamics) | 1 |" in md


def test_run_label_from_terms(tmp_path):
    from neuralcpm_plugin.bundle import load_bundle
    b = load_bundle(_bundle(tmp_path, kind="nh-closure"))
    assert eval_table1.run_label(b) == "Neural Hamiltonian + closure"
    assert eval_table1.find_bundle(tmp_path / "run") == tmp_path / "run" / "model"


def test_three_part_closure_reports_w_a_w_l_w_g(tmp_path):
    """A w_a·H_a + w_l·H_local + w_g·H_pooled bundle: its row is labelled by kind and the tables show all three
    weights (not one w_n); an analytic model shows none."""
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.hamiltonian import analytic
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian

    J = np.array([[0.0, 1.0, 1.2], [1.0, 0.8, 1.5], [1.2, 1.5, 0.6]])
    a = [analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 0.5, 0.5], [0, 25.0, 25.0])]
    loc = LocalNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4}, seed=0)
    pool = PooledNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4, "hidden": 6, "position_dim": 2,
                                    "lattice_shape": [24, 24]}, seed=0)
    ham = closure_hamiltonian(a, {"w_l": [loc], "w_g": [pool]}, LatticeSpec((24, 24)), 1.0, ["medium", "a", "b"], w_a=0.7,
                              weights={"w_l": 1.3, "w_g": 0.4})
    path = save_bundle(tmp_path / "lpc" / "model", ham, provenance={"model_kind": "local-pooled-closure"})
    b = load_bundle(path)
    assert eval_table1.run_label(b) == "Local + pooled NH + closure"
    w = eval_table1.closure_weights_of(b.hamiltonian)
    assert w == pytest.approx({"w_a": 0.7, "w_l": 1.3, "w_g": 0.4})
    b.provenance.pop("model_kind")
    assert eval_table1.run_label(b) == "Local + pooled NH + closure"          # from the term kinds
    assert eval_table1.closure_weights_of(load_bundle(_bundle(tmp_path)).hamiltonian) == {}

    states = _data(6)
    labels = np.arange(6) % 2
    data = save_npz(tmp_path / "d.npz", states, label=labels)
    model, info = train_classifier(states, labels, steps=2, config=ClassifierConfig(channels=(4, 4), mlp=(8,)))
    save_classifier(model, tmp_path / "clf", info)
    res = eval_table1.evaluate_table1(data, [(None, path)], scale="smoke", classifier=tmp_path / "clf", frames=1,
                                      trajectories=5, log=lambda *a: None)
    md = eval_table1.table1_markdown(res)
    assert "| Local + pooled NH + closure | 1 |" in md and "w_a 0.7, w_l 1.3, w_g 0.4" in md
    res2 = eval_table2.evaluate_table2(data, [(None, path)], scale="smoke", frames=1, trajectories=5,
                                       log=lambda *a: None)
    assert "w_a 0.7, w_l 1.3, w_g 0.4" in eval_table2.table2_markdown(res2)


def test_exact_classic_rollouts_and_trajectory_groups(tmp_path):
    """--sampler exact --proposal classic runs CC3D's dynamics; --groups sets the interval's groups (an interval
    over 2 groups of 6 trajectories differs from one over 3 groups); a bad proposal is an error naming it."""
    from neuralcpm_plugin.errors import ConfigError
    states = _data(8)
    data = save_npz(tmp_path / "d.npz", states)
    b = _bundle(tmp_path)
    res = {g: eval_table2.evaluate_table2(data, [(None, b)], scale="smoke", frames=2, trajectories=6, groups=g,
                                          sampler="exact", proposal="classic", log=lambda *a: None)
           for g in (2, 3)}
    assert res[2]["rollout"]["groups"] == 2 and res[2]["proposal"] == "classic"
    assert res[2]["rows"]["Cellsort Hamiltonian"]["err"] == res[3]["rows"]["Cellsort Hamiltonian"]["err"]
    assert res[2]["rows"]["Cellsort Hamiltonian"]["err_ci"] != res[3]["rows"]["Cellsort Hamiltonian"]["err_ci"]
    assert "exact sampler, classic proposals" in eval_table2.table2_markdown(res[2])
    assert "interval over 2 groups" in eval_table2.table2_markdown(res[2])
    from neuralcpm_plugin.bundle import load_bundle
    ham = load_bundle(b).hamiltonian
    a = eval_table1.rollout(ham, states[:1], frames=1, mcs_per_frame=1.0, sampler="exact", proposal="classic")
    c = eval_table1.rollout(ham, states[:1], frames=1, mcs_per_frame=1.0, sampler="exact", proposal="boundary")
    assert not np.array_equal(a, c)
    with pytest.raises(ConfigError, match="proposal"):
        eval_table1.rollout(ham, states[:1], frames=1, mcs_per_frame=1.0, sampler="exact", proposal="random")
    assert eval_table1.SCALES["cpu-wide"]["trajectories"] == 100 and eval_table1.SCALES["cpu-wide"]["groups"] == 10
    long = eval_table1.SCALES["cpu-long"]
    assert long["trajectories"] == 100 and long["frames"] * long["mcs_per_frame"] == pytest.approx(67.0)


def test_paired_starts_share_starts_and_give_paired_differences(tmp_path):
    """--starts paired (the default): every run starts from the same permuted states, and the CS difference of
    two rows is the mean over groups of the per-group differences with a t-interval over the groups;
    independent starts differ between runs and give no paired differences."""
    from neuralcpm_plugin.classifier import predict_proba
    from neuralcpm_plugin.errors import ConfigError
    from neuralcpm_plugin.metrics.paper import classifier_score, mean_ci
    states = _data(8)
    labels = np.arange(8) % 2
    data = save_npz(tmp_path / "d.npz", states, label=labels)
    model, info = train_classifier(states, labels, steps=2, config=ClassifierConfig(channels=(4, 4), mlp=(8,)))
    save_classifier(model, tmp_path / "clf", info)
    a = _bundle(tmp_path / "a")
    h = cellsort_hamiltonian({"0-1": 0.5, "0-2": 0.5, "1-1": 2.0, "1-2": 0.3, "2-2": 2.0}, 0.5, 25.0,
                             LatticeSpec((24, 24)), 1.0)
    b = save_bundle(tmp_path / "b" / "model", h, provenance={"model_kind": "analytic", "objective": "pl"})
    runs = [("A", a), ("B", b)]
    kw = {"scale": "smoke", "classifier": tmp_path / "clf", "frames": 2, "trajectories": 6, "groups": 3,
          "sampler": "exact", "proposal": "classic", "log": lambda *x: None}
    res = eval_table1.evaluate_table1(data, runs, **kw)
    assert res["starts"] == "paired"
    # run 1 (B) starts from run 0's starts with run 0's sampler seed: rolling B out by hand from seed*1000 = 0
    # reproduces its CS, and B's row is the same when it is evaluated alone
    from neuralcpm_plugin.bundle import load_bundle
    starts = eval_table1.permuted_starts(states, 6, np.random.default_rng(0))
    traj = eval_table1.rollout(load_bundle(b).hamiltonian, starts, frames=2, mcs_per_frame=0.5, seed=0,
                               sampler="exact", proposal="classic")
    pb = predict_proba(model, traj[:, -1, 1])
    assert res["rows"]["B"]["cs"] == pytest.approx(classifier_score(pb))
    gb = [classifier_score(pb[g]) for g in np.array_split(np.arange(6), 3)]
    assert res["raw"]["B"][0]["group_cs"] == pytest.approx(gb)
    alone = eval_table1.evaluate_table1(data, [("B", b)], **kw)
    assert alone["raw"]["B"][0]["group_cs"] == res["raw"]["B"][0]["group_cs"] and alone["paired"][0]["b"] == (
        "permuted starts (no dynamics)")
    ga = res["raw"]["A"][0]["group_cs"]
    d = {(x["a"], x["b"]): x for x in res["paired"]}
    assert set(d) == {("A", "permuted starts (no dynamics)"), ("B", "permuted starts (no dynamics)"), ("B", "A")}
    m, hw = mean_ci(np.asarray(gb) - np.asarray(ga))
    assert d[("B", "A")]["cs_diff"] == pytest.approx(m) and d[("B", "A")]["cs_diff_ci"] == pytest.approx(hw)
    assert d[("B", "A")]["groups"] == 3
    md = eval_table1.table1_markdown(res)
    assert "Paired starts" in md and f"| B | A | {eval_table1.fmt(m, hw)} |" in md
    # the whole-set CS difference with a paired bootstrap over the trajectories
    e = {(x["a"], x["b"]): x for x in res["paired_bootstrap"]}[("B", "A")]
    pa = np.asarray(res["raw"]["A"][0]["final_probs"])
    assert e["cs_diff"] == pytest.approx(classifier_score(pb) - classifier_score(pa), abs=1e-5)
    assert e["lo"] <= e["hi"] and e["trajectories"] == 6
    assert f"{e['cs_diff']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}]" in md
    # independent starts: run 1 draws its own starts (seed*1000 + 1), no paired differences
    ind = eval_table1.evaluate_table1(data, runs, starts="independent", **kw)
    assert ind["paired"] == [] and "Paired starts" not in eval_table1.table1_markdown(ind)
    assert ind["rows"]["A"]["cs"] == pytest.approx(res["rows"]["A"]["cs"])      # run 0: the same starts
    other = eval_table1.permuted_starts(states, 6, np.random.default_rng(1))
    assert [s.meta["start_frame"] for s in other] != [s.meta["start_frame"] for s in starts] or any(
        not np.array_equal(x.types, y.types) for x, y in zip(other, starts))
    with pytest.raises(ConfigError, match="starts"):
        eval_table1.evaluate_table1(data, runs, starts="shared", **kw)


def test_paired_bootstrap_resamples_the_same_trajectories_for_both_rows():
    """The whole-set CS difference and its percentile interval: a row against an identical row differs by
    exactly 0 in every resample; against another row the interval comes from resampling the same trajectory
    indices in both (recomputed here by hand); rows of different lengths are not compared."""
    from neuralcpm_plugin.metrics.paper import classifier_score
    rng = np.random.default_rng(3)
    pa = rng.dirichlet(np.ones(4) * 0.3, size=40)
    pb = rng.dirichlet(np.ones(4) * 0.3, size=40)
    res = {"x": [{"final_probs": pa.tolist()}], "y": [{"final_probs": pa.tolist()}],
           "z": [{"final_probs": pb.tolist()}], "w": [{"final_probs": pb[:30].tolist()}]}
    out = {(d["a"], d["b"]): d for d in eval_table1.paired_bootstrap(res, n_boot=200, seed=5)}
    same = out.get(("x", "y")) or out[("y", "x")]
    assert same["cs_diff"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    key = ("z", "x") if ("z", "x") in out else ("x", "z")
    a, b = (pb, pa) if key == ("z", "x") else (pa, pb)
    idx = np.random.default_rng(5).integers(0, 40, size=(200, 40))
    d = [classifier_score(a[i]) - classifier_score(b[i]) for i in idx]
    assert out[key]["lo"] == pytest.approx(np.percentile(d, 2.5)) and out[key]["hi"] == pytest.approx(
        np.percentile(d, 97.5))
    assert out[key]["cs_diff"] == pytest.approx(classifier_score(a) - classifier_score(b))
    assert not any("w" in k for k in out)


def test_table2_paired_starts_give_paired_error_differences(tmp_path):
    """Table 2 with --starts paired (the default): both runs roll out from the same permuted starts and sampler
    seeds (a run's row is the same evaluated alone), and the error difference of two rows is the mean over the
    trajectory groups of the per-group error differences with a t-interval over the groups; independent starts
    give no paired differences; an unknown mode is a clear error."""
    from neuralcpm_plugin.errors import ConfigError
    from neuralcpm_plugin.metrics.paper import mean_ci, mean_second_moments, moment_error, second_moments
    states = _data(8)
    data = save_npz(tmp_path / "d.npz", states)
    a = _bundle(tmp_path / "a")
    h = cellsort_hamiltonian({"0-1": 0.5, "0-2": 0.5, "1-1": 2.0, "1-2": 0.3, "2-2": 2.0}, 0.5, 25.0,
                             LatticeSpec((24, 24)), 1.0)
    b = save_bundle(tmp_path / "b" / "model", h, provenance={"model_kind": "analytic", "objective": "pl"})
    kw = {"scale": "smoke", "frames": 2, "trajectories": 6, "groups": 3, "sampler": "exact",
          "proposal": "classic", "log": lambda *x: None}
    res = eval_table2.evaluate_table2(data, [("A", a), ("B", b)], **kw)
    assert res["starts"] == "paired"
    starts = eval_table1.permuted_starts(states, 6, np.random.default_rng(0))
    from neuralcpm_plugin.bundle import load_bundle
    traj = eval_table1.rollout(load_bundle(b).hamiltonian, starts, frames=2, mcs_per_frame=0.5, seed=0,
                               sampler="exact", proposal="classic")
    finals = eval_table1.states_of(traj[:, -1])
    real = mean_second_moments(states)
    gb = [moment_error(mean_second_moments([finals[k] for k in g]), real)
          for g in np.array_split(np.arange(6), 3)]
    assert res["raw"]["B"][0]["group_err"] == pytest.approx(gb, nan_ok=True)
    assert res["rows"]["B"]["err"] == pytest.approx(moment_error(mean_second_moments(finals), real))
    alone = eval_table2.evaluate_table2(data, [("B", b)], **kw)
    assert alone["raw"]["B"][0]["group_err"] == res["raw"]["B"][0]["group_err"]
    ga = res["raw"]["A"][0]["group_err"]
    d = {(x["a"], x["b"]): x for x in res["paired"]}
    assert set(d) == {("A", "permuted starts (no dynamics)"), ("B", "permuted starts (no dynamics)"), ("B", "A")}
    m, hw = mean_ci(np.asarray(gb) - np.asarray(ga))
    assert d[("B", "A")]["err_diff"] == pytest.approx(m) and d[("B", "A")]["err_diff_ci"] == pytest.approx(hw)
    md = eval_table2.table2_markdown(res)
    assert "Paired starts" in md and f"| B | A | {eval_table1.fmt(m, hw, 1)} |" in md
    # the whole-set error difference with a paired bootstrap over the trajectories (recomputed by hand)
    from neuralcpm_plugin.metrics.stats import finite_column_means
    e = {(x["a"], x["b"]): x for x in res["paired_bootstrap"]}[("B", "A")]
    assert e["err_diff"] == pytest.approx(res["rows"]["B"]["err"] - res["rows"]["A"]["err"], abs=1e-3)
    ma, mb = (np.asarray(res["raw"][k][0]["final_m2"]) for k in "AB")
    assert mb.shape == (6, 2, 2) and mb == pytest.approx(np.stack([second_moments(f) for f in finals]), abs=1e-4)
    idx = np.random.default_rng(0).integers(0, 6, size=(2000, 6))
    dd = [moment_error(finite_column_means(mb[i]), real) - moment_error(finite_column_means(ma[i]), real)
          for i in idx]
    assert (e["lo"], e["hi"]) == pytest.approx(tuple(np.percentile(dd, [2.5, 97.5])))
    assert f"{e['err_diff']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}]" in md
    ind = eval_table2.evaluate_table2(data, [("A", a), ("B", b)], starts="independent", **kw)
    assert ind["paired"] == [] and "Paired starts" not in eval_table2.table2_markdown(ind)
    assert ind["rows"]["A"]["err"] == pytest.approx(res["rows"]["A"]["err"])      # run 0: the same starts
    with pytest.raises(ConfigError, match="starts"):
        eval_table2.evaluate_table2(data, [("A", a)], starts="shared", **kw)
