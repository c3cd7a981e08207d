"""Atomic writes that leave nothing behind: temporary siblings with the user's umask, stale ones cleaned.

Bundles, checkpoints and data files are written into a temporary sibling (``.<name>.tmp-<pid>-…``) and renamed
into place. :func:`make_temp_dir` gives that sibling the permissions an ordinary ``mkdir`` would get under the
current umask (``tempfile.mkdtemp`` makes it 0700, which would make a bundle copied into a CompuCell3D project
unreadable to the group), and first removes the temporary siblings (and ``<name>.old-<pid>`` leftovers of a
replace) that processes which no longer run left behind — a write killed by SIGKILL or a power cut.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["clean_stale", "make_temp_dir", "umask"]


def umask() -> int:
    """The process's current umask (read without changing it for longer than a call)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pid_of(name: str, marker: str) -> int | None:
    rest = name.split(marker, 1)[1] if marker in name else ""
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(dest) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>…`` and ``<name>.old-<pid>`` siblings of ``dest`` whose process is gone
    (leftovers without a pid, from older versions, too); return what was removed."""
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return []
    removed = []
    name = glob.escape(dest.name)
    for pattern, marker in ((f".{name}.tmp-*", ".tmp-"), (f"{name}.old-*", ".old-")):
        for p in parent.glob(pattern):
            pid = _pid_of(p.name, marker)
            if pid is not None and _alive(pid):
                continue
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def make_temp_dir(dest) -> Path:
    """A new empty temporary sibling folder of ``dest`` (``.<name>.tmp-<pid>-<random>``) with umask permissions,
    after :func:`clean_stale`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp
