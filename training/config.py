"""Training configuration: a nested dict with a fixed schema, read from TOML presets or user files.

A configuration has the sections below (every key optional in a file; missing keys take the defaults of
:data:`DEFAULTS`). Unknown keys anywhere are a :class:`~neuralcpm_plugin.errors.ConfigError` naming the file
and the key, so a typo never silently trains the wrong model. Values are type-checked against the default.

Sections
--------
top level : ``name`` (run name), ``seed`` (int), ``device`` ("cpu" or "cuda"), ``out`` (run folder; ""
    means ``runs/<name>``), ``threads`` (CPU threads for torch, BLAS and numba; 0 = the default policy of
    :mod:`neuralcpm_plugin.threads`).
``[data]`` : ``path`` (npz file or directory of npz files; "" = generate with ``[generate]``),
    ``frames`` ("auto" = the final frame of each recorded time series, all frames of other files; "all",
    "final" = last frame of each file, or "last:N"), ``max_states`` (0 = all), ``ndim`` (2 or
    3: whether a TIFF stack is a 2-D time series or one 3-D volume; ``--dim``).
``[generate]`` : ``dataset`` (a ``training.gen_<name>`` module), ``options`` (free table of keyword
    arguments of its ``generate_<name>(...)`` function), ``cache`` (path of the generated npz; "" = inside the
    run folder).
``[model]`` : ``kind`` (analytic | nh | nh-closure | local-nh | local-nh-closure | pooled-nh | pooled-closure
    | local-pooled-closure | cnn | nh1-cnn), lattice orders, ``temperature``, initial values of the analytic
    parameters (per-pair units), ``share_lambda``, initial closure weights ``w_a``/``w_n`` (``w_n``: the
    neural part of a two-part closure, pooled-closure included) and ``w_l``/``w_g`` (local and pooled NH of
    local-pooled-closure), ``neural`` (free table: architecture config passed to the neural term — the local
    NH of local-pooled-closure), ``pooled`` (free table: the pooled NH's config, e.g. ``position_dim``,
    ``hidden``; for pooled-nh / pooled-closure ``neural`` is accepted too),
    ``prior`` (a bundle, Morpheus .xml or CC3D .cc3d model; analytic part), ``freeze_prior``, ``init`` (a bundle
    of the same model kind and architecture: every parameter starts at its values — fine-tuning),
    ``learn_target_volume`` (true: V* is learned with λ instead of fixed to the data's mean volume — the
    paper's choice, which biases λ and J when the mean volume differs from V*; with ``pl`` the convex fit
    learns κ = λ·V*), ``external_field`` (true: add
    H_ext = Σ_i μ(τ(σ_i))·φ(i) with μ and the whole field φ learned — the paper's "cell sorting + external
    potential" baseline; train it with pcd).
``[objective]`` : ``name`` ("pl" or "pcd").
``[pl]`` : the proposal-aware pseudo-likelihood (SPEC.md); convex L-BFGS for analytic models
    (``max_iter``, ``tolerance``), stochastic Adam for neural ones (``steps``, ``lr``, ``sites_per_state``,
    ``states_per_step``); ``proposal`` = the copy proposals of the dynamics that made the data ("classic":
    CC3D/Morpheus; "boundary": the paper's generators); ``max_sites`` = at most this many boundary sites in the
    convex fit (default 1,000,000; beyond it an equal random share per state is used, so that tissue-scale
    data — 16 snapshots of 1,000×1,000 have ~6 M boundary sites — fit in a few GB; 0 = all sites).
``[pcd]`` : persistent contrastive divergence (paper §3.2, App. Table 7): ``batch``, ``iterations``, ``mcs``,
    ``flips``, ``reset_prob``, ``alpha``, ``ema``, ``lr``, ``checkpoint_every``, ``plot_every`` (0 = no plots), divergence
    guard ``energy_limit`` / ``lr_decay`` / ``max_rollbacks``, ``sampler`` ("parallel" = the paper's parallel
    sampler; "exact" = the sequential sampler, with ``proposal`` "classic" (CC3D/Morpheus) or "boundary" (the
    cell-sorting generator); "mixed" = the first half of the chains on the exact sampler with ``proposal``,
    the rest on the parallel one with ``flips``, needs ``chain_rng = "batched"``), ``init_permute`` (chains start from data
    states with permuted cell types, as a reset does; false = from the data states themselves), ``reset_permute``
    (resets permute the cell types, the paper; false = contrastive divergence from the data states), ``chain_rng``
    ("per_chain": one generator and sampler call per chain, identical for any number of processes;
    "batched": one sampler call for all chains of a process — faster for neural models), ``lr_scale`` (a table
    {parameter name: factor}: that learnable tensor's Adam step is ``lr × factor``; a name matches the
    parameter whose dotted name equals it or ends with ``.name``, e.g. ``{pos = 10.0}`` = the pooled NH's
    position embedding ``terms.K.pos``; a name matching no learnable parameter is an error at the start of
    training; factors must be finite and > 0).
``[export]`` : ``cc3d`` / ``morpheus`` (bool: write the exports after training), ``figure`` (bool: write
    ``overview.png``, the data beside roll-outs of the fitted model; analytic models only, see
    ``training/overview.py``).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import tomllib

from neuralcpm_plugin.errors import ConfigError

__all__ = [
    "ANALYTIC_KINDS",
    "DEFAULTS",
    "MODEL_KINDS",
    "OBJECTIVES",
    "PRESETS",
    "check_bounds",
    "list_presets",
    "load_config",
    "merge",
    "validate",
]

MODEL_KINDS = ("analytic", "nh", "nh-closure", "local-nh", "local-nh-closure", "pooled-nh", "pooled-closure",
               "local-pooled-closure", "cnn", "nh1-cnn")
#: model kinds with an analytic part (closures)
ANALYTIC_KINDS = ("analytic", "nh-closure", "local-nh-closure", "pooled-closure", "local-pooled-closure")
OBJECTIVES = ("pl", "pcd")
FREE_TABLES = {("generate", "options"), ("model", "neural"), ("model", "pooled"), ("pcd", "lr_scale")}

DEFAULTS: dict = {
    "name": "default",
    "seed": 0,
    "device": "cpu",
    "threads": 0,                    # CPU threads (0 = neuralcpm_plugin.threads' default policy)
    "out": "",
    "data": {"path": "", "frames": "auto", "max_states": 0, "ndim": 2},
    "generate": {"dataset": "cellsort", "options": {}, "cache": ""},
    "model": {
        "kind": "analytic",
        "copy_order": 2,
        "contact_order": 2,
        "temperature": 1.0,
        "init_J": 1.0,
        "init_lambda": 0.1,
        "share_lambda": True,
        "target_volume": 0.0,        # 0 = the data's mean cell volume (paper App. B.2.1)
        "w_a": 0.25,
        "w_n": 1.0,
        "w_l": 1.0,                  # local-pooled-closure: initial weight of the local NH
        "w_g": 1.0,                  # local-pooled-closure: initial weight of the pooled NH
        "neural": {},
        "pooled": {},
        "prior": "",
        "init": "",                  # a bundle of the same model: every parameter starts at its values
        "learn_target_volume": False,  # learn V* too (default: fixed to the data mean, as the paper)
        "external_field": False,     # add an external potential with a learned field (paper baseline)
        "freeze_prior": False,
    },
    "objective": {"name": "pl"},
    "pl": {"max_iter": 200, "tolerance": 1e-10, "steps": 200, "lr": 1e-2, "sites_per_state": 256,
           "states_per_step": 4, "proposal": "classic", "max_sites": 1_000_000},
    "pcd": {
        "batch": 16,
        "iterations": 10000,
        "mcs": 1.0,
        "flips": 100,
        "reset_prob": 1.0,
        "alpha": 0.0,
        "ema": 0.0,
        "lr": 1e-3,
        "checkpoint_every": 100,
        "plot_every": 500,
        "energy_limit": 1e7,
        "lr_decay": 0.5,
        "max_rollbacks": 5,
        "sampler": "parallel",
        "proposal": "classic",
        "init_permute": True,
        "reset_permute": True,
        "chain_rng": "per_chain",
        "lr_scale": {},              # {parameter name: multiplier of lr} (e.g. {pos = 10.0}), default 1 each
    },
    "export": {"cc3d": True, "morpheus": True, "figure": True},
}

_PRESET_DIR = "presets"


def list_presets() -> list[str]:
    """Names of the presets shipped in ``training/presets/*.toml``."""
    d = resources.files(__package__) / _PRESET_DIR
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


PRESETS = list_presets


def merge(base: dict, over: dict, *, where: str = "", prefix: tuple = ()) -> dict:
    """Return ``base`` updated recursively by ``over``; unknown keys and wrong types are a ConfigError."""
    out = copy.deepcopy(base)
    for key, val in over.items():
        path = prefix + (key,)
        dotted = ".".join(path)
        if prefix in FREE_TABLES or (len(prefix) >= 2 and prefix[:2] in FREE_TABLES):
            out[key] = copy.deepcopy(val)
            continue
        if key not in base:
            known = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"{where}unknown configuration key {dotted!r}; known keys here: {known}")
        ref = base[key]
        if isinstance(ref, dict):
            if not isinstance(val, dict):
                raise ConfigError(f"{where}{dotted!r} must be a table, got {type(val).__name__}")
            if path in FREE_TABLES:
                out[key] = copy.deepcopy(val)
            else:
                out[key] = merge(ref, val, where=where, prefix=path)
            continue
        out[key] = _coerce(ref, val, dotted, where)
    return out


def _coerce(ref, val, dotted: str, where: str):
    if isinstance(ref, bool):
        if not isinstance(val, bool):
            raise ConfigError(f"{where}{dotted!r} must be true or false, got {val!r}")
        return val
    if isinstance(ref, int):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ConfigError(f"{where}{dotted!r} must be an integer, got {val!r}")
        return val
    if isinstance(ref, float):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ConfigError(f"{where}{dotted!r} must be a number, got {val!r}")
        return float(val)
    if isinstance(ref, str):
        if not isinstance(val, str):
            raise ConfigError(f"{where}{dotted!r} must be a string, got {val!r}")
        return val
    return val


def validate(cfg: dict, *, where: str = "") -> dict:
    """Check value ranges and choices; return ``cfg``."""
    m = cfg["model"]
    if m["kind"] not in MODEL_KINDS:
        raise ConfigError(f"{where}model.kind {m['kind']!r} is not one of {', '.join(MODEL_KINDS)}")
    if m["external_field"] and m["kind"] not in ANALYTIC_KINDS:
        raise ConfigError(f"{where}model.external_field needs an analytic part (analytic or a closure kind), "
                          f"not {m['kind']!r}")
    if m["pooled"] and "pooled" not in m["kind"]:
        raise ConfigError(f"{where}model.pooled configures the pooled NH of the kinds pooled-nh, pooled-closure and "
                          f"local-pooled-closure; model.kind is {m['kind']!r}")
    if m["pooled"] and m["neural"] and m["kind"] in ("pooled-nh", "pooled-closure"):
        raise ConfigError(f"{where}model.kind {m['kind']!r} has one neural term, the pooled NH: configure it in "
                          "model.pooled or model.neural, not both")
    if m["external_field"] and cfg["objective"]["name"] == "pl":
        raise ConfigError(f"{where}model.external_field (one parameter per site) is trained with objective pcd, "
                          "not pl")
    if cfg["objective"]["name"] not in OBJECTIVES:
        raise ConfigError(f"{where}objective.name {cfg['objective']['name']!r} is not one of "
                          f"{', '.join(OBJECTIVES)}")
    dev = str(cfg["device"])
    if dev not in ("cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"{where}device must be 'cpu', 'cuda' or 'cuda:N', got {cfg['device']!r}")
    _check_finite(cfg, where)
    check_bounds(cfg, {"threads": (0, MAX_THREADS, "threads")}, where=where)
    check_bounds(cfg["data"], {"max_states": (0, None, "data.max_states")}, where=where)
    m_ = cfg["model"]
    check_bounds(m_, {"copy_order": (1, MAX_ORDER, "model.copy_order"),
                      "contact_order": (1, MAX_ORDER, "model.contact_order"),
                      "target_volume": (0, None, "model.target_volume")}, where=where)
    check_bounds(cfg["pcd"], {"batch": (1, MAX_BATCH, "pcd.batch"), "iterations": (0, MAX_ITERATIONS, "pcd.iterations"),
                              "mcs": (None, MAX_PCD_MCS, "pcd.mcs"), "flips": (1, MAX_FLIPS, "pcd.flips"),
                              "checkpoint_every": (1, None, "pcd.checkpoint_every"),
                              "plot_every": (0, None, "pcd.plot_every"), "max_rollbacks": (0, 1000, "pcd.max_rollbacks")},
                 where=where)
    check_bounds(cfg["pl"], {"max_iter": (1, MAX_ITERATIONS, "pl.max_iter"), "steps": (1, MAX_ITERATIONS, "pl.steps"),
                             "sites_per_state": (1, MAX_SITES_PER_STATE, "pl.sites_per_state"),
                             "states_per_step": (1, MAX_BATCH, "pl.states_per_step"),
                             "lr": (0, None, "pl.lr"), "tolerance": (0, None, "pl.tolerance")}, where=where)
    for table in ("neural", "pooled"):
        _check_architecture(m_[table], f"model.{table}", where)
    if cfg["data"]["ndim"] not in (2, 3):
        raise ConfigError(f"{where}data.ndim must be 2 or 3, got {cfg['data']['ndim']!r}")
    fr = cfg["data"]["frames"]
    if fr not in ("auto", "all", "final") and not (fr.startswith("last:") and fr[5:].isdigit() and int(fr[5:]) > 0):
        raise ConfigError(f"{where}data.frames must be 'auto', 'all', 'final' or 'last:N', got {fr!r}")
    p = cfg["pcd"]
    checks = [(p["batch"] >= 1, "pcd.batch must be >= 1"),
              (p["iterations"] >= 0, "pcd.iterations must be >= 0"),
              (p["mcs"] > 0, "pcd.mcs must be > 0"),
              (p["flips"] >= 1, "pcd.flips must be >= 1"),
              (0.0 <= p["reset_prob"] <= 1.0, "pcd.reset_prob must lie in [0, 1]"),
              (p["alpha"] >= 0, "pcd.alpha must be >= 0"),
              (0.0 <= p["ema"] < 1.0, "pcd.ema must lie in [0, 1)"),
              (p["lr"] > 0, "pcd.lr must be > 0"),
              (p["checkpoint_every"] >= 1, "pcd.checkpoint_every must be >= 1"),
              (0 < p["lr_decay"] < 1, "pcd.lr_decay must lie in (0, 1)"),
              (p["sampler"] in ("parallel", "exact", "mixed"),
               "pcd.sampler must be 'parallel' (paper), 'exact' or 'mixed'"),
              (p["sampler"] != "mixed" or p["chain_rng"] == "batched",
               "pcd.sampler = 'mixed' needs pcd.chain_rng = 'batched' (it splits the batch of chains)"),
              (p["proposal"] in ("classic", "boundary"), "pcd.proposal must be 'classic' or 'boundary'"),
              (p["chain_rng"] in ("per_chain", "batched"), "pcd.chain_rng must be 'per_chain' or 'batched'"),
              (m["temperature"] > 0, "model.temperature must be > 0"),
              (m["copy_order"] >= 1 and m["contact_order"] >= 1, "neighbourhood orders must be >= 1"),
              (cfg["pl"]["max_iter"] >= 1, "pl.max_iter must be >= 1"),
              (cfg["pl"]["sites_per_state"] >= 1, "pl.sites_per_state must be >= 1"),
              (cfg["pl"]["max_sites"] >= 0, "pl.max_sites must be >= 0 (0 = all boundary sites)"),
              (cfg["pl"]["proposal"] in ("classic", "boundary"), "pl.proposal must be 'classic' or 'boundary'")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(where + msg)
    _check_lr_scale(p["lr_scale"], where)
    return cfg


def _check_lr_scale(table, where: str = "") -> None:
    """``pcd.lr_scale``: {non-empty parameter name: finite factor > 0} (names are matched at training start)."""
    import math
    for name, f in table.items():
        if not isinstance(name, str) or not name.strip(".").strip():
            raise ConfigError(f"{where}pcd.lr_scale: parameter names must be non-empty, got {name!r}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ConfigError(f"{where}pcd.lr_scale.{name} must be a finite number > 0 (a factor on pcd.lr), "
                              f"got {f!r}")


def check_bounds(values: dict, bounds: dict, *, where: str = "") -> None:
    """Refuse values outside their bounds, naming the option and the bound.

    ``bounds`` maps a key of ``values`` to ``(lo, hi, label)``; ``lo``/``hi`` may be None (unbounded), ``label``
    names the option for the user (e.g. ``"--size"`` or ``"pcd.batch"``). Missing or None values are skipped;
    every other value must be a finite number within ``[lo, hi]``.
    """
    import math
    for key, (lo, hi, label) in bounds.items():
        v = values.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}{label} must be a number, got {v!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{where}{label} must be a finite number, got {v}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (f"from {lo} to {hi}" if lo is not None and hi is not None else
                   f">= {lo}" if lo is not None else f"<= {hi}")
            raise ConfigError(f"{where}{label} must be {rng}, got {v}")


def _check_architecture(arch: dict, table: str, where: str) -> None:
    """Bounds on the sizes in a neural architecture table (``model.neural``, ``model.pooled``): widths (a number
    or a list of numbers per layer) up to :data:`MAX_WIDTH`, kernels, strides and layer counts up to
    :data:`MAX_KERNEL` — an oversized network would otherwise end in an out-of-memory error after the data load."""
    for key, v in arch.items():
        hi = MAX_WIDTH if key in _WIDTH_KEYS else MAX_KERNEL if key in _KERNEL_KEYS else None
        if hi is None:
            continue
        values = v if isinstance(v, (list, tuple)) else [v]
        for j, x in enumerate(values):
            label = f"{table}.{key}" + (f"[{j}]" if isinstance(v, (list, tuple)) else "")
            check_bounds({key: x}, {key: (0, hi, label)}, where=where)


MAX_WIDTH = 4096                 #: bound of the channel / hidden-unit counts of a neural architecture
MAX_KERNEL = 64                  #: bound of its kernel sizes, strides, pools and layer counts
_WIDTH_KEYS = {"hidden", "channels", "agg_channels", "conv_hidden", "mlp", "position_dim"}
_KERNEL_KEYS = {"kernel", "stride", "embed_stride", "pools", "conv_pools", "conv_layers"}
MAX_THREADS = 1024               #: bound of ``threads``
MAX_ORDER = 20                   #: bound of the neighbourhood orders (order 20 is already ~1200 neighbours)
MAX_BATCH = 65536                #: bound of ``pcd.batch`` and ``pl.states_per_step`` (chains / states in memory)
MAX_ITERATIONS = 100_000_000     #: bound of ``pcd.iterations``, ``pl.steps``, ``pl.max_iter``
MAX_PCD_MCS = 1e6                #: bound of ``pcd.mcs`` (sampler sweeps per iteration)
MAX_FLIPS = 10_000_000           #: bound of ``pcd.flips`` (proposals per parallel-sampler step)
MAX_SITES_PER_STATE = 100_000_000  #: bound of ``pl.sites_per_state``


# the command-line options of training.fit that set configuration keys (for messages)
CLI_FLAGS = {"pcd.iterations": "--iterations", "pl.steps": "--iterations", "threads": "--threads",
             "device": "--device", "seed": "--seed", "data.frames": "--frames", "model.kind": "--model",
             "objective.name": "--objective", "data.path": "--data", "model.prior": "--prior"}


def _check_finite(cfg: dict, where: str, prefix: str = "") -> None:
    """No NaN or infinity anywhere in the fixed-schema sections (TOML allows ``nan`` and ``inf``)."""
    import math
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if tuple(key.split(".")) not in FREE_TABLES:
                _check_finite(v, where, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}{key} must be a finite number, got {v}")


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}invalid TOML ({e})") from None


def load_preset(name: str) -> dict:
    """The raw table of a shipped preset (before merging with the defaults)."""
    f = resources.files(__package__) / _PRESET_DIR / f"{name}.toml"
    if not f.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())} (or give a .toml file)")
    return _read_toml(f.read_text(), f"preset {name}: ")


def _with_parents(raw: dict, where: str, seen: list) -> dict:
    """DEFAULTS merged with the chain of presets ``raw`` starts from (``preset = "name"``, recursively);
    pops the ``preset`` key from ``raw``."""
    parent = raw.pop("preset", None)
    if parent is None:
        return copy.deepcopy(DEFAULTS)
    if not isinstance(parent, str):
        raise ConfigError(f"{where}'preset' must be a preset name")
    if parent in seen:
        raise ConfigError(f"{where}presets form a cycle: {' -> '.join(seen + [parent])}")
    praw = dict(load_preset(parent))
    pwhere = f"preset {parent}: "
    return merge(_with_parents(praw, pwhere, seen + [parent]), praw, where=pwhere)


def load_config(spec: str | None = None, overrides: dict | None = None) -> dict:
    """Build a full configuration.

    Parameters
    ----------
    spec : str, optional
        A preset name (``training/presets/<name>.toml``) or a path to a TOML file. A file may start from a
        preset with a top-level ``preset = "name"`` key (presets may do the same). ``None`` = the embedded
        ``default`` preset.
    overrides : dict, optional
        Nested values applied last (from command-line flags), checked like the file.
    """
    where = ""
    if spec is None:
        raw = load_preset("default")
        where = "preset default: "
    elif spec.endswith(".toml") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{spec}: configuration file not found")
        where = f"{spec}: "
        raw = _read_toml(path.read_text(), where)
    else:
        raw = load_preset(spec)
        where = f"preset {spec}: "
    raw = dict(raw)
    cfg = merge(_with_parents(raw, where, []), raw, where=where)
    if overrides:
        merged = merge(cfg, overrides, where="command line: ")
        try:
            return validate(merged, where=where)
        except ConfigError:
            validate(cfg, where=where)       # raises if the file's own values are wrong: named as the file's
            try:                             # else the command line's mistake: say so, with the option
                return validate(merged, where="command line: ")
            except ConfigError as e:
                msg = str(e)
                flags = [f for k, f in CLI_FLAGS.items() if f" {k} " in f" {msg.split('command line: ', 1)[-1]}"]
                raise ConfigError(msg + (f" (option {flags[0]})" if flags else "")) from None
    return validate(cfg, where=where)


def to_toml(cfg: dict) -> str:
    """Serialise a configuration back to TOML (for the run folder; simple values, lists and tables only)."""
    lines: list[str] = []

    def key(k):     # a bare TOML key, or a quoted one when it holds dots or other characters (pcd.lr_scale names)
        k = str(k)
        if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
            return k
        return '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(d: dict, prefix: str):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or ((*prefix.split("."), k)
                                                                           if prefix else (k,)) in FREE_TABLES}
        subs = {k: v for k, v in d.items() if k not in scalars}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {val(v)}")
        lines.append("")
        for k, v in subs.items():
            table(v, f"{prefix}.{k}" if prefix else k)

    table(cfg, "")
    return "\n".join(lines)
