"""One command, several sub-commands, each in its own module exposing ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib


def dispatch(prog: str, description: str, commands: dict[str, str], module_prefix: str, argv=None) -> int:
    """Parse ``argv`` as ``prog NAME ...`` and run ``training.<module_prefix><NAME>.run(args)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in commands.items():
        p = sub.add_parser(name, help=help_)
        modname = f"training.{module_prefix}{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            p.set_defaults(_missing=name)
            continue
        mod.add_arguments(p)
        if not any("--threads" in a.option_strings for a in p._actions):
            p.add_argument("--threads", type=int, default=0,
                           help="CPU threads for torch, BLAS and numba (default 0: torch/numba use the available "
                                "CPUs, BLAS 1; see neuralcpm_plugin.threads)")
        if any("--out" in a.option_strings for a in p._actions) and \
                not any("--overwrite" in a.option_strings for a in p._actions):
            p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(f"{args._missing!r} is not available in this version")
    from neuralcpm_plugin.threads import configure_threads
    configure_threads(getattr(args, "threads", 0) or 0)
    return int(args._run(args) or 0)
