"""Reading XML (and gzip-compressed XML) with size limits: Morpheus models and checkpoints, CC3D projects.

* the file on disk may hold at most :data:`MAX_XML_BYTES` bytes, and a gzip stream is decompressed in
  chunks and refused as soon as it passes :data:`MAX_XML_BYTES` (a 1 MB "zip bomb" cannot expand to 10 GB);
* lxml parses with ``huge_tree=False`` (its own limits on text nodes and nesting depth stay on), without
  resolving entities, loading DTDs or touching the network.

Errors are the caller's exception type (DataError for data readers, ModelImportError for model importers),
built by the ``error`` callable from a message that names the file and the limit.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from lxml import etree

__all__ = ["MAX_XML_BYTES", "parse_xml_bytes", "read_xml_bytes", "safe_parser"]

MAX_XML_BYTES = 2 ** 29     #: 512 MiB of XML text, compressed or not (a 400³ checkpoint is ~ 300 MB)
_CHUNK = 1 << 20


def safe_parser() -> etree.XMLParser:
    """An lxml parser with huge_tree off and no entity resolution, DTD loading or network access."""
    return etree.XMLParser(huge_tree=False, resolve_entities=False, load_dtd=False, no_network=True,
                           remove_comments=False)


def read_xml_bytes(path, error, *, limit: int | None = None, gz: bool | None = None) -> bytes:
    """The (decompressed) bytes of ``path``; ``error(message)`` builds the exception raised for an unreadable,
    too large or corrupt file. ``limit``: at most this many bytes (default :data:`MAX_XML_BYTES`); ``gz``: None =
    decide by the gzip magic bytes."""
    path = Path(path)
    limit = MAX_XML_BYTES if limit is None else int(limit)
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"the file is {size} bytes, more than the limit of {limit} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read ({e.strerror or e})") from None
    if gz is None:
        gz = data[:2] == b"\x1f\x8b"
    if not gz:
        return data
    return _gunzip(data, error, limit)


def _gunzip(data: bytes, error, limit: int) -> bytes:
    """Decompress every gzip member of ``data`` in chunks, refusing more than ``limit`` bytes of output."""
    out = bytearray()
    try:
        while data:
            d = zlib.decompressobj(wbits=31)
            for pos in range(0, len(data), _CHUNK):
                out += d.decompress(data[pos:pos + _CHUNK], limit + 1 - len(out))
                if len(out) > limit:
                    raise error(f"decompresses to more than the limit of {limit} bytes")
                if d.eof:
                    break
            if not d.eof:
                raise error("corrupt gzip data (truncated stream)")
            data = d.unused_data.lstrip(b"\0")     # a further member (rare), or padding
    except zlib.error as e:
        raise error(f"corrupt gzip data ({e})") from None
    return bytes(out)


def parse_xml_bytes(data: bytes, error):
    """The root element of ``data`` parsed with :func:`safe_parser`; ``error`` builds the syntax error."""
    try:
        return etree.fromstring(data, parser=safe_parser())
    except etree.XMLSyntaxError as e:
        raise error(f"not well-formed XML ({e})") from None
