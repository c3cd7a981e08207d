"""Configuration: presets, TOML files, unknown keys and bad values are clear errors."""

import pytest

from neuralcpm_plugin.errors import ConfigError
from training.config import DEFAULTS, list_presets, load_config, merge, to_toml


def test_every_preset_loads_and_validates():
    names = list_presets()
    for required in ("default", "cellsort-a", "cellsort-b", "cellsort-a-cpu", "cellsort-b-cpu", "mnist",
                     "mnist-cpu", "bipolar", "bipolar-cpu", "mnist-cpu-pooled", "bipolar-cpu-pooled"):
        assert required in names
    for n in names:
        cfg = load_config(n)
        assert cfg["model"]["kind"] in ("analytic", "nh-closure", "local-nh-closure", "local-pooled-closure",
                                        "pooled-closure")
    t1 = load_config("mnist-cpu-table1")   # the README's Table-1 closure: analytic + pooled NH, D = 32, CD
    assert (t1["model"]["kind"], t1["model"]["pooled"]["position_dim"], t1["pcd"]["reset_prob"],
            t1["pcd"]["sampler"]) == ("pooled-closure", 32, 1.0, "exact")
    t1m = load_config("mnist-cpu-table1-mixed")   # that closure fine-tuned with exact + parallel chains
    assert (t1m["model"]["kind"], t1m["model"]["pooled"]["position_dim"], t1m["pcd"]["reset_prob"],
            t1m["pcd"]["sampler"], t1m["pcd"]["flips"], t1m["pcd"]["chain_rng"], t1m["pcd"]["iterations"]) == \
        ("pooled-closure", 32, 1.0, "mixed", 50, "batched", 400)
    t2 = load_config("bipolar-cpu-table2")   # the same recipe for Table 2 (bipolar)
    assert (t2["model"]["kind"], t2["model"]["pooled"]["position_dim"], t2["pcd"]["reset_prob"],
            t2["pcd"]["sampler"], t2["data"]["path"]) == ("pooled-closure", 32, 1.0, "exact",
                                                          "runs/data/bipolar-cpu.npz")
    t2p = load_config("bipolar-cpu-table2-pcd")   # Table 2 at 67 MCS: persistent chains, frozen analytic prior
    assert (t2p["model"]["kind"], t2p["model"]["pooled"]["position_dim"], t2p["model"]["freeze_prior"],
            t2p["pcd"]["reset_prob"], t2p["pcd"]["mcs"], t2p["pcd"]["iterations"], t2p["pcd"]["sampler"],
            t2p["pcd"]["proposal"]) == ("pooled-closure", 32, True, 0.033, 1.0, 400, "exact", "boundary")
    t2x = load_config("bipolar-cpu-table2-pos")   # its fine-tuning: 67-MCS chains, position embedding step x20
    assert (t2x["model"]["kind"], t2x["model"]["freeze_prior"], t2x["pcd"]["reset_prob"], t2x["pcd"]["lr"],
            t2x["pcd"]["lr_scale"], t2x["pcd"]["iterations"], t2x["pcd"]["sampler"]) == \
        ("pooled-closure", True, 0.015, 5e-3, {"pos": 20.0}, 600, "exact")


def test_default_is_pl_analytic_and_paper_presets_follow_table7():
    d = load_config(None)
    assert (d["objective"]["name"], d["model"]["kind"]) == ("pl", "analytic")
    a = load_config("cellsort-a")["pcd"]
    assert (a["batch"], a["iterations"], a["mcs"], a["ema"], a["alpha"], a["flips"], a["reset_prob"]) == \
        (16, 10000, 1.0, 0.0, 0.0, 100, 1.0)
    m = load_config("mnist")["pcd"]
    assert (m["mcs"], m["ema"], m["alpha"], m["flips"], m["reset_prob"], m["lr"]) == (0.5, 0.99, 5e-4, 50, 0.025, 1e-3)
    b = load_config("bipolar")["pcd"]
    assert (b["mcs"], b["ema"], b["alpha"], b["flips"], b["reset_prob"]) == (0.7, 0.99, 5e-4, 50, 0.025)
    assert load_config("mnist-cpu")["pcd"]["mcs"] == 0.5      # inherits from its parent preset


def test_unknown_key_names_the_file_and_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[pcd]\nbatch = 8\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match=r"c\.toml.*pcd\.learning_rate"):
        load_config(str(f))
    f.write_text('colour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_config(str(f))


def test_wrong_types_and_ranges(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[pcd]\nbatch = "sixteen"\n')
    with pytest.raises(ConfigError, match="pcd.batch.*integer"):
        load_config(str(f))
    f.write_text('[pcd]\nreset_prob = 1.5\n')
    with pytest.raises(ConfigError, match="reset_prob"):
        load_config(str(f))
    f.write_text('[model]\nkind = "transformer"\n')
    with pytest.raises(ConfigError, match="model.kind"):
        load_config(str(f))
    f.write_text('[pcd\nbatch = 1\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_pcd_lr_scale_is_checked_and_roundtrips(tmp_path):
    cfg = load_config(None, {"pcd": {"lr_scale": {"pos": 20.0, "mlp.0.weight": 2}}})
    assert cfg["pcd"]["lr_scale"] == {"pos": 20.0, "mlp.0.weight": 2}
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert load_config(str(f))["pcd"]["lr_scale"] == cfg["pcd"]["lr_scale"]
    for bad in ({"pos": 0.0}, {"pos": -1.0}, {"pos": float("nan")}, {"pos": "fast"}, {"pos": True}, {"": 2.0}):
        with pytest.raises(ConfigError, match="pcd.lr_scale"):
            load_config(None, {"pcd": {"lr_scale": bad}})
    with pytest.raises(ConfigError, match="pcd.lr_scale.*table"):
        load_config(None, {"pcd": {"lr_scale": 3.0}})


def test_free_tables_pass_through_and_roundtrip(tmp_path):
    cfg = merge(DEFAULTS, {"generate": {"options": {"anything": 3}}, "model": {"neural": {"hidden": [4, 8]}}})
    assert cfg["generate"]["options"] == {"anything": 3}
    f = tmp_path / "back.toml"
    f.write_text(to_toml(cfg))
    again = load_config(str(f))
    assert again["generate"]["options"] == {"anything": 3}
    assert again["model"]["neural"] == {"hidden": [4, 8]}
    assert again["pcd"] == cfg["pcd"]


def test_command_line_overrides_are_checked():
    cfg = load_config("cellsort-a-cpu", {"pcd": {"iterations": 5}, "seed": 3})
    assert cfg["pcd"]["iterations"] == 5 and cfg["seed"] == 3
    with pytest.raises(ConfigError, match="command line"):
        load_config(None, {"pcd": {"nope": 1}})


def test_a_file_may_start_from_a_preset_that_starts_from_another(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('preset = "mnist-cpu"\n[pcd]\niterations = 7\n')
    cfg = load_config(str(f))
    assert cfg["pcd"]["iterations"] == 7                         # the file
    assert cfg["model"]["kind"] == "local-nh-closure"            # mnist-cpu
    assert cfg["pcd"]["mcs"] == 0.5 and cfg["pcd"]["alpha"] == 5e-4   # mnist, mnist-cpu's parent
    assert cfg["data"]["path"] == "runs/data/mnist-cpu.npz"


def test_preset_cycles_are_a_clear_error(tmp_path, monkeypatch):
    from training import config
    real = config.load_preset
    monkeypatch.setattr(config, "load_preset", lambda n: {"preset": "b"} if n == "a" else
                        ({"preset": "a"} if n == "b" else real(n)))
    f = tmp_path / "c.toml"
    f.write_text('preset = "a"\n')
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        load_config(str(f))
