/* The key hashes Pulsar producers route by, and the partition each gives.
 * Pure C, header only; used by core/routing.pyx. A key is its partition key
 * string as UTF-8 bytes (an integer key: its decimal form); its partition is
 * tally_key_hash(key) % n_partitions in every scheme.
 *
 *   TALLY_ROUTING_MURMUR3          Murmur3_32Hash (Java, C++, Go clients):
 *                                  murmur3_x86_32(utf8, seed 0) & INT32_MAX
 *   TALLY_ROUTING_JAVA_STRING_HASH JavaStringHash, the Java client's default:
 *                                  String.hashCode() & INT32_MAX, where
 *                                  hashCode runs over the UTF-16 code units
 *   TALLY_ROUTING_GO_JAVA_STRING_HASH  the Go client's default, its JavaStringHash:
 *                                  31*h + byte over the UTF-8 bytes, uint32
 *                                  (no mask: differs from Java's when bit 31 is
 *                                  set and n is not a power of two, and for
 *                                  non-ASCII keys) */
#ifndef TALLY_ROUTING_H
#define TALLY_ROUTING_H

#include <stdint.h>
#include <stddef.h>

enum {
    TALLY_ROUTING_MURMUR3 = 0,
    TALLY_ROUTING_JAVA_STRING_HASH = 1,
    TALLY_ROUTING_GO_JAVA_STRING_HASH = 2,
};

static inline uint32_t tally_rotl32(uint32_t x, int r) {
    return (x << r) | (x >> (32 - r));
}

static inline uint32_t tally_murmur3_mix(uint32_t k) {
    k *= 0xcc9e2d51u;
    k = tally_rotl32(k, 15);
    return k * 0x1b873593u;
}

/* MurmurHash3 x86 32-bit, seed 0; blocks read little-endian byte by byte, so
 * the result does not depend on the host's byte order or alignment. */
static inline uint32_t tally_murmur3_32(const unsigned char *data, size_t len) {
    uint32_t h = 0, k;
    size_t nblocks = len / 4, i;
    for (i = 0; i < nblocks; i++) {
        const unsigned char *p = data + 4 * i;
        k = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        h ^= tally_murmur3_mix(k);
        h = tally_rotl32(h, 13);
        h = h * 5 + 0xe6546b64u;
    }
    k = 0;
    switch (len & 3) {
    case 3: k ^= (uint32_t)data[4 * nblocks + 2] << 16; /* fall through */
    case 2: k ^= (uint32_t)data[4 * nblocks + 1] << 8;  /* fall through */
    case 1: k ^= (uint32_t)data[4 * nblocks];
            h ^= tally_murmur3_mix(k);
    }
    h ^= (uint32_t)len;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

/* Java's String.hashCode of the string whose UTF-8 bytes are given (valid
 * UTF-8): 31*h + unit over its UTF-16 code units, a supplementary character
 * counting as its two surrogates. For ASCII the units are the bytes. */
static inline uint32_t tally_java_string_hash(const unsigned char *s, size_t len) {
    uint32_t h = 0, cp;
    size_t i = 0;
    while (i < len) {
        unsigned char b = s[i];
        if (b < 0x80) {
            cp = b; i += 1;
        } else if (b < 0xe0) {
            cp = (uint32_t)(b & 0x1f) << 6 | (s[i + 1] & 0x3f); i += 2;
        } else if (b < 0xf0) {
            cp = (uint32_t)(b & 0x0f) << 12 | (uint32_t)(s[i + 1] & 0x3f) << 6 |
                 (s[i + 2] & 0x3f); i += 3;
        } else {
            cp = (uint32_t)(b & 0x07) << 18 | (uint32_t)(s[i + 1] & 0x3f) << 12 |
                 (uint32_t)(s[i + 2] & 0x3f) << 6 | (s[i + 3] & 0x3f); i += 4;
            cp -= 0x10000;
            h = 31 * h + (0xd800 + (cp >> 10));
            cp = 0xdc00 + (cp & 0x3ff);
        }
        h = 31 * h + cp;
    }
    return h;
}

static inline uint32_t tally_go_java_string_hash(const unsigned char *s, size_t len) {
    uint32_t h = 0;
    for (size_t i = 0; i < len; i++)
        h = 31 * h + s[i];
    return h;
}

/* The hash a client's router takes modulo the partition count (Java's and
 * C++'s Hash.makeHash; the Go client's hash function). */
static inline uint32_t tally_key_hash(const unsigned char *key, size_t len, int routing) {
    switch (routing) {
    case TALLY_ROUTING_JAVA_STRING_HASH:
        return tally_java_string_hash(key, len) & 0x7fffffffu;
    case TALLY_ROUTING_GO_JAVA_STRING_HASH:
        return tally_go_java_string_hash(key, len);
    default:
        return tally_murmur3_32(key, len) & 0x7fffffffu;
    }
}

/* The decimal form of `value` written to the end of buf[0..20); returns its
 * first byte (no terminator: the length is buf + 20 - start). */
static inline unsigned char *tally_decimal(int64_t value, unsigned char buf[20]) {
    unsigned char *p = buf + 20;
    uint64_t magnitude = value < 0 ? 0 - (uint64_t)value : (uint64_t)value;
    do {
        *--p = (unsigned char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    if (value < 0)
        *--p = '-';
    return p;
}

#endif
