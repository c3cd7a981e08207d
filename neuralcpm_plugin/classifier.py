"""Digit classifier on cell-type maps, for the Cellular MNIST classifier score (paper Eq. 7, Table 1).

Architecture (``../shared/SPEC.md`` → Metrics, the authors' reference classifier): one-hot type map
(T+1 channels) → MaxPool 2 → for each width c in ``channels``: [Conv3×3, SiLU, Conv3×3, SiLU, MaxPool 2] with a
residual Conv 2×2/stride 2 from the block input → spatial mean → MLP (``mlp`` widths, SiLU, residual linear
maps) → Linear → ``n_classes`` logits. AdamW (lr 1e-3, weight decay 1e-3), batch 64, 80/10/10 split.

Inputs are per-site type maps ``[B, H, W]`` (integers 0..T) or :class:`~neuralcpm_plugin.lattice.CellState`
objects; any lattice size works (global mean pooling), but score states of the size it was trained on.

Files (no pickle): ``classifier.safetensors`` (weights) + ``classifier.json`` (config, split, accuracies).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import BundleError, DataError

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "load_classifier",
    "predict_proba",
    "save_classifier",
    "train_classifier",
    "type_maps_of",
]

CONFIG_JSON = "classifier.json"
WEIGHTS = "classifier.safetensors"


@dataclass
class ClassifierConfig:
    n_types: int = 2
    n_classes: int = 10
    channels: tuple = (32, 64)
    mlp: tuple = (256, 32)
    first_pool: int = 2

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["mlp"] = list(self.mlp)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClassifierConfig:
        return cls(int(d["n_types"]), int(d["n_classes"]), tuple(int(c) for c in d["channels"]),
                   tuple(int(c) for c in d["mlp"]), int(d.get("first_pool", 2)))


class DigitClassifier(nn.Module):
    """CNN on one-hot type maps → class logits (see module docstring)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c_in = self.config.n_types + 1
        self.pool0 = nn.MaxPool2d(self.config.first_pool) if self.config.first_pool > 1 else nn.Identity()
        self.blocks = nn.ModuleList()
        self.skips = nn.ModuleList()
        ch = c_in
        for c in self.config.channels:
            self.blocks.append(nn.Sequential(nn.Conv2d(ch, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                             nn.SiLU(), nn.MaxPool2d(2)))
            self.skips.append(nn.Conv2d(ch, c, 2, stride=2))
            ch = c
        self.mlp = nn.ModuleList()
        self.mlp_skips = nn.ModuleList()
        for c in self.config.mlp:
            self.mlp.append(nn.Linear(ch, c))
            self.mlp_skips.append(nn.Linear(ch, c))
            ch = c
        self.head = nn.Linear(ch, self.config.n_classes)

    def forward(self, type_maps: torch.Tensor) -> torch.Tensor:
        x = F.one_hot(type_maps.long().clamp(0, self.config.n_types), self.config.n_types + 1)
        x = x.permute(0, 3, 1, 2).float()
        x = self.pool0(x)
        for blk, skip in zip(self.blocks, self.skips):
            y = blk(x)
            s = skip(x)
            x = y + s[..., : y.shape[-2], : y.shape[-1]]
        x = x.mean(dim=(-2, -1))
        for lin, skip in zip(self.mlp, self.mlp_skips):
            x = F.silu(lin(x)) + skip(x)
        return self.head(x)


def type_maps_of(states_or_maps) -> np.ndarray:
    """``[N, H, W]`` int64 type maps from CellStates, an interchange array ``(N, 2, H, W)`` or type maps."""
    if isinstance(states_or_maps, np.ndarray):
        a = states_or_maps
        if a.ndim == 4 and a.shape[1] == 2:
            return a[:, 1].astype(np.int64)
        if a.ndim == 3:
            return a.astype(np.int64)
        raise DataError(f"expected type maps (N, H, W) or data (N, 2, H, W), got shape {a.shape}")
    return np.stack([s.type_map() for s in states_or_maps]).astype(np.int64)


def _split(n: int, seed: int, fractions=(0.8, 0.1, 0.1)):
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = round(fractions[0] * n)
    n_va = round(fractions[1] * n)
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


@torch.no_grad()
def _accuracy(model, x, y, batch=256) -> float:
    if len(x) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train_classifier(states_or_maps, labels, *, steps: int = 700, batch_size: int = 64, lr: float = 1e-3,
                     weight_decay: float = 1e-3, seed: int = 0, config: ClassifierConfig | None = None,
                     augment_flips: bool = False, progress: bool = False, eval_every: int = 50):
    """Train a :class:`DigitClassifier` on labelled states.

    Parameters
    ----------
    states_or_maps : CellStates, ``(N, 2, H, W)`` data or ``(N, H, W)`` type maps.
    labels : ``(N,)`` integer digit labels.
    steps : optimiser steps (the reference code: 676 at batch 64).
    augment_flips : random horizontal/vertical flips are off by default (digits are not flip-symmetric).

    Returns
    -------
    model : DigitClassifier (eval mode, CPU)
    info : dict with ``train_acc``, ``val_acc``, ``test_acc``, ``split`` sizes, ``curve`` (step, loss, val_acc).
    """
    maps = type_maps_of(states_or_maps)
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(y) != len(maps):
        raise DataError(f"{len(maps)} states but {len(y)} labels")
    if len(y) < 3:
        raise DataError(f"need at least 3 labelled states to train a classifier, got {len(y)}")
    torch.manual_seed(seed)
    cfg = config or ClassifierConfig(n_types=int(maps.max()), n_classes=max(10, int(y.max()) + 1))
    model = DigitClassifier(cfg)
    tr, va, te = _split(len(y), seed)
    X = torch.as_tensor(maps)
    Y = torch.as_tensor(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    it = range(int(steps))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="classifier", unit="step")
    tr_t = torch.as_tensor(tr)
    for step in it:
        model.train()
        idx = tr_t[torch.randint(len(tr_t), (min(batch_size, len(tr_t)),), generator=gen)]
        xb = X[idx]
        if augment_flips and torch.rand((), generator=gen) < 0.5:
            xb = xb.flip(-1)
        loss = F.cross_entropy(model(xb), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            curve.append((step + 1, float(loss.detach()), _accuracy(model, X[va], Y[va])))
    model.eval()
    info = {"train_acc": _accuracy(model, X[tr], Y[tr]), "val_acc": _accuracy(model, X[va], Y[va]),
            "test_acc": _accuracy(model, X[te], Y[te]), "split": [len(tr), len(va), len(te)],
            "steps": int(steps), "seed": int(seed), "lattice": list(maps.shape[1:]), "curve": curve}
    return model, info


@torch.no_grad()
def predict_proba(model: DigitClassifier, states_or_maps, batch_size: int = 128) -> np.ndarray:
    """Class probabilities ``(N, n_classes)`` (float64)."""
    maps = type_maps_of(states_or_maps)
    model.eval()
    out = []
    for i in range(0, len(maps), batch_size):
        out.append(torch.softmax(model(torch.as_tensor(maps[i:i + batch_size])).double(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes))


def save_classifier(model: DigitClassifier, path, info: dict | None = None) -> Path:
    """Write ``path/classifier.json`` + ``path/classifier.safetensors``; returns the directory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    doc = {"format": "neuralcpm-digit-classifier", "format_version": 1, "config": model.config.to_json(),
           "info": info or {}}
    (path / CONFIG_JSON).write_text(json.dumps(doc, indent=1))
    return path


def load_classifier(path) -> tuple[DigitClassifier, dict]:
    """Read a directory written by :func:`save_classifier`; returns ``(model, info)``."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        doc = json.loads((path / CONFIG_JSON).read_text())
        if doc.get("format") != "neuralcpm-digit-classifier":
            raise BundleError(f"{path / CONFIG_JSON}: not a digit-classifier file")
        model = DigitClassifier(ClassifierConfig.from_json(doc["config"]))
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except FileNotFoundError as e:
        raise BundleError(f"{path}: missing classifier file ({e.filename})") from None
    except (KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: cannot load the digit classifier: {e}") from None
    model.eval()
    return model, doc.get("info", {})

