"""The PCD loop: exact resume after SIGKILL, SIGTERM checkpoint, divergence guard, checkpoints without pickle."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fit_helpers import ROOT, block_states, write_npz

from training.checkpoint import load_checkpoint
from training.config import load_config
from training.fit import fit


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, data, out, **pcd):
    p = {"batch": 4, "iterations": 8, "mcs": 0.25, "flips": 10, "lr": 0.02, "checkpoint_every": 2,
         "reset_prob": 0.3, "plot_every": 0, "ema": 0.5, "alpha": 1e-4}
    p.update(pcd)
    return load_config(None, {"name": "t", "out": str(out), "threads": 1, "data": {"path": str(data)},
                              "objective": {"name": "pcd"}, "pcd": p,
                              "export": {"cc3d": False, "morpheus": False, "figure": False}})


@pytest.fixture
def data(tmp_path):
    return write_npz(tmp_path / "d.npz", block_states(6, size=24))


def _ckpt(run):
    t, m = load_checkpoint(run / "checkpoint")
    return t, m


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data):
    n_it = 10
    ref = tmp_path / "ref"
    fit(_cfg(tmp_path, data, ref, iterations=n_it), progress=False)
    t_ref, m_ref = _ckpt(ref)
    assert m_ref["iteration"] == n_it

    run = tmp_path / "killed"
    cfg_file = tmp_path / "c.toml"
    from training.config import to_toml
    cfg_file.write_text(to_toml(_cfg(tmp_path, data, run, iterations=n_it)))
    proc = subprocess.Popen([sys.executable, "-m", "training.fit", "--config", str(cfg_file), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        sj = run / "checkpoint" / "state.json"
        if sj.exists():
            try:
                it = json.loads(sj.read_text())["iteration"]
            except (json.JSONDecodeError, KeyError):
                it = 0
            if 2 <= it < n_it:
                proc.send_signal(signal.SIGKILL)
                killed_at = it
                break
        time.sleep(0.02)
    proc.wait()
    if killed_at is None:
        pytest.skip("the run finished before it could be killed (machine too fast or too slow)")
    # resume in-process to the same number of iterations
    fit(_cfg(tmp_path, data, run, iterations=n_it), resume=True, progress=False)
    t_res, m_res = _ckpt(run)
    assert m_res["iteration"] == n_it
    _same(t_ref, t_res)                      # parameters, Adam, EMA, chains, every RNG state
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == n_it + 1             # the CSV was cut back to the checkpoint, no duplicate rows
    ref_rows = (ref / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[1] for r in rows] == [r.split(",")[1] for r in ref_rows]   # same losses


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path, data, monkeypatch):
    from training import pcd
    orig = pcd.PCDTrainer.step
    sent = {}

    def step(self):
        row = orig(self)
        if self.iteration == 3 and not sent:
            sent[1] = True
            signal.raise_signal(signal.SIGTERM)
        return row

    monkeypatch.setattr(pcd.PCDTrainer, "step", step)
    out = tmp_path / "run"
    s = fit(_cfg(tmp_path, data, out, iterations=8, checkpoint_every=100), progress=False)
    assert s["status"] == "interrupted" and s["exit_code"] == 143
    assert _ckpt(out)[1]["iteration"] == 3
    assert (out / "model" / "model.json").exists()
    monkeypatch.setattr(pcd.PCDTrainer, "step", orig)
    s = fit(_cfg(tmp_path, data, out, iterations=8, checkpoint_every=100), resume=True, progress=False)
    assert s["status"] == "finished" and _ckpt(out)[1]["iteration"] == 8


def test_divergence_guard_rolls_back_and_lowers_the_learning_rate(tmp_path, data, monkeypatch):
    from training import pcd
    orig = pcd.PCDTrainer.step
    state = {"n": 0}

    def step(self):
        row = orig(self)
        if self.iteration == 5 and state["n"] == 0:     # pretend the energies exploded once
            state["n"] = 1
            row = dict(row, diverged=True, loss=float("nan"))
        return row

    monkeypatch.setattr(pcd.PCDTrainer, "step", step)
    out = tmp_path / "run"
    s = fit(_cfg(tmp_path, data, out, iterations=8, checkpoint_every=4, lr=0.02, lr_decay=0.5), progress=False)
    assert s["status"] == "finished" and s["rollbacks"] == 1
    log = (out / "train.log").read_text()
    assert "divergence guard" in log and "rolled back to iteration 4" in log
    _, m = _ckpt(out)
    assert m["lr_scale"] == 0.5 and m["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)


def test_divergence_guard_gives_up_with_an_error(tmp_path, data):
    from training.pcd import TrainingDiverged
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="diverged"):
        fit(_cfg(tmp_path, data, out, iterations=6, energy_limit=1e-3, max_rollbacks=2), progress=False)


def test_checkpoint_files_are_safetensors_and_json(tmp_path, data):
    out = tmp_path / "run"
    fit(_cfg(tmp_path, data, out, iterations=2), progress=False)
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["state.json", "state.safetensors"]
    raw = (out / "checkpoint" / "state.safetensors").read_bytes()
    assert b"pickle" not in raw[:2000] and raw[8:9] == b"{"        # safetensors header is JSON
    t, m = _ckpt(out)
    assert t["chains.ids"].shape == (4, 24, 24) and t["rng.train"].dtype == torch.uint8
    assert {"iteration", "optimizer", "lr_scale"} <= set(m)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["iteration", "loss", "e_pos", "e_neg", "acceptance"] and "lambda" in header
    # the bundle carries provenance
    mj = json.loads((out / "model" / "model.json").read_text())
    prov = mj["provenance"]
    assert len(prov["data_sha256"]) == 64 and prov["seed"] == 0 and prov["config"]["pcd"]["batch"] == 4
    assert "package_version" in prov


def test_pcd_moves_parameters_towards_data(tmp_path, data):
    """Sign check: starting with a huge contact energy, the chains shed boundary; the loss gradient lowers J."""
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, data, out, iterations=6, lr=0.05, ema=0.0)
    cfg["model"]["init_J"] = 3.0
    fit(cfg, progress=False)
    from neuralcpm_plugin.bundle import load_bundle
    J = load_bundle(out / "model").hamiltonian.term("contact").J
    J = J.detach()
    assert float(J[1, 0]) < 3.0 and float(J[2, 0]) < 3.0
    assert np.isfinite(J.detach().numpy()).all()


@pytest.mark.parametrize("chain_rng", ["batched", "per_chain"])
def test_stop_and_resume_in_process_matches_uninterrupted(tmp_path, data, chain_rng):
    ref = tmp_path / "ref"
    fit(_cfg(tmp_path, data, ref, iterations=6, chain_rng=chain_rng, checkpoint_every=3), progress=False)
    run = tmp_path / "split"
    fit(_cfg(tmp_path, data, run, iterations=3, chain_rng=chain_rng, checkpoint_every=3), progress=False)
    fit(_cfg(tmp_path, data, run, iterations=6, chain_rng=chain_rng, checkpoint_every=3), resume=True, progress=False)
    _same(_ckpt(ref)[0], _ckpt(run)[0])


@pytest.mark.parametrize("proposal", ["classic", "boundary"])
def test_exact_chains_use_the_configured_proposal(tmp_path, data, monkeypatch, proposal):
    from neuralcpm_plugin.sampling import exact
    seen = []
    real = exact.ExactSampler

    class Spy(real):
        def __init__(self, *a, **kw):
            seen.append(kw.get("proposal"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(exact, "ExactSampler", Spy)
    out = tmp_path / "run"
    fit(_cfg(tmp_path, data, out, iterations=2, sampler="exact", proposal=proposal, reset_prob=1.0,
             reset_permute=False), progress=False)
    assert len(seen) == 2 * 4 and set(seen) == {proposal}


def test_exact_chain_sweep_equals_run_exact_per_chain():
    """ExactChainSampler (one sampler per chain, neural weights shared across chains) moves every chain as
    ``run_exact`` from the chain's state with the seed drawn from the generator: same lattices, same counts."""
    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.sampling.exact import run_exact
    from training.fit import build_model
    from training.pcd import ExactChainSampler
    states = block_states(3, size=24)
    cfg = load_config(None, {"name": "t", "model": {"kind": "local-pooled-closure",
                                                    "neural": {"stride": 3, "channels": 4},
                                                    "pooled": {"stride": 3, "channels": 4, "hidden": 8}}})
    ham, _ = build_model(cfg, states, seed=0)
    batch = Batch.from_states(states)
    g = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    seeds = [int(torch.randint(0, 2 ** 62, (), generator=g2)) for _ in states]
    before = batch.ids.clone()
    st = ExactChainSampler(ham, proposal="boundary").sweep(batch, 0.5, g)
    acc = cand = 0
    for b, (state, seed) in enumerate(zip(states, seeds)):
        ref = run_exact(state, ham, 0.5, seed=seed, proposal="boundary")
        assert np.array_equal(batch.ids[b].numpy(), ref.final.ids)
        vol = np.bincount(ref.final.ids.ravel(), minlength=batch.volumes.shape[1])
        assert np.array_equal(batch.volumes[b].numpy()[1:], vol[1:])
        acc, cand = acc + ref.stats["accepted"], cand + ref.stats["candidates"]
    assert not torch.equal(before, batch.ids) and st["acceptance"] == acc / cand


def test_resume_with_exact_chains_and_compiled_neural_terms_matches_uninterrupted(tmp_path, data):
    """pcd.sampler = "exact" with the local + pooled closure (compiled terms in the sampler's loop): stopping
    after 2 iterations and resuming gives the same checkpoint as 4 iterations at once."""
    def cfg(out, n):
        c = _cfg(tmp_path, data, out, iterations=n, sampler="exact", proposal="boundary", checkpoint_every=2)
        c["model"].update(kind="local-pooled-closure", neural={"stride": 3, "channels": 4},
                          pooled={"stride": 3, "channels": 4, "hidden": 8})
        return c
    fit(cfg(tmp_path / "ref", 4), progress=False)
    fit(cfg(tmp_path / "split", 2), progress=False)
    fit(cfg(tmp_path / "split", 4), resume=True, progress=False)
    _same(_ckpt(tmp_path / "ref")[0], _ckpt(tmp_path / "split")[0])


def test_unknown_pcd_proposal_is_a_clear_error(tmp_path, data):
    from neuralcpm_plugin.errors import ConfigError
    with pytest.raises(ConfigError, match="pcd.proposal"):
        _cfg(tmp_path, data, tmp_path / "r", proposal="heatbath")


def test_learned_external_field_baseline_trains_and_round_trips(tmp_path, data):
    """model.external_field: μ and the whole field φ are learned by pcd and stored in the bundle."""
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.errors import ConfigError
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, data, out, iterations=4, lr=0.05, ema=0.0)
    cfg["model"]["external_field"] = True
    fit(cfg, progress=False)
    ham = load_bundle(out / "model").hamiltonian
    ext = ham.term("external")
    assert ext.learn_field and isinstance(ext.field, torch.nn.Parameter)
    assert float(ext.field.detach().abs().max()) > 0            # moved from its zero start
    assert ext.field.shape == (24, 24)
    with pytest.raises(ConfigError, match="external_field.*pcd"):
        load_config(None, {"model": {"external_field": True}, "objective": {"name": "pl"}})
    with pytest.raises(ConfigError, match="external_field needs an analytic part"):
        load_config(None, {"model": {"external_field": True, "kind": "nh"}, "objective": {"name": "pcd"}})


def test_learned_target_volume_moves_towards_the_data(tmp_path):
    """model.learn_target_volume: V* starts at a wrong value and pcd pulls it towards the data's volumes."""
    from neuralcpm_plugin.bundle import load_bundle
    states = block_states(6, size=24)
    data = write_npz(tmp_path / "d.npz", states)
    mean_v = float(np.mean([s.volumes()[s.cell_ids()].mean() for s in states]))
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, data, out, iterations=30, lr=0.5, ema=0.0, reset_prob=1.0, reset_permute=False,
               init_permute=False, mcs=0.5)
    cfg["model"].update(learn_target_volume=True, target_volume=mean_v + 15.0, init_lambda=0.5)
    fit(cfg, progress=False)
    vol = load_bundle(out / "model").hamiltonian.term("volume")
    tgt = vol.target.detach().numpy()[1:]
    assert np.all(tgt < mean_v + 15.0 - 1.0), (tgt, mean_v)     # moved down towards the data
    # with pl the convex fit learns κ = λ·V* (tests/test_three_d.py checks the recovered values)
    assert load_config(None, {"model": {"learn_target_volume": True}, "objective": {"name": "pl"}})


def test_mixed_chain_sweep_is_exact_on_the_first_half_and_parallel_on_the_rest():
    """pcd.sampler = "mixed": chains 0..B//2-1 move as ExactChainSampler moves them, the rest as the parallel
    sampler does, both drawing from the one generator (exact part first); volumes are recounted."""
    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    from training.fit import build_model
    from training.pcd import ExactChainSampler, MixedChainSampler
    states = block_states(4, size=24)
    ham, _ = build_model(load_config(None, {"name": "t"}), states, seed=0)
    batch = Batch.from_states(states)
    before = batch.ids.clone()
    st = MixedChainSampler(ham, 10, proposal="boundary").sweep(batch, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ex = Batch.from_states(states[:2])
    ExactChainSampler(ham, proposal="boundary").sweep(ex, 0.5, g)
    par = Batch.from_states(states[2:])
    ParallelSampler(ham, n_flips=10).sweep(par, 0.5, g)
    assert torch.equal(batch.ids[:2], ex.ids) and torch.equal(batch.ids[2:], par.ids)
    assert not torch.equal(batch.ids, before)
    vol = torch.stack([torch.bincount(batch.ids[b].flatten(), minlength=batch.volumes.shape[1]) for b in range(4)])
    assert torch.equal(batch.volumes, vol)
    assert 0 < st["acceptance_exact"] <= 1 and 0 < st["acceptance_parallel"] <= 1
    assert st["acceptance"] == pytest.approx((st["acceptance_exact"] + st["acceptance_parallel"]) / 2)


def test_mixed_chains_train_and_resume_exactly(tmp_path, data):
    ref = tmp_path / "ref"
    fit(_cfg(tmp_path, data, ref, iterations=4, sampler="mixed", chain_rng="batched", checkpoint_every=2),
        progress=False)
    run = tmp_path / "split"
    fit(_cfg(tmp_path, data, run, iterations=2, sampler="mixed", chain_rng="batched", checkpoint_every=2),
        progress=False)
    fit(_cfg(tmp_path, data, run, iterations=4, sampler="mixed", chain_rng="batched", checkpoint_every=2),
        resume=True, progress=False)
    _same(_ckpt(ref)[0], _ckpt(run)[0])


def test_mixed_sampler_needs_batched_chains(tmp_path, data):
    from neuralcpm_plugin.errors import ConfigError
    with pytest.raises(ConfigError, match="mixed.*chain_rng"):
        _cfg(tmp_path, data, tmp_path / "r", sampler="mixed", chain_rng="per_chain")


def test_init_starts_every_parameter_at_the_bundle_and_refuses_another_model(tmp_path, data):
    """model.init (--init): fine-tuning starts at the bundle's parameters; a bundle of another model kind or
    architecture is a ConfigError naming the bundle."""
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.errors import ConfigError
    from training.fit import build_model, init_parameters, load_training_data
    first = tmp_path / "first"
    cfg = _cfg(tmp_path, data, first, iterations=2, ema=0.0, lr=0.05)
    cfg["model"].update(kind="pooled-closure", pooled={"position_dim": 4, "hidden": 8})
    fit(cfg, progress=False)
    src = load_bundle(first / "model").hamiltonian
    states, _ = load_training_data(cfg, tmp_path)
    ham, _ = build_model(cfg, states, seed=7)
    assert any(not torch.equal(a, b) for a, b in zip(ham.state_dict().values(), src.state_dict().values()))
    init_parameters(ham, str(first / "model"))
    for (k, a), (k2, b) in zip(ham.state_dict().items(), src.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # through fit: 0 further iterations would be the bundle itself; one iteration starts from it
    second = tmp_path / "second"
    cfg2 = _cfg(tmp_path, data, second, iterations=1, ema=0.0, lr=1e-6)
    cfg2["model"].update(kind="pooled-closure", pooled={"position_dim": 4, "hidden": 8}, init=str(first / "model"))
    fit(cfg2, progress=False)
    tuned = load_bundle(second / "model").hamiltonian
    for a, b in zip(tuned.parameters(), src.parameters()):
        assert torch.allclose(a, b, atol=1e-4)
    other, _ = build_model(load_config(None, {"name": "t"}), states, seed=0)       # analytic only
    with pytest.raises(ConfigError, match="first/model.*same model kind"):
        init_parameters(other, str(first / "model"))
    wider = dict(cfg["model"], pooled={"position_dim": 6, "hidden": 8})
    ham6, _ = build_model(dict(cfg, model=wider), states, seed=0)
    with pytest.raises(ConfigError, match="architecture"):
        init_parameters(ham6, str(first / "model"))
    with pytest.raises(ConfigError, match="model.init must be a model bundle"):
        init_parameters(ham, str(tmp_path / "missing"))


def test_lr_scale_slows_one_parameter_and_unknown_names_are_an_error(tmp_path, data):
    """pcd.lr_scale multiplies one learnable tensor's Adam step: J with factor 1e-9 stays at its start while λ
    (factor 1) moves; a name that matches no learnable tensor stops the run before training, naming them."""
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.errors import NeuralCPMError
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, data, out, iterations=4, lr=0.05, ema=0.0, lr_scale={"J_triu": 1e-9})
    cfg["model"]["init_J"] = 3.0
    fit(cfg, progress=False)
    h = load_bundle(out / "model").hamiltonian
    J = h.term("contact").J.detach().numpy()
    lam = h.term("volume").lam.detach().numpy()
    assert abs(J[1, 0] - 3.0) < 1e-6 and abs(J[2, 1] - 3.0) < 1e-6
    assert abs(float(lam[1]) - 0.1) > 1e-3
    bad = _cfg(tmp_path, data, tmp_path / "bad", iterations=2, lr_scale={"nope": 2.0})
    with pytest.raises(NeuralCPMError, match="lr_scale.*'nope'.*J_triu"):
        fit(bad, progress=False)
