"""Integer label images in TIFF (tifffile) plus a cell-type map.

* A 2-D image ``(H, W)`` is one frame; a 3-D stack ``(frames, H, W)`` is a time series of one lattice.
  With ``ndim=3`` (3-D lattices) a ``(D, H, W)`` image is one frame and ``(frames, D, H, W)`` a series
  (the frame/slice split comes from tifffile's shape metadata or ImageJ's frames/slices; without it all
  pages form one 3-D frame).
* 2-D time series or 3-D volume: a TIFF does not say which by its shape alone, so the caller says it
  (``ndim``; ``--dim 3`` on the command lines). Where the file's metadata does say it — ImageJ ``slices`` /
  ``frames``, OME ``SizeZ`` / ``SizeT`` — a contradiction is an error naming both (a z-stack read with
  ``ndim=2``, a time series read with ``ndim=3``).
* Voxel size: the lattice is isotropic (one site = one cube). When the metadata gives the physical voxel size
  (ImageJ ``spacing`` with the X/YResolution tags, OME ``PhysicalSizeX/Y/Z``) and it is anisotropic, reading
  stops with an error naming the sizes — resample to cubic voxels first, or pass ``anisotropic="ignore"`` to
  treat each voxel as one lattice site anyway.
* Pixel values are cell ids (0 = medium), any integer dtype; integral float images are accepted.
  Interleaved colour images (RGB, axes ``YXS``) are refused; planar samples (``SYX``, which tifffile writes
  for a plain ``(3, H, W)`` stack unless ``photometric="minisblack"``) are read as frames.
* Cell types come from a type map (see :mod:`.typemap`): the ``types=`` argument or the sidecar
  ``<stem>.types.json`` / ``<stem>.types.csv``. One type map serves every frame of the file.

:func:`save_tiff` writes the stack as int32 (or uint16 when the ids fit) plus ``<stem>.types.json``.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile

from ..errors import DataError
from ..lattice import CellState
from .typemap import states_from_labels, write_type_map

__all__ = ["read_tiff", "save_tiff"]

MAX_SITES = 2 ** 30
"""Largest number of pixels (all frames) a TIFF may declare; larger images are refused before reading."""

# what tifffile raises on corrupt or unsupported files besides TiffFileError (found by fuzzing): ValueError,
# struct.error, IndexError, KeyError for bad tag values/offsets, TypeError for a tag with an unexpected count
# (e.g. a tuple where tifffile expects one number), zlib.error / EOFError for corrupt compressed strips,
# NotImplementedError for unsupported compressions, OverflowError for absurd sizes
_TIFF_ERRORS = (ValueError, struct.error, IndexError, KeyError, TypeError, OverflowError, EOFError,
                NotImplementedError, zlib.error)


def read_tiff(path, *, types=None, n_types: int | None = None, ndim: int = 2,
              anisotropic: str = "error") -> list[CellState]:
    """Read a TIFF label image or stack → states (one per frame).

    Parameters
    ----------
    path : str or PathLike
    types : type map (dict ``{id: type}``, per-id table, one int, or a JSON/CSV file); default: the sidecar
        ``<stem>.types.json|csv``.
    n_types : int, optional
        Declared number of biological types (checked).
    ndim : 2 or 3
        Lattice dimension: 2 → ``(H, W)`` or ``(frames, H, W)``; 3 → ``(D, H, W)`` or ``(frames, D, H, W)``.
    anisotropic : "error" or "ignore"
        What to do when the metadata gives a non-cubic voxel (non-square pixel) size: stop with an error
        naming it (default), or read each voxel as one lattice site.
    """
    path = Path(path)
    if ndim not in (2, 3):
        raise DataError(f"ndim must be 2 or 3, got {ndim}", path=path)
    if anisotropic not in ("error", "ignore"):
        raise DataError(f"anisotropic must be 'error' or 'ignore', got {anisotropic!r}", path=path)
    shape = None
    info: dict = {}
    try:
        with tifffile.TiffFile(path) as tif:
            # page by page (not tif.series: its generic series detection can loop forever on corrupt files)
            pages = tif.pages
            n = len(pages)
            if n == 0:
                raise DataError("the TIFF file holds no image", path=path)
            first = pages[0]
            pshape, axes = tuple(first.shape), first.axes
            if first.dtype is None:
                raise DataError("unsupported pixel format (sample format / bits per sample)", path=path)
            dtype = np.dtype(first.dtype)
            if not pshape or 0 in pshape:
                raise DataError(f"empty image of shape {pshape}", path=path)
            for i in range(1, n):
                pg = pages[i]
                if tuple(pg.shape) != pshape or pg.dtype != first.dtype:
                    raise DataError(f"page {i} has shape {tuple(pg.shape)} and pixel type {pg.dtype} but page 0 has "
                                    f"{pshape} and {dtype}; a label stack needs pages of one size and type",
                                    path=path)
            shape = (n, *pshape) if n > 1 else pshape
            if axes.endswith("S") and pshape[-1] > 1:
                raise DataError(f"a colour (RGB) image of shape {shape} (axes {axes}); a label image has one integer "
                                "channel of cell ids", path=path)
            # planar samples (axes "SYX") are read as an ordinary leading axis: tifffile stores a plain
            # (3, H, W) or (4, H, W) stack that way unless photometric="minisblack" is given
            if dtype == bool or dtype.kind not in "iuf":
                raise DataError(f"cell ids must be integers, got pixel type {dtype}", path=path)
            if int(np.prod(shape, dtype=np.float64)) > MAX_SITES:
                raise DataError(f"the image of shape {shape} is larger than the limit of {MAX_SITES} pixels",
                                path=path)
            arr = np.stack([pages[i].asarray() for i in range(n)]) if n > 1 else first.asarray()
            if len(pshape) == 2:
                arr = _metadata_shape(tif, arr)
            info = _geometry_metadata(tif)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except tifffile.TiffFileError as e:
        raise DataError(f"not a readable TIFF file ({e})", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the TIFF file ({e})", path=path) from None
    except MemoryError:
        raise DataError(f"the image of shape {shape} does not fit in memory", path=path) from None
    except _TIFF_ERRORS as e:
        raise DataError(f"corrupt TIFF file ({type(e).__name__}: {e})", path=path) from None
    _check_geometry(info, ndim, anisotropic, path)
    arr = np.asarray(arr)
    # drop singleton axes that are not lattice axes (e.g. ImageJ's T/Z/C of length 1)
    while arr.ndim > ndim + 1 and 1 in arr.shape[: arr.ndim - ndim]:
        arr = arr.squeeze(axis=arr.shape.index(1))
    if arr.ndim == ndim:
        arr = arr[None]
    if arr.ndim != ndim + 1:
        want = "(H, W) or (frames, H, W)" if ndim == 2 else "(D, H, W) or (frames, D, H, W)"
        raise DataError(f"wrong number of dimensions: image of shape {tuple(arr.shape)}, expected {want}", path=path)
    if min(arr.shape) == 0:
        raise DataError(f"empty image of shape {tuple(arr.shape)}", path=path)
    return states_from_labels(arr, types, path=path, n_types=n_types, meta={"format": "tiff"})


def _geometry_metadata(tif) -> dict:
    """What the file's metadata says about z-slices, time frames and the physical voxel size (best effort;
    keys absent when unknown): ``slices``, ``frames``, ``size`` = (x, y[, z]) with ``unit`` and ``source``."""
    import re

    out: dict = {}
    try:
        ome = tif.ome_metadata if tif.is_ome else None
    except Exception:  # noqa: BLE001 - metadata is optional
        ome = None
    if ome:
        m = re.search(r"<(?:\w+:)?Pixels\b([^>]*)>", ome)
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}
        try:
            if "SizeZ" in attrs:
                out["slices"] = int(attrs["SizeZ"])
            if "SizeT" in attrs:
                out["frames"] = int(attrs["SizeT"])
            if "PhysicalSizeX" in attrs and "PhysicalSizeY" in attrs:
                size = [float(attrs["PhysicalSizeX"]), float(attrs["PhysicalSizeY"])]
                if "PhysicalSizeZ" in attrs:
                    size.append(float(attrs["PhysicalSizeZ"]))
                out.update(size=tuple(size), unit=attrs.get("PhysicalSizeXUnit", "µm"),
                           source="OME PhysicalSizeX/Y/Z")
        except ValueError:
            pass
        return out
    try:
        ij = tif.imagej_metadata
    except Exception:  # noqa: BLE001
        ij = None
    if ij:
        for k in ("slices", "frames"):
            if ij.get(k) is not None:
                try:
                    out[k] = int(ij[k])
                except (TypeError, ValueError):
                    pass
        page = tif.pages[0]
        xr, yr = page.tags.get("XResolution"), page.tags.get("YResolution")
        try:
            if xr is not None and yr is not None and ij.get("spacing") is not None:
                px = float(xr.value[1]) / float(xr.value[0])
                py = float(yr.value[1]) / float(yr.value[0])
                out.update(size=(px, py, float(ij["spacing"])), unit=str(ij.get("unit", "units")),
                           source="ImageJ spacing and the X/YResolution tags")
        except (TypeError, ValueError, ZeroDivisionError, IndexError):
            pass
    return out


def _check_geometry(info: dict, ndim: int, anisotropic: str, path) -> None:
    slices, frames = info.get("slices", 1), info.get("frames", 1)
    if ndim == 2 and slices > 1:
        raise DataError(f"the TIFF metadata says this is a 3-D volume ({slices} z-slices, {frames} time "
                        "frame(s)); read it as 3-D: ndim=3 (load_states / read_tiff), --dim 3 on the command lines",
                        path=path)
    if ndim == 3 and frames > 1 and slices <= 1:
        raise DataError(f"the TIFF metadata says this is a 2-D time series ({frames} frames, 1 z-slice), not a 3-D "
                        "volume; read it with ndim=2 (the default)", path=path)
    size = info.get("size")
    if size is None or anisotropic == "ignore":
        return
    size = size[:ndim] if ndim == 2 else size
    if len(size) >= 2 and not np.allclose(size, size[0], rtol=1e-6, atol=0):
        names = "x, y, z" if len(size) == 3 else "x, y"
        raise DataError(f"anisotropic voxels: {names} size {', '.join(f'{v:g}' for v in size)} {info.get('unit', '')} "
                        f"({info['source']}); the CPM lattice is isotropic (one site = one cube): resample the "
                        "volume to cubic voxels first, or pass anisotropic='ignore' to read each voxel as one site",
                        path=path)


def _metadata_shape(tif, arr: np.ndarray) -> np.ndarray:
    """Pages ``(n, H, W)`` (or one page) → the array shape recorded in tifffile's or ImageJ's metadata, when consistent.

    tifffile writes one 2-D page per image plus the full shape as JSON; ImageJ hyperstacks record
    frames/slices/channels. Without (consistent) metadata the pages are returned as they are.
    """
    shaped = tif.shaped_metadata
    if shaped and len(shaped) == 1 and isinstance(shaped[0], dict):
        want = tuple(int(x) for x in shaped[0].get("shape", ()))
        if len(want) >= 2 and int(np.prod(want)) == arr.size:
            return arr.reshape(want)
    ij = tif.imagej_metadata
    if ij and arr.ndim == 3:
        tzc = tuple(int(ij.get(k, 1) or 1) for k in ("frames", "slices", "channels"))
        if min(tzc) >= 1 and int(np.prod(tzc)) == arr.shape[0]:
            if tzc[2] == 1:   # no channel axis: (frames, slices, H, W), the lattice axes last
                tzc = tzc[:2]
            return arr.reshape(*tzc, *arr.shape[1:])
    return arr


def save_tiff(path, states, *, type_map_path=None) -> tuple[Path, Path]:
    """Write states as a TIFF label stack plus a JSON type map; return ``(tiff path, type map path)``.

    One state → a single image ``(H, W)``; several → a stack ``(frames, H, W)``. Every cell id must have one
    type in all states (one type map serves the file). The type map goes to ``type_map_path`` or the sidecar
    ``<stem>.types.json``. Both files are written to temporary siblings and renamed into place.
    """
    path = Path(path)
    if isinstance(states, CellState):
        states = [states]
    states = list(states)
    if not states:
        raise DataError("no states to write", path=path)
    shapes = {s.shape for s in states}
    if len(shapes) > 1:
        raise DataError(f"states of mixed lattice sizes cannot share one TIFF stack: {sorted(shapes)}", path=path)
    mapping: dict[int, int] = {}
    first: dict[int, int] = {}
    for f, s in enumerate(states):
        for c in s.cell_ids().tolist():
            t = int(s.types[c])
            if c in mapping and mapping[c] != t:
                raise DataError(f"cell {c} has type {mapping[c]} in frame {first[c]} and type {t} in frame {f}; "
                                "one TIFF file has one type map", path=path)
            mapping.setdefault(c, t)
            first.setdefault(c, f)
    stack = np.stack([s.ids for s in states])
    stack = stack.astype(np.uint16 if stack.max() <= np.iinfo(np.uint16).max else np.int32)
    if len(states) == 1:
        stack = stack[0]
    if type_map_path is None:
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        type_map_path = path.with_name(stem + ".types.json")
    type_map_path = Path(type_map_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tifffile.imwrite(tmp, stack, photometric="minisblack")
        write_type_map(type_map_path, mapping)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path, type_map_path
