"""A versioned binary container of named numpy arrays plus JSON metadata.

Arena sets, key indexes and checkpoints are saved in it. Layout (little-endian):

    offset  size  field
    0       8     magic  b"TALLYSNP"
    8       4     format version (uint32), currently 1
    12      4     header length H (uint32)
    16      H     header: UTF-8 JSON {"meta": ..., "arrays": [{"name", "dtype",
                  "shape", "offset", "nbytes", "crc32"}, ...]}
    ...           array data, each array at an offset aligned to 64 bytes
    end-16  4     CRC-32 of every byte before it
    end-12  4     reserved (0)
    end-8   8     end magic b"TALLYEND"

Loading checks both magics, the version, the total CRC and every array's
bounds before it returns anything: a truncated or corrupted snapshot is
refused with ``SnapshotError``, never half-loaded. Arrays are views on the
loaded buffer (no per-element work).
"""
import json
import os
import struct
import zlib

import numpy as np

from tally.core.errors import SnapshotError

MAGIC = b"TALLYSNP"
END_MAGIC = b"TALLYEND"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_SUFFIX = struct.Struct("<II8s")
_ALIGN = 64


def dumps(arrays, meta=None) -> bytes:
    """Serialise ``{name: ndarray}`` and JSON-able ``meta`` to bytes."""
    entries, blobs, offset = [], [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"snapshot: array {name!r} holds Python objects")
        data = array.tobytes()
        entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                        "offset": offset, "nbytes": len(data), "crc32": zlib.crc32(data)})
        padding = -len(data) % _ALIGN
        blobs.append(data + b"\0" * padding)
        offset += len(data) + padding
    header = json.dumps({"meta": meta or {}, "arrays": entries}).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    return body + _SUFFIX.pack(zlib.crc32(body), 0, END_MAGIC)


def loads(buffer):
    """Parse bytes from ``dumps``; returns ``(arrays, meta)``."""
    view = memoryview(buffer)
    if len(view) < _PREFIX.size + _SUFFIX.size:
        raise SnapshotError(f"snapshot truncated: {len(view)} bytes is shorter than "
                            "the fixed header and trailer")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise SnapshotError("not a Tally snapshot (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {version} is not supported "
                            f"(this build reads version {FORMAT_VERSION})")
    crc, _, end_magic = _SUFFIX.unpack_from(view, len(view) - _SUFFIX.size)
    if end_magic != END_MAGIC:
        raise SnapshotError("snapshot truncated: the end marker is missing")
    body = view[:len(view) - _SUFFIX.size]
    if zlib.crc32(body) != crc:
        raise SnapshotError("snapshot corrupted: checksum mismatch")
    data_start = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(view[_PREFIX.size:data_start]))
    except ValueError as error:
        raise SnapshotError(f"snapshot corrupted: unreadable header ({error})") from None
    arrays = {}
    for entry in header["arrays"]:
        start = data_start + entry["offset"]
        if start + entry["nbytes"] > len(body):
            raise SnapshotError(f"snapshot corrupted: array {entry['name']!r} runs past the end")
        array = np.frombuffer(body, dtype=np.dtype(entry["dtype"]),
                              count=entry["nbytes"] // np.dtype(entry["dtype"]).itemsize,
                              offset=start)
        arrays[entry["name"]] = array.reshape(entry["shape"])
    return arrays, header["meta"]


def save(path, arrays, meta=None):
    """Write atomically: a reader sees the old file or the new one, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(dumps(arrays, meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path):
    with open(path, "rb") as f:
        return loads(f.read())
