# cython: language_level=3
"""Pulsar's stored entries, decoded in compiled code: how a bootstrap reads
offloaded ledgers without the broker.

An offloaded ledger is two objects (``tiered-storage-jcloud`` in Pulsar 4.0,
``BlobStoreManagedLedgerOffloader.offload``): ``<uuid>-ledger-<id>``, the
data, and ``<uuid>-ledger-<id>-index``. Every number is big-endian (Java).
The data object is a run of blocks, one multipart-upload part each::

    block   magic 0xFBDBABCB (4) | header length (8) | block length (8) |
            first entry id (8) | zeros to the header length (128 bytes)
            then entries: length (4) | entry id (8) | the entry's bytes
            then 0xFEDCDEAD repeated to the block length
    index   magic 0xDE47DE47 (4) | index length (4) | data object length (8) |
            block header length (8) | blocks (4) | ledger metadata length (4) |
            ledger metadata (BookKeeper's LedgerMetadataFormat protobuf) |
            per block: first entry id (8) | part id (4) | offset in the data (8)

An entry's bytes are what the broker stored for one publish::

    [0x0e02 | length (4) | BrokerEntryMetadata]   if the broker adds it
    [0x0e01 | CRC-32C (4)]                         of everything after it
    metadata length (4) | MessageMetadata | payload

A batch's payload (``num_messages_in_batch`` set) is, once decompressed, one
``length (4) | SingleMessageMetadata | payload`` per message. Only the
metadata fields a reader needs are decoded, by a small protobuf field walker:
no generated protobuf code on the hot path.

What the decoder gives is what a consumer would: the payloads in log order,
each message's publish and event time, and its position (entry, batch
index). As on the broker path, a malformed entry is counted with a reason
and left out; messages a consumer never sees (markers, messages compacted
out of a batch) are skipped. Entries a consumer sees only with the broker's
help -- encrypted, chunked or transactional ones -- raise ``NeedsBroker``:
the reader reads that part of history through the broker instead.
"""
import struct

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

from tally.core.errors import TallyError

cnp.import_array()

cdef extern from "tally_crc32c.h":
    void tally_crc32c_init() noexcept nogil
    uint32_t tally_crc32c(const uint8_t* data, size_t n) noexcept nogil

tally_crc32c_init()

BLOCK_MAGIC = 0xFBDBABCB
INDEX_MAGIC = 0xDE47DE47
cdef enum:
    ENTRY_HEADER = 12                      # length (4) + entry id (8)
ENTRY_HEADER_BYTES = ENTRY_HEADER
cdef uint32_t PADDING_WORD = 0xFEDCDEAD
cdef int MAGIC_CRC32C = 0x0e01
cdef int MAGIC_BROKER_ENTRY_METADATA = 0x0e02

# A batch decompresses to at most the broker's largest message (5 MiB by
# default); a bigger recorded size is a corrupt entry, not an allocation to try.
MAX_UNCOMPRESSED_BYTES = 256 << 20
# MessageMetadata.compression (PulsarApi.proto): the codec of each, by name
COMPRESSIONS = {0: "none", 1: "lz4", 2: "zlib", 3: "zstd", 4: "snappy"}

# decode_entries' stop reasons
cdef enum:
    _NEED_MORE = 0       # the next entry is not all in the buffer yet
    _BLOCK_END = 1       # the block's padding (or its end) is reached
    _PAST_LAST = 2       # an entry beyond the last one asked for is next
NEED_MORE, BLOCK_END, PAST_LAST = _NEED_MORE, _BLOCK_END, _PAST_LAST


class EntryFormatError(TallyError, ValueError):
    """An object does not hold what an offloaded ledger's objects hold."""


class NeedsBroker(TallyError, RuntimeError):
    """An entry that only the broker can turn into messages (encrypted,
    chunked, transactional): read this history through the broker."""


# --------------------------------------------------------------------------
# The objects' headers (small, read once per block or ledger)


def parse_index(data):
    """``(blocks, data_length, last_entry)`` of an index object: ``blocks`` is
    a list of ``(first entry id, offset in the data object)``, in order."""
    if len(data) < 32:
        raise EntryFormatError(f"an index object of {len(data)} bytes is too short")
    magic, _, data_length, _, n_blocks, metadata_length = struct.unpack_from(">IIqqii", data)
    if magic != INDEX_MAGIC:
        raise EntryFormatError(f"not an offload index (magic {magic:#x}, expected "
                               f"{INDEX_MAGIC:#x})")
    start = 32 + metadata_length
    if n_blocks < 1 or len(data) < start + 20 * n_blocks:
        raise EntryFormatError(f"index object truncated: {n_blocks} blocks in {len(data)} bytes")
    last_entry = _ledger_last_entry(bytes(data[32:start]))
    blocks = [struct.unpack_from(">qiq", data, start + 20 * i) for i in range(n_blocks)]
    return [(first, offset) for first, _, offset in blocks], data_length, last_entry


def _ledger_last_entry(metadata):
    """LedgerMetadataFormat.lastEntryId (field 4), -1 if absent."""
    cdef const uint8_t[::1] view = metadata
    cdef Py_ssize_t n = len(metadata)
    if n == 0:
        return -1
    cdef const uint8_t* p = &view[0]
    cdef const uint8_t* end = p + n
    cdef uint64_t tag, value
    while p < end:
        if _varint(&p, end, &tag) < 0:
            break
        if tag == (4 << 3):
            if _varint(&p, end, &value) < 0:
                break
            return <int64_t>value
        if _skip(&p, end, <int>(tag & 7)) < 0:
            break
    return -1


def parse_block_header(data, Py_ssize_t at=0):
    """``(header length, block length, first entry id)`` of the block at ``at``."""
    if len(data) < at + 28:
        raise EntryFormatError("a data block header is cut short")
    magic, header_length, block_length, first_entry = struct.unpack_from(">Iqqq", data, at)
    if magic != BLOCK_MAGIC:
        raise EntryFormatError(f"not a data block (magic {magic:#x}, expected {BLOCK_MAGIC:#x})")
    return header_length, block_length, first_entry


# --------------------------------------------------------------------------
# What the decoder gives


cdef class _Int64s:
    """A growing int64 array."""
    cdef int64_t* data
    cdef Py_ssize_t n, capacity

    def __dealloc__(self):
        free(self.data)

    cdef inline int push(self, int64_t value) except -1:
        cdef int64_t* grown
        if self.n == self.capacity:
            self.capacity = max(1024, 2 * self.capacity)
            grown = <int64_t*>realloc(self.data, self.capacity * sizeof(int64_t))
            if grown == NULL:
                raise MemoryError()
            self.data = grown
        self.data[self.n] = value
        self.n += 1
        return 0

    cdef object take(self):
        """The values as a numpy array; empties this one."""
        out = np.empty(self.n, np.int64)
        if self.n:
            memcpy(cnp.PyArray_DATA(out), self.data, self.n * sizeof(int64_t))
        self.n = 0
        return out


cdef class Messages:
    """The messages decoded so far: payloads (``bytes``, log order) with each
    one's publish time, event time (0 if its producer set none), entry id and
    batch index (-1 outside a batch); ``malformed``: entries left out, by
    reason; ``entries``: how many entries were decoded in all. ``take()``
    hands the messages over and starts afresh."""
    cdef public list payloads
    cdef public dict malformed
    cdef public Py_ssize_t entries
    cdef public bint verify_checksums
    cdef _Int64s publish_times, event_times, entry_ids, batch_indexes
    cdef object decompress

    def __init__(self, verify_checksums=True):
        self.payloads, self.malformed, self.entries = [], {}, 0
        self.verify_checksums = verify_checksums
        self.publish_times, self.event_times = _Int64s(), _Int64s()
        self.entry_ids, self.batch_indexes = _Int64s(), _Int64s()
        self.decompress = _Codecs()

    def __len__(self):
        return len(self.payloads)

    def take(self):
        """``(payloads, times, malformed)``: times holds ``publish_time``,
        ``event_time``, ``entry`` and ``batch_index`` arrays; ``malformed``
        counts the entries left out since the last take, by reason."""
        payloads, self.payloads = self.payloads, []
        malformed, self.malformed = self.malformed, {}
        times = {"publish_time": self.publish_times.take(),
                 "event_time": self.event_times.take(),
                 "entry": self.entry_ids.take(), "batch_index": self.batch_indexes.take()}
        return payloads, times, malformed

    cdef int emit(self, const uint8_t* payload, Py_ssize_t n, int64_t publish_time,
                  int64_t event_time, int64_t entry, int64_t batch_index) except -1:
        self.payloads.append(PyBytes_FromStringAndSize(<const char*>payload, n))
        self.publish_times.push(publish_time)
        self.event_times.push(event_time)
        self.entry_ids.push(entry)
        self.batch_indexes.push(batch_index)
        return 0

    cdef void refuse(self, str reason):
        self.malformed[reason] = self.malformed.get(reason, 0) + 1


class _Codecs:
    """Pulsar's compression codecs (cramjam's: LZ4 blocks, zlib streams,
    zstd frames, raw Snappy), each decompressing into a scratch buffer of the
    size the producer recorded. The ``_into`` forms say how many bytes they
    wrote (the others pad their output to the size asked for), so a short
    payload is caught."""

    def __init__(self):
        import cramjam
        self.codecs = {1: cramjam.lz4.decompress_block_into, 2: cramjam.zlib.decompress_into,
                       3: cramjam.zstd.decompress_into, 4: cramjam.snappy.decompress_raw_into}
        self.scratch = bytearray()

    def __call__(self, int codec, data, Py_ssize_t size):
        """A memoryview of the decompressed bytes, valid until the next call."""
        if len(self.scratch) < size:
            self.scratch = bytearray(max(size, 2 * len(self.scratch)))
        written = self.codecs[codec](data, memoryview(self.scratch)[:size])
        if written != size:
            raise ValueError(f"decompressed to {written} bytes, not the {size} recorded")
        return memoryview(self.scratch)[:size]


# --------------------------------------------------------------------------
# Decoding a block's entries


def decode_entries(data, Py_ssize_t at, Py_ssize_t block_end, int64_t first_entry,
                   int64_t last_entry, Messages out not None):
    """Decode the entries of ``data`` from ``at`` (an entry header in a data
    block whose end is at ``block_end``, which may lie past the buffer) into
    ``out``: those with ids ``first_entry..last_entry``. Returns ``(at,
    stop)``: where decoding stopped and why (``NEED_MORE``, ``BLOCK_END`` or
    ``PAST_LAST``)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _decode_entries(<const uint8_t*>view.buf, view.len, at, block_end,
                               first_entry, last_entry, out)
    finally:
        PyBuffer_Release(&view)


cdef tuple _decode_entries(const uint8_t* buf, Py_ssize_t n, Py_ssize_t at,
                           Py_ssize_t block_end, int64_t first_entry, int64_t last_entry,
                           Messages out):
    cdef Py_ssize_t end = min(n, block_end)
    cdef uint32_t length
    cdef int64_t entry
    while True:
        if at + ENTRY_HEADER > block_end:
            return at, _BLOCK_END
        if at + ENTRY_HEADER > end:
            return at, _NEED_MORE
        length = _be32(buf + at)
        if length == PADDING_WORD:
            return at, _BLOCK_END
        if at + ENTRY_HEADER + length > block_end:
            raise EntryFormatError(f"an entry of {length} bytes at offset {at} runs past "
                                   f"its block's end ({block_end})")
        if at + ENTRY_HEADER + length > end:
            return at, _NEED_MORE
        entry = <int64_t>_be64(buf + at + 4)
        if entry > last_entry:
            return at, _PAST_LAST
        if entry >= first_entry:
            out.entries += 1
            _decode_entry(buf + at + ENTRY_HEADER, length, entry, out)
        at += ENTRY_HEADER + length


cdef struct EntryMetadata:
    int64_t publish_time
    int64_t event_time
    int64_t compression
    int64_t uncompressed_size
    int64_t num_messages          # -1: not a batch
    int needs_broker              # encrypted, chunked or transactional
    int marker


cdef struct SingleMetadata:
    int64_t payload_size          # -1: missing
    int64_t event_time            # -1: not set
    int compacted_out


cdef int _decode_entry(const uint8_t* p, Py_ssize_t n, int64_t entry, Messages out) except -1:
    cdef const uint8_t* end = p + n
    cdef uint32_t size
    cdef EntryMetadata meta
    if n >= 6 and _be16(p) == MAGIC_BROKER_ENTRY_METADATA:
        size = _be32(p + 2)
        if size > n - 6:
            out.refuse("broker entry metadata cut short")
            return 0
        p += 6 + size
    if end - p >= 6 and _be16(p) == MAGIC_CRC32C:
        if out.verify_checksums and tally_crc32c(p + 6, end - p - 6) != _be32(p + 2):
            out.refuse("checksum mismatch")
            return 0
        p += 6
    if end - p < 4:
        out.refuse("entry cut short")
        return 0
    size = _be32(p)
    p += 4
    if size > end - p or _message_metadata(p, p + size, &meta) < 0:
        out.refuse("malformed message metadata")
        return 0
    if meta.needs_broker:
        raise NeedsBroker(f"entry {entry} is encrypted, chunked or part of a transaction")
    if meta.marker:
        return 0                         # a broker marker: never given to consumers
    p += size
    if meta.compression == 0:
        return _emit_payload(p, end - p, &meta, entry, out)
    if meta.compression not in COMPRESSIONS:
        out.refuse(f"unknown compression {meta.compression}")
        return 0
    if meta.uncompressed_size > MAX_UNCOMPRESSED_BYTES:
        out.refuse(f"an uncompressed size of {meta.uncompressed_size} bytes")
        return 0
    try:
        plain = out.decompress(<int>meta.compression, PyBytes_FromStringAndSize(
            <const char*>p, end - p), meta.uncompressed_size)
    except Exception as error:
        out.refuse(f"cannot decompress ({COMPRESSIONS[meta.compression]}): {error}")
        return 0
    cdef Py_buffer view
    PyObject_GetBuffer(plain, &view, PyBUF_SIMPLE)
    try:
        return _emit_payload(<const uint8_t*>view.buf, view.len, &meta, entry, out)
    finally:
        PyBuffer_Release(&view)


cdef int _emit_payload(const uint8_t* p, Py_ssize_t n, EntryMetadata* meta, int64_t entry,
                       Messages out) except -1:
    """One message, or a batch's messages; a batch that does not parse is
    refused whole, as a consumer drops it."""
    cdef const uint8_t* end = p + n
    cdef const uint8_t* q
    cdef SingleMetadata single
    cdef uint32_t size
    cdef int64_t i, event_time
    if meta.num_messages < 0:
        return out.emit(p, n, meta.publish_time, meta.event_time, entry, -1)
    # check the whole batch before emitting any of it
    q = p
    for i in range(meta.num_messages):
        if end - q < 4 or _be32(q) > end - q - 4:
            out.refuse("batch cut short")
            return 0
        size = _be32(q)
        if _single_metadata(q + 4, q + 4 + size, &single) < 0 or single.payload_size < 0 \
                or single.payload_size > end - q - 4 - size:
            out.refuse("malformed message metadata in a batch")
            return 0
        q += 4 + size + single.payload_size
    for i in range(meta.num_messages):
        size = _be32(p)
        _single_metadata(p + 4, p + 4 + size, &single)
        p += 4 + size
        if not single.compacted_out:
            event_time = single.event_time if single.event_time >= 0 else meta.event_time
            out.emit(p, single.payload_size, meta.publish_time, event_time, entry, i)
        p += single.payload_size
    return 0


# --------------------------------------------------------------------------
# Protobuf, the few fields needed


cdef int _message_metadata(const uint8_t* p, const uint8_t* end,
                           EntryMetadata* meta) noexcept nogil:
    """MessageMetadata (PulsarApi.proto): 3 publish_time, 8 compression,
    9 uncompressed_size, 11 num_messages_in_batch, 12 event_time,
    13 encryption_keys, 20 marker_type, 22/23 txnid, 27 num_chunks_from_msg."""
    cdef uint64_t tag, value
    cdef int field, wire
    meta.publish_time = meta.event_time = meta.compression = meta.uncompressed_size = 0
    meta.num_messages = -1
    meta.needs_broker = meta.marker = 0
    while p < end:
        if _varint(&p, end, &tag) < 0:
            return -1
        field, wire = <int>(tag >> 3), <int>(tag & 7)
        if wire == 0 and field in (3, 8, 9, 11, 12, 20, 22, 23, 27):
            if _varint(&p, end, &value) < 0:
                return -1
            if field == 3:
                meta.publish_time = <int64_t>value
            elif field == 8:
                meta.compression = <int64_t>value
            elif field == 9:
                meta.uncompressed_size = <int64_t>value
            elif field == 11:
                meta.num_messages = <int32_t>value
            elif field == 12:
                meta.event_time = <int64_t>value
            elif field == 20:
                meta.marker = 1
            elif field == 27:
                meta.needs_broker = meta.needs_broker or value > 1
            else:
                meta.needs_broker = 1
        else:
            if field == 13:
                meta.needs_broker = 1
            if _skip(&p, end, wire) < 0:
                return -1
    return 0 if meta.num_messages != 0 else -1


cdef int _single_metadata(const uint8_t* p, const uint8_t* end,
                          SingleMetadata* meta) noexcept nogil:
    """SingleMessageMetadata: 3 payload_size, 4 compacted_out, 5 event_time."""
    cdef uint64_t tag, value
    cdef int field, wire
    meta.payload_size = meta.event_time = -1
    meta.compacted_out = 0
    while p < end:
        if _varint(&p, end, &tag) < 0:
            return -1
        field, wire = <int>(tag >> 3), <int>(tag & 7)
        if wire == 0 and 3 <= field <= 5:
            if _varint(&p, end, &value) < 0:
                return -1
            if field == 3:
                meta.payload_size = <int32_t>value
            elif field == 4:
                meta.compacted_out = value != 0
            else:
                meta.event_time = <int64_t>value
        elif _skip(&p, end, wire) < 0:
            return -1
    return 0


cdef inline int _varint(const uint8_t** at, const uint8_t* end, uint64_t* out) noexcept nogil:
    cdef const uint8_t* p = at[0]
    cdef uint64_t value = 0
    cdef int shift = 0
    while p < end and shift < 64:
        value |= (<uint64_t>(p[0] & 0x7F)) << shift
        if p[0] < 0x80:
            at[0] = p + 1
            out[0] = value
            return 0
        p += 1
        shift += 7
    return -1


cdef inline int _skip(const uint8_t** at, const uint8_t* end, int wire) noexcept nogil:
    cdef uint64_t length
    if wire == 0:
        return _varint(at, end, &length)
    if wire == 1:
        length = 8
    elif wire == 5:
        length = 4
    elif wire == 2:
        if _varint(at, end, &length) < 0:
            return -1
    else:
        return -1                          # groups: not in Pulsar's protocol
    if length > <uint64_t>(end - at[0]):
        return -1
    at[0] += length
    return 0


cdef inline uint32_t _be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


def crc32c(data):
    """The CRC-32C of ``data`` (the checksum Pulsar producers write)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return tally_crc32c(<const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
