"""tally.core.entries: Pulsar's stored entry format, decoded in C, against
entries and blocks built here byte by byte (a protobuf encoder and a bitwise
CRC-32C written out in Python as the oracles). Real offloaded objects from a
real broker are read in test_tiered_storage.py."""
import struct
import zlib

import cramjam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.core.entries import (BLOCK_END, NEED_MORE, PAST_LAST, EntryFormatError, Messages,
                                NeedsBroker, crc32c, decode_entries, parse_block_header,
                                parse_index)

# --------------------------------------------------------------------------
# Oracles


def crc32c_oracle(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number, value):
    """A protobuf field: ints as varints, bytes/str as length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def message_metadata(publish_time=1_700_000_000_000, event_time=None, compression=0,
                     uncompressed_size=None, batch=None, extra=None):
    fields = [field(1, "producer-a"), field(2, 7), field(3, publish_time),
              field(4, field(1, "k") + field(2, "v"))]          # a property
    if compression:
        fields += [field(8, compression), field(9, uncompressed_size)]
    if batch is not None:
        fields.append(field(11, batch))
    if event_time is not None:
        fields.append(field(12, event_time))
    fields += [field(number, value) for number, value in (extra or {}).items()]
    return b"".join(fields)


def entry_bytes(metadata, payload, checksum=True, broker_metadata=False):
    body = struct.pack(">I", len(metadata)) + metadata + payload
    if checksum:
        body = struct.pack(">HI", 0x0e01, crc32c_oracle(body)) + body
    if broker_metadata:
        extra = field(1, 1_700_000_000_123) + field(2, 42)       # broker_timestamp, index
        body = struct.pack(">HI", 0x0e02, len(extra)) + extra + body
    return body


def batch_payload(messages):
    """messages: (payload, single-metadata extra fields dict)."""
    out = b""
    for payload, extra in messages:
        single = field(3, len(payload)) + b"".join(field(n, v) for n, v in extra.items())
        out += struct.pack(">I", len(single)) + single + payload
    return out


def block(entries, first_entry, size=None):
    """A data block: header, (length, id, bytes) per entry, padding."""
    body = b"".join(struct.pack(">Iq", len(e), first_entry + i) + e
                    for i, e in enumerate(entries))
    size = size or 128 + len(body) + 7
    header = struct.pack(">Iqqq", 0xFBDBABCB, 128, size, first_entry).ljust(128, b"\0")
    padding = (b"\xfe\xdc\xde\xad" * (size // 4 + 1))[:size - 128 - len(body)]
    return header + body + padding


def decode(data, first=0, last=2**62, at=128, end=None, out=None):
    out = Messages() if out is None else out
    position, stop = decode_entries(data, at, len(data) if end is None else end, first, last,
                                    out)
    return out, position, stop


# --------------------------------------------------------------------------


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 5 + b"tail"
    for n in (0, 1, 7, 8, 9, 63, len(data)):
        assert crc32c(data[:n]) == crc32c_oracle(data[:n])


def test_single_messages_with_and_without_checksum_and_broker_metadata():
    entries = [entry_bytes(message_metadata(publish_time=10 + i, event_time=100 + i),
                           f"payload-{i}".encode(), checksum=i % 2 == 0,
                           broker_metadata=i == 2) for i in range(4)]
    out, _, stop = decode(block(entries, first_entry=5))
    assert stop == BLOCK_END
    payloads, times, _ = out.take()
    assert payloads == [b"payload-0", b"payload-1", b"payload-2", b"payload-3"]
    assert times["publish_time"].tolist() == [10, 11, 12, 13]
    assert times["event_time"].tolist() == [100, 101, 102, 103]
    assert times["entry"].tolist() == [5, 6, 7, 8]
    assert times["batch_index"].tolist() == [-1] * 4
    assert out.entries == 4 and _ == {}


def test_a_batch_gives_its_messages_and_skips_those_compacted_out():
    payload = batch_payload([(b"a", {5: 111}), (b"bb", {4: 1}), (b"", {9: 1}), (b"ccc", {})])
    entry = entry_bytes(message_metadata(publish_time=9, event_time=222, batch=4), payload)
    out, _, _ = decode(block([entry], first_entry=0))
    payloads, times, _ = out.take()
    assert payloads == [b"a", b"", b"ccc"]                       # b"": a null value
    assert times["batch_index"].tolist() == [0, 2, 3]
    # a message's own event time, else the batch's (as the Java client reads it)
    assert times["event_time"].tolist() == [111, 222, 222]
    assert times["publish_time"].tolist() == [9, 9, 9]


@pytest.mark.parametrize("codec,compress", [
    (1, lambda d: bytes(cramjam.lz4.compress_block(d, store_size=False))),
    (2, zlib.compress),
    (3, lambda d: bytes(cramjam.zstd.compress(d))),
    (4, lambda d: bytes(cramjam.snappy.compress_raw(d)))])
def test_every_compression(codec, compress):
    plain = batch_payload([(f"m{i}".encode() * 20, {}) for i in range(50)])
    entry = entry_bytes(message_metadata(compression=codec, uncompressed_size=len(plain),
                                         batch=50), compress(plain))
    out, _, _ = decode(block([entry], first_entry=0))
    assert out.take()[0] == [f"m{i}".encode() * 20 for i in range(50)]


def test_malformed_entries_are_counted_with_a_reason_and_the_rest_kept():
    good = entry_bytes(message_metadata(), b"good")
    corrupt = bytearray(entry_bytes(message_metadata(), b"corrupt"))
    corrupt[-1] ^= 0x01
    plain = batch_payload([(b"x" * 10, {})])
    wrong_size = entry_bytes(message_metadata(compression=1, uncompressed_size=len(plain) + 5,
                                              batch=1),
                             bytes(cramjam.lz4.compress_block(plain, store_size=False)))
    cut_batch = entry_bytes(message_metadata(batch=3), batch_payload([(b"only one", {})]))
    bad_protobuf = entry_bytes(b"\x0a\xff\xff\xff", b"x")
    out, _, stop = decode(block([good, bytes(corrupt), wrong_size, cut_batch, bad_protobuf,
                                 good], first_entry=0))
    assert stop == BLOCK_END
    payloads, _, malformed = out.take()
    assert payloads == [b"good", b"good"]
    assert out.entries == 6
    assert malformed["checksum mismatch"] == 1
    assert malformed["batch cut short"] == 1
    assert malformed["malformed message metadata"] == 1
    assert sum(malformed.values()) == 4
    assert any(reason.startswith("cannot decompress (lz4)") for reason in malformed)
    assert out.take()[2] == {}


def test_markers_are_skipped_and_broker_only_entries_ask_for_the_broker():
    marker = entry_bytes(message_metadata(extra={20: 1}), b"")
    out, _, _ = decode(block([marker, entry_bytes(message_metadata(), b"m")], first_entry=0))
    assert out.take()[0] == [b"m"]
    for extra in ({13: field(1, "key") + field(2, b"secret")},  # encryption_keys
                  {22: 1, 23: 2},                                # txnid
                  {27: 3}):                                      # num_chunks_from_msg
        with pytest.raises(NeedsBroker):
            decode(block([entry_bytes(message_metadata(extra=extra), b"x")], first_entry=0))


def test_entry_range_and_stops():
    entries = [entry_bytes(message_metadata(), str(i).encode()) for i in range(10)]
    data = block(entries, first_entry=100)
    out, position, stop = decode(data, first=103, last=106)
    assert stop == PAST_LAST and out.take()[0] == [b"3", b"4", b"5", b"6"]
    # a buffer ending inside an entry asks for more, and resumes where it stopped
    out = Messages()
    _, position, stop = decode(data[:position - 3], out=out, end=len(data))
    assert stop == NEED_MORE
    decode(data[position:], at=0, end=len(data) - position, out=out)
    assert out.take()[0] == [str(i).encode() for i in range(10)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=30), st.integers(1, 400))
def test_any_split_of_a_block_gives_the_same_messages(payloads, chunk):
    data = block([entry_bytes(message_metadata(), p) for p in payloads], first_entry=0)
    out, at, base = Messages(), 128, 0
    while True:               # feed it chunk by chunk, keeping the undecoded rest
        buffer = data[base:base + chunk + (at - base)]
        position, stop = decode_entries(buffer, at - base, len(data) - base, 0, 2**62, out)
        at = base + position
        if stop == BLOCK_END:
            break
        base, chunk = at, chunk + 50
    assert out.take()[0] == payloads


def test_headers_and_index():
    assert parse_block_header(block([], first_entry=7, size=256)) == (128, 256, 7)
    with pytest.raises(EntryFormatError):
        parse_block_header(b"\0" * 128)
    metadata = field(1, 1) + field(2, 1) + field(3, 999) + field(4, 41)   # lastEntryId 41
    blocks = [(0, 1, 0), (20, 2, 5000)]
    index = struct.pack(">IIqqii", 0xDE47DE47, 0, 9000, 128, 2, len(metadata)) + metadata \
        + b"".join(struct.pack(">qiq", *b) for b in blocks)
    assert parse_index(index) == ([(0, 0), (20, 5000)], 9000, 41)
    with pytest.raises(EntryFormatError):
        parse_index(index[:-5])
