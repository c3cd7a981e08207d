"""The digit classifier on type maps: learns a separable toy task, saves/loads without pickle, scores."""

import numpy as np
import pytest

from neuralcpm_plugin.classifier import (
    ClassifierConfig,
    DigitClassifier,
    load_classifier,
    predict_proba,
    save_classifier,
    train_classifier,
    type_maps_of,
)
from neuralcpm_plugin.errors import BundleError, DataError
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.paper import classifier_score


def _toy(n=90, seed=0):
    """3 classes: a type-2 block in the left, right or top part of a 16×16 map, type-1 noise elsewhere."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, 16, 16), np.int64)
    labels = np.arange(n) % 3
    for i, y in enumerate(labels):
        maps[i][rng.random((16, 16)) < 0.1] = 1
        oy, ox = rng.integers(0, 3, 2)
        if y == 0:
            maps[i, 5 + oy:10 + oy, ox:4 + ox] = 2
        elif y == 1:
            maps[i, 5 + oy:10 + oy, 12 - ox:16 - ox] = 2
        else:
            maps[i, oy:4 + oy, 5 + ox:10 + ox] = 2
    return maps, labels


@pytest.fixture
def one_thread():
    """One torch thread: small models train much faster on a busy machine than with spinning worker threads."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_classifier_learns_and_roundtrips(tmp_path, one_thread):
    maps, labels = _toy()
    model, info = train_classifier(maps, labels, steps=120, batch_size=32, seed=1,
                                   config=ClassifierConfig(n_types=2, n_classes=10, channels=(8, 16), mlp=(32, 16)))
    assert info["split"] == [72, 9, 9]
    assert info["train_acc"] > 0.9
    p = predict_proba(model, maps)
    assert p.shape == (90, 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert classifier_score(p) > 2.0       # three distinct, confidently predicted classes
    d = save_classifier(model, tmp_path / "clf", info)
    assert (d / "classifier.safetensors").exists() and (d / "classifier.json").exists()
    model2, info2 = load_classifier(d)
    np.testing.assert_allclose(predict_proba(model2, maps), p, atol=1e-6)
    assert info2["train_acc"] == info["train_acc"]


def test_type_maps_from_states_and_arrays():
    ids = np.zeros((6, 6), np.int32)
    ids[1:3, 1:3] = 1
    ids[4, 4] = 2
    s = CellState(ids, np.array([0, 2, 1], np.int32))
    m = type_maps_of([s, s])
    assert m.shape == (2, 6, 6) and m[0, 1, 1] == 2 and m[0, 4, 4] == 1
    data = np.stack([s.to_channels()] * 3)
    assert np.array_equal(type_maps_of(data), np.stack([s.type_map()] * 3))
    with pytest.raises(DataError):
        type_maps_of(np.zeros((2, 3, 4, 5)))


def test_any_lattice_size_forward():
    model = DigitClassifier(ClassifierConfig(channels=(4, 8), mlp=(8,)))
    for shape in [(3, 24, 24), (2, 50, 38)]:
        import torch
        out = model(torch.zeros(shape, dtype=torch.long))
        assert out.shape == (shape[0], 10)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(BundleError):
        load_classifier(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "classifier.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError):
        load_classifier(tmp_path / "bad")


def test_train_rejects_mismatch():
    with pytest.raises(DataError):
        train_classifier(np.zeros((4, 8, 8), np.int64), [0, 1, 2])
