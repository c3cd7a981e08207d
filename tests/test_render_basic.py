"""Rendering: numpy colour image, pyvista offscreen PNG/GIF (2-D and 3-D), training-curve plots."""

import json

import numpy as np
import pytest

from neuralcpm_plugin import render
from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.lattice import CellState

pv = pytest.importorskip("pyvista")
PIL = pytest.importorskip("PIL.Image")


def _state():
    ids = np.zeros((20, 30), np.int32)
    ids[2:8, 3:9] = 1          # type 1, top left
    ids[10:15, 15:25] = 2      # type 2, bottom right
    return CellState(ids, np.array([0, 1, 2], np.int32))


def test_state_rgb_colours_and_outlines():
    s = _state()
    img = render.state_rgb(s, scale=4)
    assert img.shape == (80, 120, 3) and img.dtype == np.uint8
    assert tuple(img[4 * 4 + 1, 4 * 5 + 1]) == tuple(render.DEFAULT_COLOURS[1])   # inside cell 1
    assert tuple(img[4 * 12 + 2, 4 * 20 + 2]) == tuple(render.DEFAULT_COLOURS[2])  # inside cell 2
    assert tuple(img[0, 0]) == tuple(render.DEFAULT_COLOURS[0])                    # medium
    assert tuple(img[4 * 2, 4 * 5 + 1]) == tuple(render.OUTLINE)                   # top edge of cell 1
    plain = render.state_rgb(s, scale=4, outline=False)
    assert not (plain == render.OUTLINE).all(axis=-1).any()
    with pytest.raises(DataError):
        render.state_rgb(CellState(np.zeros((2, 3, 3), np.int32), np.array([0], np.int32)))


def test_render_state_png_orientation(tmp_path):
    img = render.render_state(_state(), tmp_path / "s.png", window_size=(300, 200))
    assert img.shape == (200, 300, 3)
    saved = np.asarray(PIL.open(tmp_path / "s.png").convert("RGB"))
    assert saved.shape == (200, 300, 3)
    red = np.all(np.abs(saved.astype(int) - render.DEFAULT_COLOURS[1]) < 20, axis=-1)
    green = np.all(np.abs(saved.astype(int) - render.DEFAULT_COLOURS[2]) < 20, axis=-1)
    ry, rx = np.argwhere(red).mean(0)
    gy, gx = np.argwhere(green).mean(0)
    assert ry < 100 and rx < 150          # type 1 drawn top left, as in imshow
    assert gy > 100 and gx > 150


def test_render_trajectory_gif(tmp_path):
    s = _state()
    ids2 = s.ids.copy()
    ids2[ids2 == 1] = 0
    ids2[3, 4] = 1
    frames = [s, CellState(ids2, s.types), s]
    out = render.render_trajectory(frames, tmp_path / "t.gif", window_size=(120, 80),
                                   titles=["MCS 0", "MCS 1", "MCS 2"])
    im = PIL.open(out)
    assert im.n_frames == 3
    im.seek(1)
    with pytest.raises(DataError):
        render.render_trajectory(frames, tmp_path / "t.avi")
    with pytest.raises(DataError):
        render.render_trajectory(frames, tmp_path / "t.gif", titles=["one"])


def test_render_state_3d(tmp_path):
    ids = np.zeros((6, 8, 8), np.int32)
    ids[1:4, 1:4, 1:4] = 1
    ids[2:5, 4:7, 4:7] = 2
    img = render.render_state(CellState(ids, np.array([0, 1, 2], np.int32)), tmp_path / "v.png",
                              window_size=(160, 160))
    assert img.shape == (160, 160, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 3     # not a blank picture


def test_render_grid(tmp_path):
    out = render.render_grid([_state()] * 3, tmp_path / "g.png", ncols=2, titles=["a", "b", "c"])
    assert PIL.open(out).size[0] > 0


def test_training_curves_from_dict_and_files(tmp_path):
    hist = {"iteration": [1, 2, 3, 4], "loss": [1.0, 0.5, 0.2, 0.1], "w_n": [1.0, 0.9, 0.8, 0.85]}
    p = render.plot_training_curves(hist, tmp_path / "c.png", smooth=2)
    assert p.exists() and p.stat().st_size > 1000
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1 / (i + 1)}) for i in range(5)))
    h = render.load_history(tmp_path / "h.jsonl")
    assert h["loss"][0] == 1.0 and h["step"] == [0, 1, 2, 3, 4]
    (tmp_path / "h.csv").write_text("iteration,loss\n1,0.5\n2,0.25\n")
    assert render.load_history(tmp_path / "h.csv") == {"iteration": [1.0, 2.0], "loss": [0.5, 0.25]}
    assert render.plot_training_curves(tmp_path / "h.csv", tmp_path / "c2.png").exists()
    with pytest.raises(DataError):
        render.plot_training_curves({"name": ["a", "b"]}, tmp_path / "c3.png")
