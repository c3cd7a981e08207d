"""Metrics: summary statistics of states (stats), the paper's metrics (paper), parameter errors (params)."""

import importlib as _il

for _name in ("stats", "paper", "params"):
    try:
        _mod = _il.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a module not written yet
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    globals().update({k: getattr(_mod, k) for k in getattr(_mod, "__all__", [])})
