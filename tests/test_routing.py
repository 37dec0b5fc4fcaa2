"""Key routing: the C kernels of tally.core.routing against independent
oracles (Pulsar's own test vectors, MurmurHash3 and Java's String.hashCode
written out in Python here), and the fold's RoutingCheck against them."""
import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.core.definitions import DefinitionError, Entity, Feature, FeatureView, Source
from tally.core.routing import key_hashes, murmur3_32, partition_of, partitions_of
from tally.service.ingest.fold import RoutingCheck

source = Source("s", "s", {"user": "int64", "ts": "int64"})
view = FeatureView("v", Entity("user"), source, [Feature("n", "count")])
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ROUTED = ("murmur3", "java_string_hash", "go_java_string_hash")

# --------------------------------------------------------------------------
# Oracles, one key at a time

_M32 = 0xffffffff


def murmur3_oracle(data):
    """MurmurHash3 x86 32-bit, seed 0, after the SMHasher reference."""
    def mix(k):
        k = (k * 0xcc9e2d51) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        return (k * 0x1b873593) & _M32
    h, end = 0, len(data) - len(data) % 4
    for (k,) in struct.iter_unpack("<I", data[:end]):
        h ^= mix(k)
        h = ((h << 13) | (h >> 19)) & _M32
        h = (h * 5 + 0xe6546b64) & _M32
    if len(data) > end:
        h ^= mix(int.from_bytes(data[end:], "little"))
    h ^= len(data)
    for shift, factor in ((16, 0x85ebca6b), (13, 0xc2b2ae35)):
        h = ((h ^ (h >> shift)) * factor) & _M32
    return h ^ (h >> 16)


def java_hash_code(text):
    """java.lang.String.hashCode: s[0]*31^(n-1) + ... over UTF-16 code units, int32."""
    units = struct.unpack(f">{len(text.encode('utf-16-be')) // 2}H", text.encode("utf-16-be"))
    h = 0
    for unit in units:
        h = (31 * h + unit) & _M32
    return h - (1 << 32) if h >= 1 << 31 else h


def oracle_partition(key, n, routing):
    """The partition Pulsar's clients give: Java's signSafeMod(makeHash, n)
    with makeHash masked to 31 bits; Go's uint32 hash % n over the bytes."""
    text = str(key)
    if routing == "murmur3":
        return (murmur3_oracle(text.encode()) & 0x7fffffff) % n
    if routing == "java_string_hash":
        return (java_hash_code(text) & 0x7fffffff) % n
    h = 0
    for byte in text.encode():
        h = (31 * h + byte) & _M32
    return h % n


# --------------------------------------------------------------------------
# Known vectors


def test_murmur3_matches_published_vectors():
    # MurmurHash3_x86_32, seed 0 (the SMHasher reference implementation)
    for data, expected in ((b"", 0), (b"hello", 0x248bfa47),
                           (b"The quick brown fox jumps over the lazy dog", 0x2e4ff723),
                           (b"\x00\x00\x00\x00", 0x2362f9de), (b"\xff\xff\xff\xff", 0x76293b50)):
        assert murmur3_32(data) == murmur3_oracle(data) == expected


def test_pulsars_own_hash_vectors():
    # pulsar-client-cpp tests/HashTest.cc, "same value as Java client": makeHash
    keys = ["k1", "k2", "key1", "key2", "key01", "key02"]
    assert key_hashes(keys, "murmur3").tolist() == \
        [2110152746, 1479966664, 462881061, 1936800180, 39696932, 751761803]
    # JavaStringHash: one key overflows 32 bits, one has a negative hashCode
    assert key_hashes(["keykeykeykeykey1", "keykeykey2"], "java_string_hash").tolist() == \
        [434058482, 42978643]
    assert java_hash_code("keykeykey2") < 0


def test_java_string_hash_counts_utf16_code_units():
    # Java documents "abc".hashCode() == 96354; a supplementary character is
    # two surrogates in UTF-16, and its hash is over both
    assert java_hash_code("abc") == 96354
    keys = ["abc", "héllo", "ключ", "🙂x", "日本語", ""]
    assert key_hashes(keys, "java_string_hash").tolist() == \
        [java_hash_code(k) & 0x7fffffff for k in keys]


def test_go_variant_differs_from_java_only_where_go_does():
    keys = np.arange(-5000, 5000)
    for n in (4, 8, 16):          # a power of two: the masked bit never matters
        assert (partitions_of(keys, n, "go_java_string_hash")
                == partitions_of(keys, n, "java_string_hash")).all()
    assert (partitions_of(keys.astype(str).astype(object) + "zzzzzz", 3, "go_java_string_hash")
            != partitions_of(keys.astype(str).astype(object) + "zzzzzz", 3,
                             "java_string_hash")).any()


# --------------------------------------------------------------------------
# Every kind of key column, against the oracles


@SETTINGS
@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=60), st.integers(1, 100),
       st.sampled_from(ROUTED))
def test_int_keys_equal_the_oracle(keys, n, routing):
    expected = [oracle_partition(k, n, routing) for k in keys]
    assert partitions_of(np.array(keys, dtype=np.int64), n, routing).tolist() == expected
    assert partitions_of(pa.array(keys, pa.int64()), n, routing).tolist() == expected
    assert [partition_of(k, n, routing) for k in keys] == expected


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=60),
       st.integers(1, 100), st.sampled_from(ROUTED))
def test_string_keys_equal_the_oracle(keys, n, routing):
    keys = [k for k in keys if _utf8(k)]
    expected = [oracle_partition(k, n, routing) for k in keys]
    assert partitions_of(np.array(keys + [None], dtype=object)[:-1], n, routing).tolist() == \
        expected
    strings = pa.array(keys, pa.string())
    assert partitions_of(strings, n, routing).tolist() == expected
    if keys:                                   # a sliced array (non-zero offset)
        assert partitions_of(strings[1:], n, routing).tolist() == expected[1:]


def _utf8(text):
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def test_nulls_and_other_types_are_refused():
    with pytest.raises(ValueError, match="nulls"):
        partitions_of(np.array(["a", None], dtype=object), 4)
    with pytest.raises(ValueError, match="nulls"):
        partitions_of(pa.array([1, None]), 4)
    with pytest.raises(TypeError, match="integers or strings"):
        partitions_of(pa.array([1.5]), 4)


# --------------------------------------------------------------------------
# Declaring a routing


def test_a_source_declares_its_routing_and_boost_hash_is_refused():
    java = Source("s", "s", {"user": "int64", "ts": "int64"}, routing="java_string_hash")
    assert Source.from_dict(java.to_dict()) == java
    assert "routing" not in source.to_dict()          # the default: existing hashes unchanged
    assert java.to_dict()["routing"] == "java_string_hash"
    with pytest.raises(DefinitionError, match="BoostHash .* cannot be computed"):
        Source("s", "s", {"user": "int64", "ts": "int64"}, routing="boost_hash")
    with pytest.raises(DefinitionError, match="use one of murmur3, java_string_hash"):
        Source("s", "s", {"user": "int64", "ts": "int64"}, routing="crc32")


# --------------------------------------------------------------------------
# The check: every event, by the source's routing


def test_keys_of_the_partition_pass_and_others_are_refused_one_by_one():
    keys = np.arange(5000)
    owners = np.array([oracle_partition(k, 4, "murmur3") for k in keys])
    check = RoutingCheck(view, 2, 4)
    assert check.misrouted(keys[owners == 2]) == {}
    assert not check.seen_misrouted
    mixed = keys[:400]
    refused = check.misrouted(mixed)
    assert sorted(refused) == np.flatnonzero(owners[:400] != 2).tolist()
    assert check.seen_misrouted
    row = next(iter(refused))
    assert refused[row].startswith(f"misrouted: key 'user' belongs to partition "
                                   f"{owners[row]} of 4, not 2, by the source's murmur3 routing")
    lone = keys[owners != 2][:1]
    batch = np.concatenate([keys[owners == 2][:99], lone])
    assert list(check.misrouted(batch)) == [99]


def test_one_misrouted_event_in_a_large_batch_is_found():
    # not a sample: every event is checked, from the first batch on
    keys = np.arange(100_000)
    owners = np.array([oracle_partition(k, 8, "murmur3") for k in keys])
    mine = keys[owners == 5]
    batch = mine.copy()
    batch[1234] = keys[owners == 6][0]
    assert list(RoutingCheck(view, 5, 8).misrouted(batch)) == [1234]


def test_the_check_follows_the_sources_routing():
    java_view = FeatureView("v", Entity("user"), Source(
        "s", "s", {"user": "int64", "ts": "int64"}, routing="java_string_hash"),
        [Feature("n", "count")])
    keys = np.arange(3000)
    java = np.array([oracle_partition(k, 4, "java_string_hash") for k in keys])
    murmur = np.array([oracle_partition(k, 4, "murmur3") for k in keys])
    assert RoutingCheck(java_view, 1, 4).misrouted(keys[java == 1]) == {}
    refused = RoutingCheck(view, 1, 4).misrouted(keys[java == 1])
    assert sorted(refused) == np.flatnonzero(murmur[java == 1] != 1).tolist()
    assert "java_string_hash" in RoutingCheck(java_view, 1, 4).misrouted(
        keys[java == 2])[0]


def test_an_unpartitioned_topic_is_never_misrouted():
    assert RoutingCheck(view, 0, 1).misrouted(np.arange(100)) == {}
