"""One error path for every command line of the package (``python -m training.fit``, ``training.generate``,
``training.evaluate``, ``cc3d_steppables.export``, ``morpheus_xml.export``, ``morpheus_xml.run``).

Wrap a command's ``main(argv=None) -> int`` with :func:`command`:

* a user mistake — a :class:`~neuralcpm_plugin.errors.NeuralCPMError` (ConfigError, DataError, BundleError,
  ExportError, ModelImportError) or an ``OSError`` on a path (missing, a directory where a file is expected,
  read-only, disk full) — prints ONE line ``error: <file or option>: <problem>`` (plus a hint for OS errors)
  on stderr and exits with :data:`EXIT_USER` (2, as argparse does for bad options); no traceback;
* Ctrl-C (``KeyboardInterrupt``) prints one line and exits with :data:`EXIT_INTERRUPTED` (130);
* anything else is a bug: one line saying so, exit :data:`EXIT_BUG` (1);
* ``--debug`` anywhere on the command line (or ``NEURALCPM_DEBUG=1``) lets the exception through, with its
  traceback, after the same clean-up.

Outputs are claimed with :func:`claim_output` before the work starts: an existing non-empty output is refused
unless ``--overwrite`` (or, for ``training.fit``, ``--resume``), and an output that did not exist before the
command — with every folder created for it — is removed again when the command fails or is interrupted, so no
half-made file or folder is left behind. An output replaced with ``--overwrite`` is first moved aside (to a
hidden sibling ``.NAME.replaced-PID``) and put back if the command fails or is interrupted, so a failed
``--overwrite`` loses nothing; the old output is deleted when the command succeeds (or when the command keeps
its new output, :func:`forget_output`). Outside a wrapped command (library use) claiming only checks.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import traceback
from pathlib import Path

from .errors import ConfigError, NeuralCPMError

__all__ = ["EXIT_BUG", "EXIT_INTERRUPTED", "EXIT_USER", "claim_output", "command", "describe_os_error",
           "forget_output", "replace_output"]

EXIT_USER = 2            #: a user mistake (bad option, file, data, configuration)
EXIT_INTERRUPTED = 130   #: Ctrl-C (128 + SIGINT), as shells report it
EXIT_BUG = 1             #: an unexpected exception: a bug of the package

# the outputs that did not exist before the running command: removed again if it fails (a stack: nested commands)
_claims: list[list[Path]] = []
# outputs replaced with --overwrite, moved aside: (original path, where it waits); put back if the command fails
_asides: list[list[tuple[Path, Path]]] = []

_OS_HINTS = {
    "ENOENT": "check the path: a file or folder in it is missing",
    "EACCES": "no permission: choose a path you can read/write or fix its permissions",
    "EPERM": "no permission: choose a path you can read/write or fix its permissions",
    "EROFS": "the file system is read-only: choose another output path",
    "EISDIR": "this is a folder; give a file name",
    "ENOTDIR": "a part of this path is a file, not a folder",
    "ENOSPC": "the disk is full: free some space or choose another output path",
    "EDQUOT": "the disk quota is exhausted: free some space or choose another output path",
    "EEXIST": "it exists already: choose another path or pass --overwrite",
    "ENAMETOOLONG": "the path is too long",
    "ELOOP": "too many symbolic links in this path",
    "EMFILE": "too many open files",
}


def describe_os_error(e: OSError) -> str:
    """``<path>: <problem> (<hint>)`` for an OSError, naming the file(s) it concerns."""
    import errno
    name = errno.errorcode.get(e.errno or 0, "")
    where = ""
    if e.filename is not None:
        where = os.fsdecode(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        where += ": "
    what = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(name)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("NEURALCPM_DEBUG", "") not in ("", "0")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _clean_up(claims: list[Path], asides: list[tuple[Path, Path]] = ()) -> list[Path]:
    """Remove the outputs the failed command made, then put back what it was replacing (``--overwrite``)."""
    removed = []
    for p in reversed(claims):
        if p.exists() or p.is_symlink():
            _remove(p)
            removed.append(p)
    for original, backup in reversed(asides):
        try:
            if original.exists() or original.is_symlink():
                _remove(original)
            backup.rename(original)
        except OSError:
            print(f"warning: could not put {original} back; the previous version is in {backup}", file=sys.stderr)
    asides.clear()
    return removed


def _drop(asides: list[tuple[Path, Path]]) -> None:
    """The command succeeded: delete the outputs it replaced."""
    for _original, backup in asides:
        _remove(backup)
    asides.clear()


def _say_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def command(fn):
    """Decorator for ``main(argv=None) -> int``: the package's single error path (see the module docstring).

    ``--debug`` is taken out of ``argv`` before ``fn`` sees it. Returns the exit code (``fn``'s, or 2, 130, 1).
    """
    @functools.wraps(fn)
    def main(argv=None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = _debug_requested(argv)
        argv = [a for a in argv if a != "--debug"]
        claims: list[Path] = []
        asides: list[tuple[Path, Path]] = []
        _claims.append(claims)
        _asides.append(asides)
        interrupted = _watch_sigint()
        try:
            code = fn(argv)
            _drop(asides)
            return code
        except KeyboardInterrupt:
            removed = _clean_up(claims, asides)
            if debug:
                raise
            note = f"; removed the unfinished {', '.join(map(str, removed))}" if removed else ""
            print(f"interrupted (Ctrl-C){note}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except NeuralCPMError as e:
            _clean_up(claims, asides)
            if debug:
                raise
            _say_error(str(e))
            return EXIT_USER
        except OSError as e:
            _clean_up(claims, asides)
            if debug:
                raise
            _say_error(describe_os_error(e))
            return EXIT_USER
        except MemoryError:
            _clean_up(claims, asides)
            if debug:
                raise
            _say_error("out of memory: use smaller data or smaller settings (batch, lattice, snapshots)")
            return EXIT_USER
        except SystemExit as e:
            if e.code not in (None, 0):
                _clean_up(claims, asides)
            else:
                _drop(asides)
            raise
        except Exception as e:  # anything else is a bug: one line, the traceback with --debug
            removed = _clean_up(claims, asides)
            if interrupted() and not debug:     # a library turned Ctrl-C into another exception
                note = f"; removed the unfinished {', '.join(map(str, removed))}" if removed else ""
                print(f"interrupted (Ctrl-C){note}", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            if debug:
                raise
            where = ""
            tb = traceback.extract_tb(e.__traceback__)
            if tb:
                where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}"
            _say_error(f"internal error {type(e).__name__}: {e}{where} — this is a bug of the package; run "
                             "again with --debug for the traceback and report it")
            return EXIT_BUG
        finally:
            _claims.pop()
            _asides.pop()
            interrupted.restore()

    return main


class _SigintWatch:
    """Records that SIGINT arrived (then raises KeyboardInterrupt as Python's default handler does)."""

    def __init__(self):
        import signal
        self.seen = False
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:          # not the main thread: leave signals alone
            self.previous = None

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __call__(self) -> bool:
        return self.seen

    def restore(self) -> None:
        import signal
        if self.previous is not None:
            try:
                signal.signal(signal.SIGINT, self.previous)
            except (ValueError, TypeError):
                pass


def _watch_sigint() -> _SigintWatch:
    return _SigintWatch()


def _first_missing(path: Path) -> Path | None:
    """The top-most folder/file of ``path`` that does not exist yet (what creating ``path`` would add)."""
    top = None
    p = path
    while not (p.exists() or p.is_symlink()):
        top = p
        if p.parent == p:
            break
        p = p.parent
    return top


def _writable_ancestor(path: Path, option: str) -> None:
    """Refuse an output below a file or inside a folder that cannot be written, before any work."""
    p = path.parent
    while not p.exists():
        if p.is_symlink():      # a dangling link
            raise ConfigError(f"{option} {path}: {p} is a broken symbolic link")
        if p.parent == p:
            return
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{option} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: no permission to write in {p} (choose another {option})")


def claim_output(path, *, option: str = "--out", kind: str = "file", overwrite: bool = False,
                 allow_existing: bool = False, hint: str = "") -> Path:
    """Check an output path before the work and register it for clean-up on failure.

    Parameters
    ----------
    path : str or os.PathLike
        The output file or folder.
    option : str
        The option that named it (for messages), e.g. ``"--out"``.
    kind : {"file", "dir"}
        A file (an existing file is refused unless ``overwrite``; a folder there is refused) or a folder (an
        existing non-empty folder is refused unless ``overwrite``; an empty one is fine; a file there is refused).
    overwrite : bool
        The user asked to replace an existing output (``--overwrite``).
    allow_existing : bool
        Accept an existing non-empty output without ``overwrite`` (``--resume``).
    hint : str
        Appended to the refusal (what else the user can do, e.g. ``"--resume to continue it"``).

    Returns the path. An output that did not exist (and every folder made for it) is removed again if the
    wrapped command fails or is interrupted.
    """
    path = Path(path)
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    extra = f", {hint}" if hint else ""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{option} {path}: a broken symbolic link; remove it or choose another {option}")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{option} {path}: is a folder; give a file name")
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"{option} {path}: is a file, not a folder; choose another {option}")
        non_empty = path.is_file() or any(path.iterdir())
        if non_empty and not (overwrite or allow_existing):
            raise ConfigError(f"{option} {path}: exists already and would be overwritten; pass --overwrite to "
                              f"replace it or choose another {option}{extra}")
        target = path if path.is_dir() else path.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path}: no permission to write there (choose another {option})")
        if kind == "file" and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
            raise ConfigError(f"{option} {path}: the file is read-only")
        if non_empty and overwrite and _claims:
            replace_output(path)
    if not path.exists():
        _writable_ancestor(path, option)
        top = _first_missing(path)
        if top is not None and _claims:
            _claims[-1].append(top)
    return path


def replace_output(path) -> None:
    """Make room for a new version of the existing output ``path`` (``--overwrite``).

    Inside a wrapped command the old version is moved to a hidden sibling ``.NAME.replaced-PID`` and put back if
    the command fails or is interrupted (deleted when it succeeds); outside one (library use) it is deleted now.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not _asides:
        _remove(path)
        return
    n = 0
    while True:
        backup = path.with_name(f".{path.name}.replaced-{os.getpid()}" + (f"-{n}" if n else ""))
        if not (backup.exists() or backup.is_symlink()):
            break
        n += 1
    path.rename(backup)
    _asides[-1].append((path, backup))


def forget_output(path) -> None:
    """Keep ``path`` even if the command fails from now on (e.g. a checkpoint worth resuming)."""
    path = Path(path)
    if _claims:
        _claims[-1][:] = [p for p in _claims[-1] if p != path and path not in p.parents and p not in path.parents]
    if _asides:         # the new output is kept: what it replaced goes now
        keep = [(o, b) for o, b in _asides[-1] if o != path and path not in o.parents and o not in path.parents]
        _drop([a for a in _asides[-1] if a not in keep])
        _asides[-1][:] = keep
