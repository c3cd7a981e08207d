"""Pictures of lattice states: a state to PNG, a trajectory to GIF/MP4, training curves (pyvista offscreen).

* :func:`state_rgb` — the 2-D colour image of a state in numpy: each site is a ``scale × scale`` block coloured
  by its cell type, with a dark one-pixel line between sites of different cells (cell outlines). Row 0 of
  the array (``y = 0``) is the top of the picture, ``x`` runs to the right, as in ``imshow``.
* :func:`render_state` — a state (2-D or 3-D) rendered offscreen with pyvista, optionally written to PNG. 2-D
  states are drawn as the :func:`state_rgb` image on a flat plane (parallel projection); 3-D states as the
  surfaces of the cells (:func:`cell_surfaces`: medium hidden, coloured by type, each cell a slightly different
  shade so that neighbours of one type stay apart; ``style="voxels"`` draws plain voxels), seen from an
  oblique camera; ``clip="x"`` (or ``"y"``, ``"z"``) removes the half of the lattice beyond the middle of that
  axis, showing the inside of an aggregate. :func:`render_3d_views` puts the whole and the clipped view side by
  side.
* :func:`render_trajectory` — frames to an animated GIF (Pillow) or MP4 (imageio-ffmpeg, optional), one
  pyvista plotter reused for all frames.
* :func:`render_grid` — several 2-D states side by side in one PNG (matplotlib), e.g. training samples.
* :func:`plot_rollout_comparison` — data states beside model roll-outs plus statistics over time (matplotlib).
* :func:`plot_training_curves` — loss / parameter curves from a training history (matplotlib, Agg).

pyvista prints a harmless "bad X server connection" warning on machines without a display.
Colours: medium dark grey, type 1 red, type 2 light green (the paper's figures), further types from tab10.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError
from .lattice import CellState

__all__ = [
    "DEFAULT_COLOURS",
    "cell_surfaces",
    "load_history",
    "plot_rollout_comparison",
    "plot_training_curves",
    "render_3d_views",
    "render_grid",
    "render_state",
    "render_trajectory",
    "state_rgb",
]

DEFAULT_COLOURS = np.array([
    [25, 25, 30],      # medium
    [220, 40, 40],     # type 1: red
    [204, 255, 11],    # type 2: light green
    [31, 119, 180], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
    [23, 190, 207],
], dtype=np.uint8)
OUTLINE = np.array([0, 0, 0], dtype=np.uint8)


def _colours(n_types: int, colours=None) -> np.ndarray:
    c = DEFAULT_COLOURS if colours is None else np.asarray(colours, dtype=np.uint8)
    if len(c) < n_types + 1:
        extra = np.random.default_rng(0).integers(40, 255, size=(n_types + 1 - len(c), 3)).astype(np.uint8)
        c = np.concatenate([c, extra])
    return c


def _as_state(state) -> CellState:
    if isinstance(state, CellState):
        return state
    a = np.asarray(state)
    if a.ndim >= 3 and a.shape[0] == 2:
        return CellState.from_maps(a[0], a[1])
    raise DataError(f"expected a CellState or a (2, H, W) interchange array, got shape {a.shape}")


def state_rgb(state, *, scale: int = 4, colours=None, outline: bool = True) -> np.ndarray:
    """``(H·scale, W·scale, 3)`` uint8 picture of a 2-D state (see module docstring)."""
    s = _as_state(state)
    if s.ndim != 2:
        raise DataError(f"state_rgb draws 2-D states; got a {s.ndim}-D lattice (use render_state)")
    k = max(1, int(scale))
    cols = _colours(s.n_types, colours)
    up_ids = np.repeat(np.repeat(s.ids, k, 0), k, 1)
    img = cols[np.repeat(np.repeat(s.type_map(), k, 0), k, 1)]
    if outline and k >= 2:
        edge = np.zeros(up_ids.shape, dtype=bool)
        edge[1:, :] |= up_ids[1:, :] != up_ids[:-1, :]
        edge[:, 1:] |= up_ids[:, 1:] != up_ids[:, :-1]
        img = img.copy()
        img[edge] = OUTLINE
    return np.ascontiguousarray(img)


def _clipped_ids(ids: np.ndarray, clip: str | None) -> np.ndarray:
    """``ids`` with the half beyond the middle of axis ``clip`` ("x", "y" or "z") set to medium."""
    if clip is None:
        return ids
    axes = {"z": 0, "y": 1, "x": 2}
    if clip not in axes:
        raise DataError(f"clip must be 'x', 'y', 'z' or None, got {clip!r}")
    a = axes[clip]
    out = ids.copy()
    sl = [slice(None)] * 3
    sl[a] = slice(ids.shape[a] // 2 + ids.shape[a] % 2, None)
    out[tuple(sl)] = 0
    return out


def cell_surfaces(state, *, colours=None, clip: str | None = None, shade: float = 0.3, inset: float = 0.03,
                  seed: int = 0):
    """The surfaces of the cells of a 3-D state as a pyvista ``PolyData`` (one quad per voxel face that borders
    another cell or the medium; the lattice edge counts as medium), with cell data ``"rgb"`` (uint8) and
    ``"id"``.

    Coordinates: voxel ``ids[z, y, x]`` is the unit cube ``[x, x+1] × [y, y+1] × [z, z+1]``. Each face is moved
    ``inset`` voxels into its own cell so that the walls of two touching cells do not coincide. Colours: the
    type colour scaled by a per-cell factor in ``[1 − shade, 1]`` (seeded), so cells of one type stay
    distinguishable. ``clip``: see :func:`_clipped_ids`.
    """
    import pyvista as pv

    s = _as_state(state)
    if s.ndim != 3:
        raise DataError(f"cell_surfaces draws 3-D states; got a {s.ndim}-D lattice")
    ids = _clipped_ids(s.ids, clip)
    cols = _colours(s.n_types, colours).astype(np.float64)
    factor = 1.0 - shade * np.random.default_rng(seed).random(len(s.types))
    pad = np.pad(ids, 1, constant_values=0)
    inner = (slice(1, -1),) * 3
    quads, owner = [], []
    square = np.array([(0, 0), (1, 0), (1, 1), (0, 1)], np.float64)
    for a in range(3):
        b, c = [k for k in range(3) if k != a]
        for sign in (-1, 1):
            sl = list(inner)
            sl[a] = slice(1 + sign, pad.shape[a] - 1 + sign)
            nb = pad[tuple(sl)]
            m = (ids != 0) & (nb != ids)
            pos = np.argwhere(m).astype(np.float64)          # [F, 3] in array order (z, y, x)
            if not len(pos):
                continue
            corners = np.repeat(pos[:, None, :], 4, axis=1)  # [F, 4, 3]
            corners[:, :, a] += (1.0 if sign > 0 else 0.0) - sign * inset
            corners[:, :, b] += square[None, :, 0]
            corners[:, :, c] += square[None, :, 1]
            quads.append(corners[..., ::-1])                   # (x, y, z)
            owner.append(ids[m])
    if not quads:
        return pv.PolyData()
    pts = np.concatenate(quads).reshape(-1, 3)
    owner = np.concatenate(owner)
    nf = len(owner)
    faces = np.column_stack([np.full(nf, 4), np.arange(4 * nf).reshape(nf, 4)]).ravel()
    mesh = pv.PolyData(pts, faces)
    rgb = cols[s.types[owner]] * factor[owner][:, None]
    mesh.cell_data["rgb"] = np.clip(rgb, 0, 255).astype(np.uint8)
    mesh.cell_data["id"] = owner
    return mesh


class _Renderer:
    """One offscreen pyvista plotter reused for many frames of the same lattice shape."""

    def __init__(self, shape, window_size=(512, 512), scale: int = 4, colours=None, outline=True,
                 background="white", style: str = "surfaces", clip: str | None = None):
        import pyvista as pv

        if style not in ("surfaces", "voxels"):
            raise DataError(f"style must be 'surfaces' or 'voxels', got {style!r}")
        self.style = style
        self.clip = clip
        self.pv = pv
        self.shape = tuple(shape)
        self.scale = scale
        self.colours = colours
        self.outline = outline
        self.plotter = pv.Plotter(off_screen=True, window_size=list(window_size))
        self.plotter.set_background(background)
        self.mesh = None
        self.actor = None
        self.text = None

    def _frame_2d(self, s: CellState):
        rgb = state_rgb(s, scale=self.scale, colours=self.colours, outline=self.outline)[::-1]  # y down
        h, w = rgb.shape[:2]
        if self.mesh is None:
            self.mesh = self.pv.ImageData(dimensions=(w + 1, h + 1, 1))
            self.mesh.cell_data["rgb"] = rgb.reshape(-1, 3)
            self.actor = self.plotter.add_mesh(self.mesh, scalars="rgb", rgb=True, show_scalar_bar=False,
                                               lighting=False)
            self.plotter.view_xy()
            self.plotter.enable_parallel_projection()
            self.plotter.camera.tight(padding=0.02)
        else:
            self.mesh.cell_data["rgb"] = rgb.reshape(-1, 3)
            self.mesh.Modified()

    def _frame_3d(self, s: CellState):
        d, h, w = s.shape
        cols = _colours(s.n_types, self.colours)
        grid = self.pv.ImageData(dimensions=(w + 1, h + 1, d + 1))
        if self.style == "surfaces":
            cells = cell_surfaces(s, colours=self.colours, clip=self.clip)
        else:
            # ImageData cell order: x fastest, then y, then z — the row-major order of ids[z, y, x]
            ids = _clipped_ids(s.ids, self.clip)
            grid.cell_data["id"] = ids.ravel()
            grid.cell_data["rgb"] = cols[s.types[ids].ravel()]
            cells = grid.threshold(0.5, scalars="id")
        if self.actor is not None:
            self.plotter.remove_actor(self.actor)
        if cells.n_cells:
            self.actor = self.plotter.add_mesh(cells, scalars="rgb", rgb=True, show_scalar_bar=False,
                                               show_edges=False)
        else:
            self.actor = None
        if self.mesh is None:
            self.mesh = grid
            self.plotter.add_mesh(grid.outline(), color="grey")
            self.plotter.view_isometric()
            self.plotter.camera.zoom(1.1)

    def frame(self, state, title: str | None = None) -> np.ndarray:
        s = _as_state(state)
        if s.shape != self.shape:
            raise DataError(f"frame of shape {s.shape} in a trajectory of shape {self.shape}")
        if s.ndim == 2:
            self._frame_2d(s)
        elif s.ndim == 3:
            self._frame_3d(s)
        else:  # pragma: no cover - CellState admits only 2-D/3-D
            raise DataError(f"cannot render a {s.ndim}-D lattice")
        if self.text is not None:
            self.plotter.remove_actor(self.text)
            self.text = None
        if title:
            colour = "white" if len(self.shape) == 2 else "black"   # 2-D pictures fill the window (dark medium)
            self.text = self.plotter.add_text(title, position="upper_left", font_size=10, color=colour)
        self.plotter.render()
        return np.asarray(self.plotter.screenshot(None, return_img=True))

    def close(self):
        self.plotter.close()


def render_state(state, path=None, *, window_size=(512, 512), scale: int = 4, colours=None, outline: bool = True,
                 title: str | None = None, style: str = "surfaces", clip: str | None = None) -> np.ndarray:
    """Render one state offscreen (2-D or 3-D) and return the RGB image ``(h, w, 3)``; write a PNG if ``path``.

    3-D only: ``style`` ("surfaces" or "voxels") and ``clip`` (None, "x", "y" or "z"; see the module docstring).
    """
    s = _as_state(state)
    r = _Renderer(s.shape, window_size, scale, colours, outline, style=style, clip=clip)
    try:
        img = r.frame(s, title)
    finally:
        r.close()
    if path is not None:
        _write_png(img, path)
    return img


def render_3d_views(state, path=None, *, window_size=(480, 480), colours=None, clip: str = "x",
                    titles=("cells", "clipped: the inside")) -> np.ndarray:
    """A 3-D state twice, side by side: its cell surfaces and the same view with half the lattice clipped
    away along ``clip`` (the inside of an aggregate). Returns the RGB image; writes a PNG if ``path``."""
    s = _as_state(state)
    if s.ndim != 3:
        raise DataError(f"render_3d_views draws 3-D states; got a {s.ndim}-D lattice")
    a = render_state(s, window_size=window_size, colours=colours, title=titles[0] if titles else None)
    b = render_state(s, window_size=window_size, colours=colours, clip=clip, title=titles[1] if titles else None)
    img = np.concatenate([a, b], axis=1)
    if path is not None:
        _write_png(img, path)
    return img


def _write_png(img: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path, optimize=True)
    return path


def render_trajectory(states, path, *, fps: float = 10.0, window_size=(384, 384), scale: int = 4, colours=None,
                      outline: bool = True, titles=None, loop: int = 0, progress: bool = False,
                      style: str = "surfaces", clip: str | None = None) -> Path:
    """Write the frames ``states`` as an animation: ``.gif`` (Pillow) or ``.mp4`` (needs imageio-ffmpeg).

    ``titles``: one caption per frame (e.g. ``"MCS 120"``) or ``None``. 3-D frames: ``style`` and ``clip`` as in
    :func:`render_state`.
    """
    states = [_as_state(s) for s in states]
    if not states:
        raise DataError("render_trajectory: no frames")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise DataError(f"{path}: unsupported animation format {suffix!r} (use .gif or .mp4)")
    if titles is not None and len(titles) != len(states):
        raise DataError(f"{len(titles)} titles for {len(states)} frames")
    r = _Renderer(states[0].shape, window_size, scale, colours, outline, style=style, clip=clip)
    frames = []
    it = enumerate(states)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=len(states), desc="render", unit="frame")
    try:
        for i, s in it:
            frames.append(r.frame(s, None if titles is None else titles[i]))
    finally:
        r.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        from PIL import Image

        ims = [Image.fromarray(f).quantize(colors=64, method=Image.Quantize.MEDIANCUT) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=loop,
                    optimize=True)
    else:
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise DataError(f"{path}: writing MP4 needs 'imageio' and 'imageio-ffmpeg' (pip install "
                            "imageio imageio-ffmpeg); write a .gif instead") from None
        imageio.mimwrite(path, frames, fps=fps)
    return path


def render_grid(states, path, *, ncols: int = 5, titles=None, scale: int = 3, colours=None,
                outline: bool = True, panel_inches: float = 1.6) -> Path:
    """Several 2-D states side by side (matplotlib), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [_as_state(s) for s in states]
    if not states:
        raise DataError("render_grid: no states")
    ncols = max(1, min(ncols, len(states)))
    nrows = -(-len(states) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(panel_inches * ncols, panel_inches * nrows), squeeze=False)
    for i, ax in enumerate(axs.flat):
        ax.axis("off")
        if i < len(states):
            ax.imshow(state_rgb(states[i], scale=scale, colours=colours, outline=outline), interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rollout_comparison(data_states, model_states, data_stats: dict, model_stats: dict, path, *,
                            data_times=None, model_times=None, title: str | None = None, data_label: str = "data",
                            model_label: str = "fitted model", scale: int = 3, colours=None,
                            panel_inches: float = 2.0) -> Path:
    """Data beside model roll-outs, with summary statistics over time, as one PNG (matplotlib, Agg).

    Row 1: ``data_states`` (2-D states, e.g. the final frames of data runs); row 2: ``model_states`` (the
    model's roll-outs from the same starts, same column = same start), drawn with :func:`state_rgb`. Row 3:
    one panel per statistic, mean ± standard deviation over runs against MCS. ``data_stats`` /
    ``model_stats``: ``{name: array (runs, times)}``; ``data_times`` / ``model_times``: the MCS of the
    columns. ``data_times = None`` with one column per statistic draws the data as a constant band (mean ±
    sd over snapshots whose times are unknown).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_states = [_as_state(s) for s in data_states]
    model_states = [_as_state(s) for s in model_states]
    if not data_states or not model_states:
        raise DataError("plot_rollout_comparison: no states")
    names = list(model_stats)
    ncols = max(len(data_states), len(model_states), len(names))
    fig = plt.figure(figsize=(panel_inches * ncols, panel_inches * 3.2))
    grid = fig.add_gridspec(3, ncols, height_ratios=[1, 1, 1.1], hspace=0.35, wspace=0.35)
    for row, (states, label) in enumerate(((data_states, data_label), (model_states, model_label))):
        for j in range(ncols):
            ax = fig.add_subplot(grid[row, j])
            ax.axis("off")
            if j < len(states):
                ax.imshow(state_rgb(states[j], scale=scale, colours=colours), interpolation="nearest")
                if row == 0:
                    ax.set_title(f"start {j + 1}", fontsize=8)
                if j == 0:
                    ax.text(-0.06, 0.5, label, transform=ax.transAxes, rotation=90, ha="right", va="center",
                            fontsize=8)
    mt = np.asarray(model_times if model_times is not None else np.arange(np.asarray(model_stats[names[0]]).shape[1]),
                    dtype=float)
    for j, name in enumerate(names):
        ax = fig.add_subplot(grid[2, j])
        for stats, times, colour, label in ((data_stats, data_times, "tab:blue", data_label.split(" (")[0]),
                                            (model_stats, mt, "tab:red", "model")):
            if name not in stats:
                continue
            v = np.asarray(stats[name], dtype=float)
            if times is None:                 # data of unknown time: a constant band over the model's span
                m, sd = np.nanmean(v), np.nanstd(v)
                ax.axhspan(m - sd, m + sd, color=colour, alpha=0.15)
                ax.axhline(m, color=colour, lw=1.2, label=label)
                continue
            t = np.asarray(times, dtype=float)
            with warnings.catch_warnings():          # a statistic undefined at some time (e.g. no contacts yet)
                warnings.simplefilter("ignore", RuntimeWarning)
                m, sd = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
            ax.fill_between(t, m - sd, m + sd, color=colour, alpha=0.2, lw=0)
            ax.plot(t, m, color=colour, lw=1.2, label=label)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("MCS", fontsize=7)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def load_history(path) -> dict[str, list]:
    """A training history as ``{column: values}`` from JSON (dict of lists or list of records), JSON lines
    or CSV (header row)."""
    path = Path(path)
    text = path.read_text()
    rows = None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            doc = doc.get("history", doc)
        if isinstance(doc, dict):
            return {k: list(v) for k, v in doc.items() if isinstance(v, list)}
        rows = doc
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines and lines[0].lstrip().startswith("{"):
            rows = [json.loads(ln) for ln in lines]
        else:
            import csv
            rows = list(csv.DictReader(lines))
            rows = [{k: _num(v) for k, v in r.items()} for r in rows]
    if not isinstance(rows, list):
        raise DataError("a training history must be a dict of lists or a list of records", path=path)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return {k: [r.get(k, float("nan")) for r in rows] for k in keys}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_training_curves(history, path, *, keys=None, x: str | None = None, title: str | None = None,
                         smooth: int = 1) -> Path:
    """One panel per series of ``history`` (a dict of lists, or a file for :func:`load_history`), PNG.

    ``x``: the column used as abscissa (default: ``"iteration"``/``"step"`` if present, else the index).
    ``smooth``: moving-average window (iterations) drawn over the raw curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(history, dict):
        history = load_history(history)
    if x is None:
        x = next((k for k in ("iteration", "iter", "step") if k in history), None)
    xs = np.asarray(history[x], dtype=float) if x else None
    if keys is None:
        keys = [k for k, v in history.items() if k != x and len(v) and all(isinstance(e, (int, float)) for e in v)]
    if not keys:
        raise DataError("plot_training_curves: no numeric series in the history")
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, k in zip(axs.flat, keys):
        y = np.asarray(history[k], dtype=float)
        xx = xs if xs is not None and len(xs) == len(y) else np.arange(len(y))
        ax.plot(xx, y, lw=0.8, alpha=0.5 if smooth > 1 else 1.0)
        if smooth > 1 and len(y) >= smooth:
            ker = np.ones(smooth) / smooth
            ax.plot(xx[smooth - 1:], np.convolve(y, ker, mode="valid"), lw=1.5)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(x or "index", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axs.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
