"""Samplers: the exact sequential Metropolis sampler (exact) and the paper's parallel sampler (parallel)."""

import importlib as _il

for _name in ("exact", "parallel"):
    try:
        _mod = _il.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a module not written yet
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    globals().update({k: getattr(_mod, k) for k in getattr(_mod, "__all__", [])})
