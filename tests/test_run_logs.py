"""Long runs talk: train.log from the first line of every pcd run, a periodic status line, help texts that
agree with the code."""

import re

import pytest
import torch
from fit_helpers import block_states, write_npz
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import load_config
from training.fit import fit
from training.status import StatusLine, format_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_status_line_is_rate_limited_and_estimates_the_remaining_time():
    clock, lines = Clock(), []
    s = StatusLine("pcd", 100, every=30.0, start=10, emit=lines.append, clock=clock)
    for i in range(11, 101):
        clock.t += 2.0                       # 0.5 it/s
        s.update(i, loss=0.25)
    # 90 iterations in 180 s: a line at 30, 60, ..., 180 s (the last one is the final iteration)
    assert len(lines) == 6
    assert lines[0] == "pcd: iteration 25/100 (25.0 %), loss 0.25, 0.5 it/s, elapsed 0:30, ETA 2:30"
    assert lines[-1].startswith("pcd: iteration 100/100 (100.0 %)") and lines[-1].endswith("ETA 0:00")


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 1e6, allow_nan=False))
def test_format_duration_round_trips(sec):
    parts = [int(p) for p in format_duration(sec).split(":")]
    total = parts[0] * 60 + parts[1] if len(parts) == 2 else parts[0] * 3600 + parts[1] * 60 + parts[2]
    assert total == round(sec)
    assert all(0 <= p < 60 for p in parts[1:])


def test_format_duration_of_unknown_is_a_question_mark():
    assert format_duration(float("nan")) == "?" and format_duration(float("inf")) == "?"


@pytest.fixture
def data(tmp_path):
    return write_npz(tmp_path / "d.npz", block_states(6, size=24))


def _cfg(data, out, **pcd):
    p = {"batch": 4, "iterations": 4, "mcs": 0.25, "flips": 10, "lr": 0.02, "checkpoint_every": 2,
         "reset_prob": 0.3, "plot_every": 0}
    p.update(pcd)
    return load_config(None, {"name": "t", "out": str(out), "threads": 1, "data": {"path": str(data)},
                              "objective": {"name": "pcd"}, "pcd": p,
                              "export": {"cc3d": False, "morpheus": False, "figure": False}})


@pytest.mark.parametrize("progress", [False, True])
def test_pcd_writes_train_log_from_the_start_with_status_lines(tmp_path, data, capsys, progress):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(_cfg(data, tmp_path / "run"), progress=progress)
    finally:
        torch.set_num_threads(n)
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert all(re.match(stamp, line) for line in log), log
    assert "data: 6 states" in log[0]                       # from the first line the job prints
    start = [i for i, line in enumerate(log) if re.match(stamp + r"pcd: iterations 0 → 4; 4 chains", line)]
    status = [i for i, line in enumerate(log) if "pcd: iteration 4/4 (100.0 %), loss" in line]
    finish = [i for i, line in enumerate(log) if "pcd: finished at iteration 4" in line]
    assert len(start) == len(status) == len(finish) == 1 and start[0] < status[0] < finish[0], log
    assert "it/s" in log[status[0]] and "ETA 0:00" in log[status[0]]
    assert "done in" in log[-1]
    out = capsys.readouterr().out
    # on the console only when there is no progress bar
    assert ("pcd: iteration 4/4" in out) == (not progress)


def test_resumed_run_appends_to_the_same_log(tmp_path, data):
    run = tmp_path / "run"
    fit(_cfg(data, run, iterations=2), progress=False)
    fit(_cfg(data, run, iterations=4), progress=False, resume=True)
    log = (run / "train.log").read_text()
    assert log.count("pcd: iterations 0 → 2") == 1 and log.count("pcd: iterations 2 → 4") == 1
    assert "resumed from" in log and "pcd: iteration 4/4" in log


@pytest.mark.parametrize("name", ["cellsort", "mnist", "bipolar"])
def test_generator_help_agrees_with_the_scales_table(name, capsys):
    import importlib

    from training.generate import main
    mod = importlib.import_module(f"training.gen_{name}")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for scale, v in mod.SCALES.items():
        assert f"{scale}: {v['size']}x{v['size']}, {v['cells']} cells, {v['n']} snapshots" in text, (scale, text)


def test_progress_counter_without_a_bar_prints_rate_limited_status_lines():
    from training.status import progress_counter
    lines = []
    bar = progress_counter(5, "bipolar (cpu)", "snapshot", progress=False, every=3600.0, emit=lines.append)
    for _ in range(5):
        bar.update(1)
    bar.close()
    # the first update comes before `every` seconds: silent; the last one always prints
    assert len(lines) == 1 and lines[0].startswith("bipolar (cpu): snapshot 5/5 (100.0 %)"), lines
    lines.clear()
    bar = progress_counter(3, "x", "run", progress=False, every=0.0, emit=lines.append)
    for _ in range(3):
        bar.update(1)
    assert [ln.split(",")[0] for ln in lines] == ["x: run 1/3 (33.3 %)", "x: run 2/3 (66.7 %)", "x: run 3/3 (100.0 %)"]
