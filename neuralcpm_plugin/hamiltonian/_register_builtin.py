"""Import every module that defines built-in term kinds, so that they register themselves.

Add a line here when a new term module is written.
"""

import importlib

for _name in ("analytic", "neural", "local_nh"):
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as e:  # a module not written yet
        if e.name != f"{__package__}.{_name}":
            raise
