"""Ctrl-C during a command line's start-up (importing torch takes seconds) prints one line, exits 130.

:func:`neuralcpm_plugin.cli.command` handles Ctrl-C once ``main`` runs; before that — while ``python -m
training.fit`` imports its packages — an interrupt would end in Python's traceback. The hook below (installed
only when ``__main__`` is a module of the package run with ``python -m``) turns an uncaught
KeyboardInterrupt into the same one line and exit status 130 (``--debug`` keeps the traceback).
"""

from __future__ import annotations

import os
import sys

__all__ = ["install_interrupt_hook"]


COMMAND_PACKAGES = ("training", "cc3d_steppables", "morpheus_xml", "neuralcpm_plugin")


def install_interrupt_hook() -> None:
    """Install the hook when ``__main__`` is a module of the package's command lines (``python -m``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name.split(".")[0] not in COMMAND_PACKAGES:
        return
    previous = sys.excepthook
    if getattr(previous, "_neuralcpm", False) or "--debug" in sys.argv or os.environ.get("NEURALCPM_DEBUG"):
        return

    def hook(tp, value, tb):
        if issubclass(tp, KeyboardInterrupt):
            try:
                sys.stdout.flush()
            except Exception:  # noqa: BLE001, S110 - exiting anyway
                pass
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            os._exit(130)
        previous(tp, value, tb)

    hook._neuralcpm = True
    sys.excepthook = hook
