"""`python -m training.fit` — learn a CPM Hamiltonian from snapshots; write the bundle and the exports.

Without arguments it runs the embedded default (``training/presets/default.toml``): generate a small
cell-sorting data set with the exact sampler, fit the analytic Hamiltonian (contact + volume) with the
proposal-aware pseudo-likelihood, write the bundle, the CompuCell3D project and the Morpheus model into
``runs/default/`` and print how to run them.

Objectives: ``--objective pl`` (proposal-aware pseudo-likelihood, SPEC.md; convex for analytic models,
stochastic for neural ones) or ``--objective pcd`` (the paper's persistent contrastive divergence, with
checkpoints, ``--resume``, divergence guard, and scale-out under ``torchrun --nproc_per_node=K``).

Run folder (``--out``, default ``runs/<name>``): ``model/`` (bundle), ``config.toml`` (the full
configuration used), ``data.npz`` (generated data, if any), ``truth.json`` (true parameters, when known),
``metrics.csv`` + ``training.png`` + ``checkpoint/`` (pcd), ``cc3d/``, ``morpheus/``, ``overview.png`` (data beside
roll-outs of the fitted model, :mod:`training.overview`), ``train.log`` (every line printed, time-stamped, from the
start; pcd adds a status line every 30 s), ``summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuralcpm_plugin.cli import command
from neuralcpm_plugin.errors import ConfigError, DataError, NeuralCPMError

from .config import ANALYTIC_KINDS, MODEL_KINDS, OBJECTIVES, list_presets, load_config, to_toml

__all__ = ["build_model", "build_parser", "fit", "load_training_data", "main"]

_NEURAL_KIND = {"nh": "nh", "nh-closure": "nh", "local-nh": "local_nh", "local-nh-closure": "local_nh",
                "pooled-nh": "pooled_nh", "pooled-closure": "pooled_nh", "local-pooled-closure": "local_nh",
                "cnn": "cnn", "nh1-cnn": "nh1_cnn"}


_LOG_FILE: Path | None = None   # RUN/train.log of the running fit(): _say copies every line into it


def _say(msg: str = "") -> None:
    """Print (rank 0) and append, time-stamped, to the running job's ``train.log``."""
    if _rank() == 0:
        _print(msg)
        _to_log_file(msg)


def _print(msg: str = "") -> None:
    if _rank() == 0:
        print(msg, flush=True)


_LOG_PENDING: list[str] | None = None   # lines held back until --resume is known to continue this run


def _to_log_file(msg: str) -> None:
    line = time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n"
    if _LOG_PENDING is not None:
        _LOG_PENDING.append(line)
    else:
        _append_raw(line)


def _log_to(path: Path | None, *, defer: bool = False) -> None:
    """Copy _say's lines into ``path``; ``defer``: hold them back until :func:`_log_flush` (a refused --resume
    leaves the run's train.log untouched)."""
    global _LOG_FILE, _LOG_PENDING
    _LOG_FILE = path
    _LOG_PENDING = [] if defer else None


def _log_flush() -> None:
    global _LOG_PENDING
    pending, _LOG_PENDING = _LOG_PENDING, None
    for line in pending or []:
        _append_raw(line)


def _append_raw(line: str) -> None:
    if _LOG_FILE is not None:
        try:
            with open(_LOG_FILE, "a") as f:
                f.write(line)
        except OSError:          # the run folder went away (a failed run is cleaned up): the console has it
            pass


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Learn a Cellular Potts Hamiltonian from snapshots (NeuralCPM). Without arguments: generate a "
                    "small cell-sorting data set, fit it, and export to CompuCell3D and Morpheus in runs/default/.")
    p.add_argument("--config", help=f"preset name ({', '.join(list_presets())}) or a TOML file")
    p.add_argument("--data", help="snapshot file (.npz, .tif, ...) or directory / glob of them")
    p.add_argument("--frames", help="which frames of each file: auto | all | final | last:N (default auto: the final "
                                    "frame of each recorded time series, every frame of other files)")
    p.add_argument("--dim", type=int, choices=[2, 3], help="lattice dimension of TIFF data: 2 = a stack is a time "
                   "series (default), 3 = a stack is one 3-D volume (npz, PIFF, cellpose carry their dimension)")
    p.add_argument("--model", choices=MODEL_KINDS, help="model kind (default: analytic)")
    p.add_argument("--objective", choices=OBJECTIVES, help="pl (pseudo-likelihood) or pcd (paper)")
    p.add_argument("--prior", help="model bundle (run_dir/model), Morpheus .xml or CompuCell3D .cc3d model: the "
                   "analytic part (initial values)")
    p.add_argument("--freeze-prior", action="store_true", help="keep the prior's parameters fixed")
    p.add_argument("--init", help="model bundle (run_dir/model) of the same model kind and architecture: every "
                   "parameter starts at its values (fine-tuning; give the same --prior as that model's run)")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a pcd run from its last checkpoint, exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the run folder")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--iterations", type=int, help="pcd iterations (or stochastic pl steps)")
    p.add_argument("--truth", help="true parameters for the report: a bundle, a JSON file ({\"J(1,0)\": 0.6, ..., "
                                   "\"lambda\": 0.5} or {J, lambda}), a Morpheus/CC3D model, or P1 | P2 | cellsort-a | "
                                   "cellsort-b")
    p.add_argument("--threads", type=int, help="CPU threads for torch, BLAS and numba (default: torch and "
                   "numba use the available CPUs, BLAS 1; see neuralcpm_plugin.threads)")
    p.add_argument("--no-export", action="store_true", help="do not write the CC3D / Morpheus exports")
    p.add_argument("--no-figure", action="store_true", help="do not write overview.png (data beside model roll-outs)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a one-line status every 30 s instead (also in RUN/train.log)")
    return p


def _overrides(args) -> dict:
    o: dict = {}

    def put(section, key, val):
        if val is not None:
            (o.setdefault(section, {}) if section else o)[key] = val

    put("data", "path", args.data)
    put("data", "frames", args.frames)
    put("data", "ndim", args.dim)
    put("model", "kind", args.model)
    put("objective", "name", args.objective)
    put("model", "prior", args.prior)
    put("model", "init", args.init)
    if args.freeze_prior:
        put("model", "freeze_prior", True)
    put(None, "out", args.out)
    put(None, "device", args.device)
    put(None, "seed", args.seed)
    put(None, "threads", args.threads)
    if args.iterations is not None:
        put("pcd", "iterations", args.iterations)
        put("pl", "steps", args.iterations)
    if args.no_export:
        o["export"] = {"cc3d": False, "morpheus": False}
    if args.no_figure:
        o.setdefault("export", {})["figure"] = False
    return o


# ------------------------------------------------------------------------------------------------ data
def _select_frames(states, frames: str):
    if frames == "all":
        return list(states)
    if frames == "auto":
        from .diagnostics import auto_frames
        kept, note = auto_frames(states)
        if note:
            _say(note)
        return kept
    by_file: dict = {}
    for s in states:
        by_file.setdefault(s.meta.get("path"), []).append(s)
    n = 1 if frames == "final" else int(frames.split(":")[1])
    return [s for group in by_file.values() for s in group[-n:]]


def data_hash(states) -> str:
    """sha256 over the interchange arrays of the training states (provenance)."""
    h = hashlib.sha256()
    for s in states:
        h.update(np.asarray(s.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(s.ids, np.int32).tobytes())
        h.update(np.ascontiguousarray(s.types, np.int32).tobytes())
    return h.hexdigest()


def _npz_meta(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" in z.files:
                return json.loads(bytes(z["meta"].astype(np.uint8)).decode())
    except Exception:  # noqa: BLE001 - metadata is optional
        return {}
    return {}


def _generate(cfg: dict, run_dir: Path, progress: bool = True):
    g = cfg["generate"]
    name = g["dataset"]
    modname = f"training.gen_{name}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        raise ConfigError(f"unknown generate.dataset {name!r} (no {modname}); give training data with --data PATH") from None
    fn = getattr(mod, f"generate_{name}", None)
    if fn is None:
        raise ConfigError(f"{modname} has no generate_{name}() function")
    out = Path(g["cache"]) if g["cache"] else run_dir / "data.npz"
    opts = dict(g["options"])
    sig = inspect.signature(fn)
    params = sig.parameters
    has_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in opts if k not in params and not has_kw]
    if unknown:
        raise ConfigError(f"generate.options: {modname}.generate_{name}() has no option(s) {unknown}; its options: "
                          f"{', '.join(k for k in params if k != 'out')}")
    if "seed" in params and "seed" not in opts:
        opts["seed"] = cfg["seed"]
    if "progress" in params and "progress" not in opts:
        opts["progress"] = bool(progress)
    if out.exists() and g["cache"]:
        _say(f"data: using the cached {out}")
        return out, None
    _say(f"data: generating with {modname}.generate_{name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})")
    t0 = time.perf_counter()
    report: dict = {}
    if "report" in params and "report" not in opts:
        opts["report"] = report
    res = fn(out, **opts) if "out" in params else fn(**opts)
    _say(f"data: generated in {time.perf_counter() - t0:.1f} s")
    truth_ham = None
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], (list, tuple)):
        res, truth_ham = res          # (states, the Hamiltonian that made them)
        saver = getattr(mod, f"save_{name}", None)
        if saver is not None and report:
            # the generator's own file format: true parameters and per-snapshot seeds (the overview figure
            # replays runs from them)
            sp = inspect.signature(saver).parameters
            kw = {k: opts[k] if k in opts else params[k].default for k in sp
                  if k not in ("path", "states", "hamiltonian", "report") and (k in opts or (
                      k in params and params[k].default is not params[k].empty))}
            if all(k in kw or k == "report" for k, p in sp.items()
                   if p.kind == p.KEYWORD_ONLY and p.default is p.empty):
                return Path(saver(out, list(res), truth_ham, report=report, **kw)), truth_ham
    if isinstance(res, (str, os.PathLike)):
        return Path(res), truth_ham
    if isinstance(res, (list, tuple)) and res and hasattr(res[0], "ids"):
        from neuralcpm_plugin.io.npz import save_npz
        return save_npz(out, list(res)), truth_ham
    if hasattr(res, "path"):
        return Path(res.path), truth_ham
    return out, truth_ham


def load_training_data(cfg: dict, run_dir: Path, *, progress: bool = True):
    """The training states (validated, one lattice shape) and a description of where they came from."""
    from neuralcpm_plugin.io import load_dataset
    path = cfg["data"]["path"]
    generated = not path
    truth_ham = None
    if generated:
        path, truth_ham = _generate(cfg, run_dir, progress)
    else:
        p = Path(path)
        if not p.exists() and not any(c in str(path) for c in "*?["):
            hint = ""
            if cfg["name"] in ("mnist", "mnist-cpu", "bipolar", "bipolar-cpu"):
                base = cfg["name"].split("-")[0]
                scale = "cpu" if cfg["name"].endswith("-cpu") else "paper"
                hint = f" (make it with: python -m training.generate {base} --scale {scale} --out {shlex.quote(str(path))})"
            raise DataError(f"training data not found{hint}", path=path)
    ds = load_dataset(path, ndim=cfg["data"]["ndim"])
    states = _select_frames(ds.states, cfg["data"]["frames"])
    if cfg["data"]["max_states"]:
        states = states[: cfg["data"]["max_states"]]
    if not states:
        raise DataError("empty dataset: no frames selected", path=path)
    shapes = {s.shape for s in states}
    if len(shapes) > 1:
        raise DataError(f"mixed lattice sizes in the training data: {sorted(shapes)}", path=path)
    if len(states[0].shape) not in (2, 3):
        raise DataError(f"training needs 2-D or 3-D lattices, got shape {states[0].shape}", path=path)
    if len(states[0].shape) == 3 and cfg["model"]["kind"] != "analytic":
        raise ConfigError(f"model kind {cfg['model']['kind']!r} is 2-D only (the neural terms use 2-D "
                          f"convolutions); the training data are 3-D (shape {states[0].shape}): use --model analytic")
    n_cells = [len(s.cell_ids()) for s in states]
    if min(n_cells) == 0:
        bad = n_cells.index(0)
        raise DataError("a training state holds no cell", path=states[bad].meta.get("path"),
                        frame=states[bad].meta.get("frame"))
    files = sorted({str(s.meta.get("path")) for s in states})
    meta = _npz_meta(files[0]) if len(files) == 1 and files[0].endswith(".npz") else {}
    info = {"path": str(path), "generated": generated, "files": files, "meta": meta}
    if truth_ham is not None:
        info["truth_hamiltonian"] = truth_ham
    return states, info


# ------------------------------------------------------------------------------------------------ truth
def _truth_from(spec: str | None, data_info: dict) -> dict | None:
    from neuralcpm_plugin.metrics.params import KNOWN_TRUTHS, param_names, param_vector, truth_from_source
    if spec:
        try:
            return truth_from_source(spec)
        except NeuralCPMError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ConfigError(f"--truth {spec}: {e}") from None
    th = data_info.get("truth_hamiltonian")
    if th is not None:
        try:
            v = param_vector(th)
            return {"vector": v.tolist(), "names": param_names(th.term("contact").n_types),
                    "source": f"the generator's Hamiltonian ({data_info['path']})"}
        except (ValueError, AttributeError):
            pass
    meta = data_info.get("meta") or {}
    pp = meta.get("params_paper_scale") or meta.get("params")
    if isinstance(pp, dict) and ("J" in pp or "J_pairs" in pp):
        try:
            return truth_from_source(pp, scaling="paper" if "params_paper_scale" in meta else "per_pair",
                                     source=f"generator metadata of {data_info['path']}")
        except (KeyError, ValueError, TypeError):
            return None
    for key in KNOWN_TRUTHS:
        if key.startswith("P") and any(f"{key}_" in f for f in data_info.get("files", [])):
            return truth_from_source(key)
    return None


# ------------------------------------------------------------------------------------------------ model
def _load_prior(path: str):
    """The Hamiltonian of a prior: a model bundle (directory or its model.json), a Morpheus model (.xml,
    .xml.gz) or a CompuCell3D project (.cc3d), with learnable parameters (``build_model`` freezes them for
    ``freeze_prior`` and uses only the analytic terms)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: prior model not found")
    if p.is_dir() or p.name == "model.json":
        from neuralcpm_plugin.bundle import load_bundle
        return load_bundle(p).hamiltonian
    suffix = "".join(p.suffixes[-2:]).lower() if p.name.lower().endswith(".xml.gz") else p.suffix.lower()
    if suffix in (".xml", ".xml.gz"):
        from morpheus_xml import load_model
        return load_model(p).hamiltonian              # terms rebuilt from their specs: learnable
    if suffix == ".cc3d":
        from cc3d_steppables import load_model
        return load_model(p, learnable=True).hamiltonian
    raise ConfigError(f"{path}: a prior must be a model bundle (directory), a Morpheus model (.xml) or a "
                      "CompuCell3D project (.cc3d)")


def build_model(cfg: dict, states, *, seed: int = 0):
    """The Hamiltonian to train, from the ``[model]`` section and the data (type count, V*, lattice)."""
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec, term_class
    m = cfg["model"]
    kind = m["kind"]
    n_types = max(s.n_types for s in states)
    shape = states[0].shape
    lattice = LatticeSpec(tuple(shape), True, int(m["copy_order"]), int(m["contact_order"]))
    vols = np.concatenate([s.volumes()[s.cell_ids()] for s in states])
    v_star = float(m["target_volume"]) if m["target_volume"] > 0 else float(vols.mean())
    type_names = ["medium"] + [f"type{i}" for i in range(1, n_types + 1)]
    analytic_terms = []
    needs_analytic = kind in ANALYTIC_KINDS
    if m["prior"]:
        prior = _load_prior(m["prior"])
        pt = prior.n_types if getattr(prior, "type_names", None) else None
        if pt is not None and pt != n_types:
            raise ConfigError(f"the prior {m['prior']} has {pt} cell types ({', '.join(prior.type_names[1:])}), "
                              f"the training data {n_types}: model and data are incompatible")
        if prior.type_names:
            type_names = list(prior.type_names)
        analytic_terms = [t for t in prior.terms if t.analytic]
        if m["freeze_prior"]:
            for t in analytic_terms:
                for p in t.parameters():
                    p.requires_grad_(False)
        lattice = LatticeSpec(tuple(shape), prior.lattice.periodic, prior.lattice.copy_order,
                              prior.lattice.contact_order)
        if not needs_analytic:
            raise ConfigError(f"--prior gives the analytic part; model kind {kind!r} has none (use "
                              f"{', '.join(ANALYTIC_KINDS)})")
    elif needs_analytic:
        from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
        J = np.full((n_types + 1, n_types + 1), float(m["init_J"]))
        J[0, 0] = 0.0
        lam = [0.0] + [float(m["init_lambda"])] * n_types
        tgt = [0.0] + [v_star] * n_types
        analytic_terms = [ContactEnergy(J, lattice.contact_order, periodic=True),
                          VolumeConstraint(lam, tgt, learnable=True, learn_target=False, periodic=True)]
    if m["external_field"]:
        from neuralcpm_plugin.hamiltonian.analytic import ExternalPotential
        # μ starts antisymmetric between the first two types so that the field gets a gradient from the start
        mu = [0.0] + [(-0.5 if t == 1 else 0.5) for t in range(1, n_types + 1)]
        analytic_terms = list(analytic_terms) + [ExternalPotential(mu, np.zeros(tuple(shape)), learn_field=True,
                                                                   periodic=True)]
    vol = next((t for t in analytic_terms if t.kind == "volume"), None)
    v_note = "data mean" if not m["prior"] else "from the prior"
    if m["learn_target_volume"]:
        if vol is None or (m["prior"] and m["freeze_prior"]):
            raise ConfigError("model.learn_target_volume needs a learnable volume term (an analytic part; not "
                              "with --freeze-prior)")
        vol.target = torch.nn.Parameter(vol.target.detach().clone())   # replaces the fixed buffer
        v_note += ", then learned"
    if m["prior"] and vol is not None:
        v_star = float(np.mean(vol.spec()["params"]["target"][1:]))
    info = {"V*": v_star, "V*_source": v_note}
    if kind == "analytic":
        return Hamiltonian(analytic_terms, lattice, float(m["temperature"]), type_names), info
    if "pooled" in kind:
        pooled = _pooled_term(m, n_types, shape, seed)
        if kind == "pooled-nh":
            return Hamiltonian([pooled], lattice, float(m["temperature"]), type_names), info
    cls = term_class(_NEURAL_KIND[kind])
    ncfg = dict(m["neural"])
    preset = ncfg.pop("preset", None)
    ncfg.setdefault("n_types", n_types)
    if int(ncfg["n_types"]) != n_types:
        raise ConfigError(f"model.neural.n_types = {ncfg['n_types']}, but the training data has {n_types} cell types")
    if kind == "pooled-closure":
        neural = pooled
    else:
        try:
            neural = cls(ncfg, preset=preset, seed=seed) if preset is not None else cls(ncfg, seed=seed)
        except TypeError:
            neural = cls(ncfg)
    if not kind.endswith("closure"):
        return Hamiltonian([neural], lattice, float(m["temperature"]), type_names), info
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    # with a prior the analytic part starts at the prior's values: w_a = 1 (w_a stays learnable)
    w_a = 1.0 if m["prior"] else float(m["w_a"])
    if kind == "local-pooled-closure":
        groups, weights = {"w_l": [neural], "w_g": [pooled]}, {"w_l": float(m["w_l"]), "w_g": float(m["w_g"])}
    else:
        groups, weights = [neural], None
    ham = closure_hamiltonian(analytic_terms, groups, lattice, float(m["temperature"]), type_names,
                              w_a=w_a, w_n=float(m["w_n"]), weights=weights)
    return ham, info


def init_parameters(ham, path: str) -> None:
    """Set every parameter and buffer of ``ham`` from the model bundle ``path`` (``model.init``, ``--init``).

    The bundle must hold the same terms (kinds, in order) with the same architecture; anything else is a
    :class:`ConfigError` naming the bundle and the mismatch."""
    from neuralcpm_plugin.bundle import load_bundle
    p = Path(path)
    if not (p.is_dir() or p.name == "model.json") or not p.exists():
        raise ConfigError(f"{path}: model.init must be a model bundle (a run's model/ folder)")
    src = load_bundle(p).hamiltonian
    kinds, src_kinds = [t.kind for t in ham.terms], [t.kind for t in src.terms]
    if kinds != src_kinds:
        raise ConfigError(f"{path}: model.init has the terms {', '.join(src_kinds)}, the model to train "
                          f"{', '.join(kinds)}: use a bundle of the same model kind")
    try:
        ham.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: model.init does not fit the model's architecture: "
                          f"{str(e).splitlines()[0]}") from None


def _pooled_term(m: dict, n_types: int, shape, seed: int):
    """The pooled NH of a pooled model kind: config from model.pooled (or model.neural for pooled-nh /
    pooled-closure); the lattice shape of its position embedding from the data."""
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    where = "model.pooled" if m["pooled"] or m["kind"] == "local-pooled-closure" else "model.neural"
    pcfg = dict(m["pooled"] if where == "model.pooled" else m["neural"])
    pcfg.setdefault("n_types", n_types)
    if int(pcfg["n_types"]) != n_types:
        raise ConfigError(f"{where}.n_types = {pcfg['n_types']}, but the training data has {n_types} cell types")
    pcfg.setdefault("lattice_shape", [int(x) for x in shape])
    try:
        return PooledNeuralHamiltonian(pcfg, seed=seed + 1)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_identifiable(states, cfg: dict) -> tuple[list[str], set[str]]:
    """What the training data cannot tell: ``(warnings, names of unidentified analytic parameters)``.

    Raises :class:`DataError` for data no model can be fitted to: a lattice side not larger than twice the
    reach of the copy/contact neighbourhood (on the torus a site would neighbour itself; the bound is in the
    message), or no boundary site at all (no copy attempt could change anything). Warns about a single
    training state, identical states, cell types that never occur (their J and λ are not learned) and type
    pairs that never touch (their J is not learned): those parameters keep their initial values and are not
    reported as learned.
    """
    from neuralcpm_plugin.lattice import boundary_mask, half_offsets
    m = cfg["model"]
    order = max(int(m["copy_order"]), int(m["contact_order"]))
    shape = tuple(states[0].shape)
    reach = int(np.abs(half_offsets(order, len(shape))).max())
    if min(shape) <= 2 * reach:
        raise DataError(f"the lattice {'x'.join(map(str, shape))} is too small for neighbourhood order {order}: "
                        f"each side must be at least {2 * reach + 1} sites", path=states[0].meta.get("path"))
    n_boundary = sum(int(boundary_mask(s.ids, int(m["copy_order"]), True).sum()) for s in states)
    if n_boundary == 0:
        raise DataError("no boundary site in any training state (every neighbourhood lies inside one cell): no "
                        "copy attempt can change a state, so the data say nothing about the energy",
                        path=states[0].meta.get("path"))
    warns: list[str] = []
    if len(states) == 1:
        warns.append("only 1 training state: estimates from one snapshot are noisy and cannot be checked across "
                     "snapshots; give more snapshots")
    elif len({data_hash([s]) for s in states}) == 1:
        warns.append(f"all {len(states)} training states are identical: the data hold one configuration only")
    n_types = max(s.n_types for s in states)
    seen = np.zeros(n_types + 1, bool)
    touch = np.zeros((n_types + 1, n_types + 1), bool)
    offs = half_offsets(int(m["contact_order"]), len(shape))
    for s in states:
        cells = s.cell_ids()
        types = np.asarray(s.types)
        seen[np.unique(types[cells])] = True
        tmap = types[s.ids]
        for off in offs:
            other = np.roll(s.ids, tuple(-int(o) for o in off), axis=tuple(range(len(shape))))
            diff = other != s.ids
            a, b = tmap[diff], types[other[diff]]
            touch[a, b] = True
            touch[b, a] = True
    unidentified: set[str] = set()
    absent = [t for t in range(1, n_types + 1) if not seen[t]]
    if absent:
        warns.append(f"cell type(s) {absent} never occur in the training data: their parameters are not learned "
                     "(they keep their initial values and are not reported)")
        for t in absent:
            unidentified |= {f"J({min(t, u)},{max(t, u)})" if u else f"J({t},0)" for u in range(n_types + 1)}
            unidentified |= {f"J({max(t, u)},{min(t, u)})" for u in range(1, n_types + 1)}
    pairs = [(a, b) for a in range(1, n_types + 1) for b in range(a + 1)
             if seen[a] and (b == 0 or seen[b]) and not touch[a, b]]
    if pairs:
        names = [f"J({b},{a})" if b else f"J({a},0)" for a, b in pairs]
        warns.append(f"no contact in the training data between the types of {', '.join(names)}: these are not "
                     "learned (they keep their initial values and are not reported)")
        unidentified |= set(names)
    if absent and not m["share_lambda"]:
        unidentified |= {f"lambda({t})" for t in absent}
    if absent and len(absent) == n_types:
        unidentified.add("lambda")
    return warns, unidentified


def _check_compatible(ham, states):
    n_types = max(s.n_types for s in states)
    if ham.type_names and ham.n_types < n_types:
        raise ConfigError(f"the model has {ham.n_types} cell types, the training data {n_types}: incompatible")
    for t in ham.terms:
        nt = getattr(t, "n_types", None)
        if isinstance(nt, int) and nt < n_types:
            raise ConfigError(f"term {t.kind!r} covers {nt} cell types, the training data has {n_types}")


# ------------------------------------------------------------------------------------------------ exports
def _export(run_dir: Path, bundle_dir: Path, cfg: dict, init_state) -> list[str]:
    lines = []
    if cfg["export"]["cc3d"]:
        try:
            mod = importlib.import_module("cc3d_steppables.export")
            fn = getattr(mod, "export_project", None) or getattr(mod, "export", None)
        except ModuleNotFoundError:
            fn = None
        if fn is None:
            lines.append("CC3D export: not available in this version of the package yet (cc3d_steppables.export)")
        else:
            try:
                res = fn(bundle_dir, run_dir / "cc3d", init=init_state, quiet=True)
                summary = res.summary() if hasattr(res, "summary") else f"CC3D project in {run_dir / 'cc3d'}"
                lines.append(summary)
            except NeuralCPMError as e:
                lines.append(f"CC3D export failed: {e}")
    if cfg["export"]["morpheus"]:
        fn = None
        try:
            mod = importlib.import_module("morpheus_xml.export")
            fn = next((getattr(mod, n) for n in ("export_model", "export", "export_bundle") if hasattr(mod, n)),
                      None)
        except ModuleNotFoundError:
            pass
        if fn is None:
            lines.append("Morpheus export: not available in this version of the package yet (morpheus_xml.export)")
        else:
            out = run_dir / "morpheus" / "model.xml"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                params = inspect.signature(fn).parameters
                kw = {}
                if "init" in params:
                    kw["init"] = init_state
                if "quiet" in params:
                    kw["quiet"] = True
                res = fn(bundle_dir, out, **kw)
                path = getattr(res, "path", None) or getattr(res, "model", None) or (
                    res if isinstance(res, (str, os.PathLike)) else out)
                summary = res.summary() if hasattr(res, "summary") else f"Morpheus model: {path}"
                lines.append(summary)   # ends with the command lines that run it (morpheus_xml.export)
            except NeuralCPMError as e:
                lines.append(f"Morpheus export failed: {e}")
    return lines


# ------------------------------------------------------------------------------------------------ params
def param_columns(ham) -> dict:
    """Analytic parameters for the metrics CSV (per-pair units), when the model has contact + volume."""
    from neuralcpm_plugin.metrics.params import param_names, param_vector
    if ham.term("contact") is None or ham.term("volume") is None:
        out = {}
    else:
        n = ham.term("contact").n_types
        out = dict(zip(param_names(n), (float(v) for v in param_vector(ham))))
    from neuralcpm_plugin.hamiltonian.closure import closure_groups
    groups = closure_groups(ham)
    for name in sorted(groups, key=lambda g: g == "w_a"):  # neural weights first (w_n | w_l, w_g), then w_a
        if isinstance(groups[name][0].scale, torch.nn.Parameter):
            out[name] = float(groups[name][0].scale.detach())
    return out


def _closure_weights(ham) -> dict:
    from neuralcpm_plugin.hamiltonian.closure import closure_weights
    return closure_weights(ham)


def _report_params(ham, truth, log, unidentified: set[str] = frozenset(), ndim: int = 2) -> dict | None:
    from neuralcpm_plugin.metrics.params import param_names, param_rmse_both_scalings, param_vector
    if ham.term("contact") is None or ham.term("volume") is None:
        return None
    n = ham.term("contact").n_types
    v = param_vector(ham)
    names = param_names(n)
    log("learned parameters (per unordered pair; λ): " + ", ".join(
        f"{a} = not identified" if a in unidentified else f"{a} = {b:.4f}" for a, b in zip(names, v)))
    if truth is None:
        return None
    tv = np.asarray(truth["vector"], dtype=np.float64)
    if tv.shape != v.shape:
        return None
    out = param_rmse_both_scalings(v, tv)
    log(f"true parameters ({truth.get('source', '?')}): " + ", ".join(f"{a} = {b:.4f}" for a, b in zip(names, tv)))
    pp, pa = out["per_pair"], out["paper"]
    paper = f"; paper scaling (J x 4): T=1 {pa['rmse_T1']:.4f}, T* {pa['rmse_Tstar']:.4f}" if ndim == 2 else ""
    log(f"parameter RMSE per pair: T=1 {pp['rmse_T1']:.4f}, T* {pp['rmse_Tstar']:.4f} (T* = {pp['Tstar']:.4f})"
        + paper)
    if ndim != 2:       # the paper's factor 4 on J is its 2-D neighbourhood's: no paper scaling in 3-D
        out.pop("paper", None)
    return out


# ------------------------------------------------------------------------------------------------ figure
def _overview_figure(run_dir: Path, ham, states, data_info: dict, cfg: dict, seed: int) -> dict | None:
    """``RUN/overview.png``: data beside roll-outs of the fitted model (training/overview.py); None if skipped."""
    from .overview import overview
    obj = cfg["objective"]["name"]
    proposal = cfg["pl"]["proposal"] if obj == "pl" else cfg["pcd"]["proposal"]
    try:
        return overview(run_dir, ham, states, data_info, proposal=proposal, seed=seed, log=_say)
    except (NeuralCPMError, OSError, ValueError) as e:
        _say(f"overview figure: not written ({type(e).__name__}: {e})")
        return None
    except Exception as e:  # noqa: BLE001 - the model is saved; a figure bug must not lose the exports
        _say(f"overview figure: not written, a bug of training/overview.py ({type(e).__name__}: {e}); the run "
             "itself is complete")
        return None


# ------------------------------------------------------------------------------------------------ main
def _init_distributed(device: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return dist


def _sampler_factory(kind: str = "parallel", proposal: str = "classic"):
    if kind == "exact":
        from .pcd import ExactChainSampler
        return lambda ham, n_flips: ExactChainSampler(ham, n_flips, proposal=proposal)
    if kind == "mixed":
        from .pcd import MixedChainSampler
        return lambda ham, n_flips: MixedChainSampler(ham, n_flips, proposal=proposal)
    from neuralcpm_plugin.sampling.parallel import ParallelSampler

    def make(ham, n_flips):
        return ParallelSampler(ham, n_flips=n_flips)

    return make


# files and folders training.fit writes into a run folder (what --overwrite may delete)
RUN_FOLDER_MARKERS = ("config.toml", "model", "summary.json", "checkpoint", "train.log", "metrics.csv")


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """Refuse to replace an existing run by accident: a non-empty run folder needs ``--resume`` or ``--overwrite``
    (which replaces it, but only if it is a run folder: it holds one of :data:`RUN_FOLDER_MARKERS`; from the
    command line the old run is put back if the new one fails before its first checkpoint)."""
    from neuralcpm_plugin.cli import claim_output, replace_output
    where = f"run folder {run_dir}"
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in the "
                          "run folder, --overwrite replaces it")
    if run_dir.exists() and run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            state = "a finished run" if (run_dir / "summary.json").exists() else "an unfinished run or other files"
            raise ConfigError(f"{where} holds {state} already; pass --overwrite to replace it, --resume to "
                              "continue a pcd run, or --out NEW_FOLDER for a new run")
        if not any((run_dir / m).exists() for m in RUN_FOLDER_MARKERS):
            sample = ", ".join(sorted(p.name for p in run_dir.iterdir())[:3])
            raise ConfigError(f"{where} is not a training.fit run folder (it holds {sample}, none of "
                              f"{', '.join(RUN_FOLDER_MARKERS)}); --overwrite will not delete it: choose another --out")
        if rank == 0:
            replace_output(run_dir)
    claim_output(run_dir, option="--out", kind="dir", allow_existing=resume)


# configuration keys that may differ between a run and its --resume (where it runs, how long, what it exports;
# the data are compared by their hash, not by their path)
RESUME_FREE_KEYS = ("out", "device", "threads", "data.path", "generate.cache", "pcd.iterations", "pl.steps",
                    "pcd.plot_every", "export.cc3d", "export.morpheus")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume(run_dir: Path, cfg: dict, dhash: str) -> None:
    """Refuse ``--resume`` when the configuration or the data differ from those of the checkpointed run."""
    import tomllib
    old_cfg_path = run_dir / "config.toml"
    if old_cfg_path.is_file():
        try:
            old = _flatten(tomllib.loads(old_cfg_path.read_text()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{old_cfg_path}: unreadable ({e}); cannot check that --resume continues the same "
                              "run") from None
        new = _flatten(cfg)
        diff = [k for k in sorted(set(old) | set(new)) if k not in RESUME_FREE_KEYS and not
                k.startswith(("generate.options.progress",)) and old.get(k, "<unset>") != new.get(k, "<unset>")]
        if diff:
            shown = "; ".join(f"{k}: checkpoint {old.get(k, '<unset>')!r}, now {new.get(k, '<unset>')!r}"
                              for k in diff[:5])
            more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
            raise ConfigError(f"--resume: the configuration differs from the run in {run_dir}: {shown}{more}; "
                              "resume with the same options, or start a new run with --out NEW_FOLDER")
    bundle_json = run_dir / "model" / "model.json"
    if bundle_json.is_file():
        try:
            old_hash = json.loads(bundle_json.read_text()).get("provenance", {}).get("data_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old_hash = None
        if old_hash and old_hash != dhash:
            raise ConfigError(f"--resume: the training data differ from those of the run in {run_dir} (data "
                              f"sha256 {dhash[:12]}…, the checkpoint's {old_hash[:12]}…); resume with the same "
                              "--data, or start a new run with --out NEW_FOLDER")


def fit(cfg: dict, *, resume: bool = False, overwrite: bool = False, truth_spec: str | None = None,
        progress: bool = True) -> dict:
    """Run one training job described by ``cfg`` (see :mod:`training.config`); return a summary dict.

    An existing non-empty run folder is an error unless ``resume`` (continue it; the configuration and the
    data must be those of the checkpoint) or ``overwrite`` (delete it first).
    """
    from neuralcpm_plugin.bundle import save_bundle
    t_start = time.perf_counter()
    if truth_spec:
        _truth_from(truth_spec, {})     # a bad --truth is refused before the work, not after it
    dist = _init_distributed(cfg["device"])
    rank = dist.get_rank() if dist else 0
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    if dist is not None and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    run_dir = Path(cfg["out"] or f"runs/{cfg['name']}")
    _claim_run_dir(run_dir, resume=resume, overwrite=overwrite, rank=rank)
    if dist is not None:
        dist.barrier()          # every rank has checked the folder before rank 0 writes into it
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "train.log" if rank == 0 else None, defer=resume)   # everything _say prints, also in train.log
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    from neuralcpm_plugin.threads import configure_threads
    thr = configure_threads(int(cfg["threads"]))
    objective = cfg["objective"]["name"]
    sampler_factory = _sampler_factory(cfg["pcd"]["sampler"], cfg["pcd"]["proposal"]) if objective == "pcd" else None
    if resume and objective == "pcd" and not (run_dir / "checkpoint").exists():
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoint'}")

    if (run_dir / "data.npz").exists() and resume and not cfg["data"]["path"]:
        cfg = dict(cfg, data=dict(cfg["data"], path=str(run_dir / "data.npz")))
    states, data_info = load_training_data(cfg, run_dir, progress=progress) if rank == 0 or cfg["data"]["path"] else (None, None)
    if dist is not None and not cfg["data"]["path"]:
        obj = [states, data_info]
        dist.broadcast_object_list(obj, src=0)
        states, data_info = obj
    _say(f"data: {len(states)} states of {'x'.join(map(str, states[0].shape))} sites, "
         f"{max(s.n_types for s in states)} cell types, from {data_info['path']}")
    data_warnings, unidentified = check_identifiable(states, cfg)
    for w in data_warnings:
        _say(f"warning: {w}")
    ham, info = build_model(cfg, states, seed=seed)
    if cfg["model"]["init"]:
        init_parameters(ham, cfg["model"]["init"])
        _say(f"init: every parameter from {cfg['model']['init']}")
    _check_compatible(ham, states)
    ham = ham.to(device)
    truth = _truth_from(truth_spec, data_info)
    dhash = data_hash(states)
    if resume and objective == "pcd":
        _check_resume(run_dir, cfg, dhash)
    _log_flush()
    if rank == 0:
        (run_dir / "config.toml").write_text(to_toml(cfg))
        if truth is not None:
            (run_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    _say(f"threads: torch {thr['torch']}, BLAS {thr['blas']} (--threads N sets both)")
    _say(f"model: {cfg['model']['kind']} ({', '.join(t.kind for t in ham.terms)}), V* = {info['V*']:.2f} "
         f"({info['V*_source']}), T = {ham.temperature}; objective: {objective}")

    from neuralcpm_plugin.bundle import _package_version
    data_info.pop("truth_hamiltonian", None)
    provenance = {"data_sha256": dhash, "data": data_info["path"], "data_files": data_info["files"][:50],
                  "n_states": len(states), "config": cfg, "seed": seed, "objective": objective,
                  "model_kind": cfg["model"]["kind"], "package_version": _package_version(),
                  "trainer": "training.fit", "data_warnings": data_warnings,
                  "unidentified_parameters": sorted(unidentified)}
    bundle_dir = run_dir / "model"
    summary: dict = {"run_dir": str(run_dir), "bundle": str(bundle_dir), "objective": objective}

    if objective == "pl":
        from .pseudolikelihood import fit_pl
        if resume:
            _say("note: --resume has no effect with the pl objective (the fit takes seconds); refitting")
        pl = cfg["pl"]
        res = fit_pl(ham, states, share_lambda=cfg["model"]["share_lambda"], max_iter=pl["max_iter"],
                     tolerance=pl["tolerance"], steps=pl["steps"], lr=pl["lr"], sites_per_state=pl["sites_per_state"],
                     states_per_step=pl["states_per_step"], seed=seed, device=device, log=_say,
                     progress=progress, proposal=pl["proposal"],
                     max_sites=pl["max_sites"] or None)
        if res.nll < 1e-6:
            _say("warning: the pseudo-likelihood fits the data perfectly (nll ~ 0): every observed copy is "
                 "predicted with certainty, so the parameters run off to infinity and their values mean nothing; "
                 "give more varied snapshots")
            from neuralcpm_plugin.metrics.params import param_names
            if ham.term("contact") is not None:
                unidentified = unidentified | set(param_names(ham.term("contact").n_types))
        provenance["pl"] = {"nll": res.nll, "iterations": res.iterations, "method": res.method,
                            "sites": res.n_sites, "seconds": round(res.seconds, 3)}
        summary["fit_seconds"] = res.seconds
        if res.method.startswith("stochastic"):
            summary["pl_nll_history"] = [round(float(v), 6) for v in res.history]  # one nll per step (the loss curve)
        from .diagnostics import diagnose_pl
        diag = diagnose_pl(res, ham, states, log=_say)
        res.problem = None                          # free the tabulated problem
        if diag is not None:
            provenance["diagnostics"] = summary["diagnostics"] = diag
        if rank == 0:
            save_bundle(bundle_dir, ham, provenance=provenance, extra={"init": {}})
    else:
        from .pcd import PCDTrainer, write_rank_info

        def on_ckpt(trainer, tag):
            with trainer.use_ema() as h:
                prov = dict(provenance, iteration=trainer.iteration, checkpoint=tag, ema=cfg["pcd"]["ema"])
                save_bundle(bundle_dir, h, provenance=prov)

        trainer = PCDTrainer(ham, states, cfg["pcd"], sampler_factory=sampler_factory, run_dir=run_dir, seed=seed,
                             device=device, share_lambda=cfg["model"]["share_lambda"], on_checkpoint=on_ckpt,
                             param_columns=param_columns, log=_print, progress=progress)   # it writes train.log
        write_rank_info(run_dir, trainer)
        from neuralcpm_plugin.cli import forget_output
        forget_output(run_dir)      # from here on the run folder holds checkpoints and logs worth keeping
        res = trainer.run(int(cfg["pcd"]["iterations"]), resume=resume)
        summary.update(res)
        summary["fit_seconds"] = res["seconds"]
        if res["status"] == "interrupted":
            again = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
            _say(f"stopped by signal {res['signal']} at iteration {res['iteration']}; resume with: "
                 f"python -m training.fit {shlex.join(again)}")
            summary["exit_code"] = 130 if res["signal"] == 2 else 143
            _log_to(None)
            return summary
        # the final bundle holds the EMA weights (written by the last checkpoint)
        if trainer.iteration == 0 and rank == 0:
            on_ckpt(trainer, "final")
    if rank == 0:
        with torch.no_grad():
            from neuralcpm_plugin.bundle import load_bundle
            final = load_bundle(bundle_dir).hamiltonian
        rep = _report_params(final, truth, _say, unidentified, ndim=int(states[0].ids.ndim))
        cw = {k: v for k, v in _closure_weights(final).items() if v is not None}
        if len(cw) > 1:
            summary["closure_weights"] = cw
            _say("closure weights: " + ", ".join(f"{k} = {v:.4g}" for k, v in cw.items()))
        if rep is not None:
            summary["rmse"] = rep
            if summary.get("diagnostics"):
                from .diagnostics import report_coverage
                summary["coverage"] = report_coverage(summary["diagnostics"]["uncertainty"], truth, _say)
        _say(f"bundle: {bundle_dir}  (load with neuralcpm_plugin.load_bundle('{bundle_dir}'))")
        fig = _overview_figure(run_dir, final, states, data_info, cfg, seed) if cfg["export"]["figure"] else None
        if fig is not None:
            summary["figure"] = fig["path"]
            summary["overview"] = fig
        if cfg["export"]["cc3d"] or cfg["export"]["morpheus"]:
            init_state = states[0].copy()
            for line in _export(run_dir, bundle_dir, cfg, init_state):
                _say(line)
        if truth is not None:
            _say(f"evaluate: python -m training.evaluate params {shlex.quote(str(run_dir))}")
        _say(f"done in {time.perf_counter() - t_start:.1f} s; run folder: {run_dir}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _log_to(None)
    if dist is not None:
        dist.barrier()
    return summary


@command
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, _overrides(args))
        summary = fit(cfg, resume=args.resume, overwrite=args.overwrite, truth_spec=args.truth,
                      progress=not args.no_progress)
    finally:
        try:
            import torch.distributed as tdist
            if tdist.is_available() and tdist.is_initialized():
                tdist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"note: torch.distributed shutdown: {e}", file=sys.stderr)
    return int(summary.get("exit_code", 0))


if __name__ == "__main__":
    raise SystemExit(main())
