"""Datasets: a directory / glob / list of snapshot files of mixed formats, validated together."""

from __future__ import annotations

import numpy as np

from neuralcpm_plugin.io import Dataset, load_dataset, save_npz, save_piff, save_tiff
from neuralcpm_plugin.lattice import CellState


def _states(n, shape=(6, 7), seed=0):
    rng = np.random.default_rng(seed)
    return [CellState(rng.integers(0, 5, size=shape), [0, 1, 2, 2, 1]) for _ in range(n)]


def test_directory_of_mixed_formats(tmp_path):
    a, b, c = _states(3), _states(2, seed=1), _states(1, seed=2)
    save_npz(tmp_path / "01.npz", a)
    save_tiff(tmp_path / "02.tif", b)  # + 02.types.json (a sidecar, not a snapshot)
    save_piff(tmp_path / "03.piff", c[0], ["Medium", "A", "B"])
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.npz").write_bytes(b"ignored")
    ds = load_dataset(tmp_path, shape=(6, 7), types=None)
    assert isinstance(ds, Dataset)
    assert [f.name for f in ds.files] == ["01.npz", "02.tif", "03.piff"]
    assert len(ds) == 6 and ds.shape == (6, 7) and ds.n_types == 2
    assert all(x == y for x, y in zip(ds, a + b + c))
    assert ds[3] == b[0] and ds[3].meta["frame"] == 0 and ds[3].meta["path"].endswith("02.tif")
    assert [len(t) for t in ds.trajectories().values()] == [3, 2, 1]
    np.testing.assert_array_equal(ds.to_channels()[4], b[1].to_channels())


def test_glob_recursive_and_list(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2" / "deep").mkdir(parents=True)
    save_npz(tmp_path / "run1" / "x.npz", _states(2))
    save_npz(tmp_path / "run2" / "deep" / "y.npz", _states(1))
    save_npz(tmp_path / "run2" / "z.npz", _states(1))
    assert len(load_dataset(str(tmp_path / "*" / "*.npz"))) == 3
    ds = load_dataset(str(tmp_path / "**" / "*.npz"))
    assert [f.name for f in ds.files] == ["x.npz", "y.npz", "z.npz"] and len(ds) == 4
    assert len(load_dataset([tmp_path / "run2" / "z.npz"])) == 1
    assert len(load_dataset(tmp_path / "run1" / "x.npz")) == 2  # a single file


def test_dataset_types_for_label_images(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.array([[0, 1], [2, 2]], np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.array([[1, 1], [0, 3]], np.uint16))
    ds = load_dataset(tmp_path, types={1: 1, 2: 2, 3: 1})
    assert len(ds) == 2 and ds[1].types[3] == 1
    ds = load_dataset(tmp_path, types=1)  # one type for every cell
    assert ds.n_types == 1
