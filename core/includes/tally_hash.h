/* Hashing and prefetch helpers shared by the Cython kernels. Pure C, header only. */
#ifndef TALLY_HASH_H
#define TALLY_HASH_H

#include <stdint.h>
#include <stddef.h>

/* Finaliser of splitmix64: a bijection on 64-bit integers with full avalanche,
 * so sequential user ids spread over the whole table. */
static inline uint64_t tally_hash_u64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* 64-bit FNV-1a over the bytes, then the splitmix finaliser to fix FNV's weak
 * low bits (the table indexes with the low bits). Short keys dominate. */
static inline uint64_t tally_hash_bytes(const char *data, size_t len) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)data[i];
        h *= 0x100000001b3ULL;
    }
    return tally_hash_u64(h ^ (uint64_t)len);
}

#if defined(__GNUC__) || defined(__clang__)
#define TALLY_PREFETCH(p) __builtin_prefetch((p), 1, 1)
#else
#define TALLY_PREFETCH(p) ((void)(p))
#endif

/* Leading zeros of a non-zero 64-bit word. */
static inline int tally_clz64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_clzll(x);
#else
    int n = 0;
    while (!(x & 0x8000000000000000ULL)) { x <<= 1; n++; }
    return n;
#endif
}

#endif
