"""A periodic one-line status for long loops (pcd training, the stochastic pseudo-likelihood).

:class:`StatusLine` emits at most one line every ``every`` seconds (wall clock), and always on the last
iteration, of the form::

    pcd: iteration 120/2000 (6.0 %), loss 0.0132, 1.85 it/s, elapsed 1:04, ETA 16:56

so that a run started with ``--no-progress`` (or whose output goes to a file) still shows that it is alive and
how long it will take. The rate is measured over the iterations of this process (a resumed run counts from
where it resumed).
"""

from __future__ import annotations

import math
import time

__all__ = ["StatusLine", "format_duration", "progress_counter"]


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` for a non-finite value."""
    if not math.isfinite(seconds):
        return "?"
    s = round(max(0.0, seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StatusLine:
    """Rate-limited status lines; ``update(i, **fields)`` returns the line it emitted, or None.

    Parameters
    ----------
    what : str
        Prefix (e.g. ``"pcd"``).
    total : int
        Iteration count at which the loop ends.
    every : float
        Seconds between lines (≤ 0: a line on every update).
    start : int
        Iteration the loop starts from (resume).
    emit : callable
        Receives each line (e.g. ``print`` or a logger writing ``train.log``).
    clock : callable
        Seconds, monotonic (injectable for tests).
    """

    def __init__(self, what: str, total: int, *, every: float = 30.0, start: int = 0, emit=print,
                 clock=time.monotonic, unit: str = "iteration"):
        self.what, self.total, self.every, self.unit = what, int(total), float(every), unit
        self.start = int(start)
        self.emit, self.clock = emit, clock
        self.t0 = clock()
        self.last = self.t0

    def line(self, i: int, now: float, **fields) -> str:
        elapsed = now - self.t0
        done = i - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - i) / rate if math.isfinite(rate) and rate > 0 else float("nan")
        parts = [f"{self.what}: {self.unit} {i}/{self.total} ({100.0 * i / max(1, self.total):.1f} %)"]
        for k, v in fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"{rate:.3g} it/s" if math.isfinite(rate) else "? it/s")
        parts.append(f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")
        return ", ".join(parts)

    def update(self, i: int, **fields) -> str | None:
        now = self.clock()
        if now - self.last < self.every and i < self.total:
            return None
        self.last = now
        msg = self.line(i, now, **fields)
        self.emit(msg)
        return msg


class _StatusCounter:
    """A tqdm-like counter (``update``/``close``) that prints a :class:`StatusLine` instead of a bar."""

    def __init__(self, total: int, desc: str, unit: str, every: float, emit):
        self.n = 0
        self.status = StatusLine(desc, total, every=every, emit=emit, unit=unit)

    def update(self, k: int = 1) -> None:
        self.n += k
        self.status.update(self.n)

    def close(self) -> None:
        pass


def _print_flush(line: str) -> None:
    print(line, flush=True)


def progress_counter(total: int, desc: str, unit: str, *, progress: bool, every: float = 30.0,
                     emit=_print_flush):
    """A tqdm bar when ``progress``, otherwise a status line every ``every`` seconds and at the end (so that
    long runs started with ``--no-progress`` still say how far they are). Call ``update(k)`` and ``close()``."""
    if progress:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit)
    return _StatusCounter(total, desc, unit, every, emit)
