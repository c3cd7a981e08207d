"""Atomic training checkpoints without pickle: ``state.safetensors`` (tensors) + ``state.json`` (the rest).

A checkpoint is a directory written into a temporary sibling and renamed into place, so a crash or a
SIGKILL during the write leaves the previous checkpoint intact. Everything needed to continue a run
*bitwise* is stored: model parameters and buffers, the optimiser's moments and step counts, the EMA weights,
the persistent chains, every RNG state (torch generators as their uint8 state tensors), the iteration and the
learning rate. ``torch.save`` is never used (it pickles).

Helpers convert an optimiser to tensors + JSON and back (:func:`optimizer_to_tensors`,
:func:`optimizer_from_tensors`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neuralcpm_plugin._fsutil import make_temp_dir
from neuralcpm_plugin.errors import ConfigError

__all__ = [
    "CHECKPOINT_JSON",
    "CHECKPOINT_TENSORS",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "save_checkpoint",
]

CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_JSON = "state.json"
FORMAT = "neuralcpm-checkpoint"
VERSION = 1


def _replace_dir(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(dest.name + f".old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) as the checkpoint directory ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)     # umask permissions; stale temporaries of killed writes removed
    try:
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(flat, str(tmp / CHECKPOINT_TENSORS), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "version": VERSION, **meta}
        with open(tmp / CHECKPOINT_JSON, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint directory; return ``(tensors, meta)``."""
    path = Path(path)
    jp, tp = path / CHECKPOINT_JSON, path / CHECKPOINT_TENSORS
    if not jp.is_file() or not tp.is_file():
        raise ConfigError(f"{path}: no checkpoint there (expected {CHECKPOINT_JSON} and {CHECKPOINT_TENSORS})")
    try:
        meta = json.loads(jp.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{jp}: corrupt checkpoint JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{jp}: not a version-{VERSION} {FORMAT} file")
    try:
        tensors = load_file(str(tp), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise ConfigError(f"{tp}: corrupt checkpoint tensors ({e})") from None
    return tensors, meta


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict, dict]:
    """An optimiser's state as ``(tensors, json_meta)``; parameters are numbered in group order."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{idx}.{k}"] = v
            else:
                tensors[f"{prefix}{idx}.{k}"] = torch.tensor(float(v), dtype=torch.float64)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "opt.") -> None:
    """Restore what :func:`optimizer_to_tensors` wrote."""
    sd = opt.state_dict()
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, name = key[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g_old, g_new in zip(sd["param_groups"], meta["param_groups"]):
        g = dict(g_new)
        g["params"] = g_old["params"]
        for k, v in g_old.items():
            if isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
