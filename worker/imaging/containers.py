"""Was a damaged image file cut short? Read from its container structure, not from decoder messages.

Decoders say "truncated" only when they run out of data inside pixel data. A file cut inside its
headers fails earlier, with whatever the parser says ("cannot identify image file"), which would
make it ``corrupt``. The container formats declare their own sizes, so a cut is visible: a RIFF
(WebP) size past the end, an ISO-BMFF (AVIF/HEIF) box or a JPEG/PNG segment running past the end,
a TIFF directory or strip starting past it, a GIF ending before its colour table or without its
trailer. :func:`cut_short` is asked only after a decoder failed: a whole file is never judged by it.
"""

from __future__ import annotations

import struct

__all__ = ["cut_short"]


def cut_short(data: bytes) -> bool:
    """True when ``data`` is a recognised container that declares more bytes than it has."""
    for check in (_riff, _isobmff, _tiff, _gif, _jpeg, _png):
        verdict = check(data)
        if verdict is not None:
            return verdict
    return False


def _riff(data: bytes) -> bool | None:
    if data[:4] != b"RIFF":
        return None
    return len(data) < 8 or int.from_bytes(data[4:8], "little") + 8 > len(data)


def _isobmff(data: bytes) -> bool | None:
    """AVIF/HEIF: top-level boxes (size, type[, 64-bit size]) must tile the file."""
    if data[4:8] != b"ftyp":
        return None
    if b"mdat" not in data:  # the coded picture never arrived (cut at a box boundary)
        return True
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            return True
        size = int.from_bytes(data[pos : pos + 4], "big")
        if size == 1:
            if pos + 16 > len(data):
                return True
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:  # the last box, to the end of the file
            return False
        if size < 8:
            return False  # not a size at all: damaged, not cut
        pos += size
    return pos > len(data)


#: bytes per value of each TIFF field type
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def _tiff(data: bytes) -> bool | None:
    """TIFF: the first directory, and the strips or tiles it names, must lie inside the file."""
    if data[:4] == b"II*\0":
        order = "<"
    elif data[:4] == b"MM\0*":
        order = ">"
    else:
        return None
    if len(data) < 8:
        return True
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return True
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    if ifd + 2 + 12 * count + 4 > len(data):  # the entries and the next directory's offset
        return True
    fields: dict[int, list[int]] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        width = _TIFF_TYPE_SIZES.get(kind)
        if width is None:
            continue
        # a value of up to 4 bytes lies in the entry itself, a longer one where the entry points
        at = ifd + 10 + 12 * i if n * width <= 4 else struct.unpack(order + "I", entry[8:12])[0]
        if at + n * width > len(data):
            return True  # a value stored past the end (BitsPerSample, resolutions, offsets …)
        if kind in (3, 4) and tag in (273, 279, 324, 325):  # strip/tile offsets and byte counts
            fields[tag] = list(struct.unpack(f"{order}{n}{'H' if kind == 3 else 'I'}", data[at : at + n * width]))
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = fields.get(offsets_tag, []), fields.get(counts_tag, [])
        if any(o + c > len(data) for o, c in zip(offsets, counts, strict=False)):
            return True
    return False


def _gif(data: bytes) -> bool | None:
    """GIF: the header and global colour table must be there, and the file ends with its trailer."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    if len(data) < 13:
        return True
    flags = data[10]
    table = 3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0
    return len(data) < 13 + table or not data.rstrip(b"\0").endswith(b";")


def _jpeg(data: bytes) -> bool | None:
    """JPEG: the marker segments before the scan data must lie inside the file."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= len(data):
            return True
        marker = data[pos]
        if marker == 0xD9:  # EOI before any scan: nothing cut, nothing to show
            return False
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 1
            continue
        if pos + 3 > len(data):
            return True
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        if length < 2:
            return False
        if pos + 1 + length > len(data):
            return True
        if marker == 0xDA:  # start of scan: entropy-coded data follows, up to the end-of-image marker
            return data.find(b"\xff\xd9", pos + 1 + length) < 0
        pos += 1 + length
        if pos < len(data) and data[pos] != 0xFF:
            return False  # not a marker where one must be: damaged, not cut


def _png(data: bytes) -> bool | None:
    """PNG: chunks (length, type, data, CRC) must tile the file up to IEND."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while True:
        if pos + 8 > len(data):
            return True
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IEND":
            return False
        pos += 12 + length
        if pos > len(data):
            return True
