/* The table behind core/keyindex.pyx: 64-bit key hash -> candidate slots.
 * Pure C, header only.
 *
 * A bucket is 8 bytes: a 32-bit tag of the key's hash and its slot
 * (UINT32_MAX: empty). The segment and the tag are 38 bits of the hash, so an
 * equal tag only names a candidate: the index confirms it against the key it
 * keeps for that slot (one read of its slot -> key column).
 *
 * The hash space is split into TALLY_SEGMENTS segments by the top bits of the
 * hash; each grows on its own, so growing never holds two copies of the whole
 * table (the peak is one segment's old and new arrays).
 *
 * Within a segment the buckets are linear probing kept in tag order ("ordered
 * hashing"): a tag's home bucket is the tag scaled to the capacity
 * (multiply-shift, so any capacity works and homes rise with the tag), and
 * every run of occupied buckets is sorted by tag. That ordering buys three
 * things: a search stops at the first larger tag, so misses are as short as
 * hits at high load; growing is one sequential pass (old order is new order);
 * and there is no wrap-around, only a tail of spare buckets past the last home.
 * An empty bucket is all ones, so its tag is at least every key's and a search
 * is one comparison per bucket; the last bucket is kept empty as a sentinel.
 *
 * Functions returning int give 0, or -1 when malloc fails (the table is then
 * unchanged). The table owns its arrays; tally_keytable_free releases them. */
#ifndef TALLY_KEYTABLE_H
#define TALLY_KEYTABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "tally_hash.h"

#define TALLY_SEGMENT_BITS 6
#define TALLY_SEGMENTS (1 << TALLY_SEGMENT_BITS)
#define TALLY_EMPTY_SLOT UINT32_MAX
#define TALLY_MIN_SEGMENT 16        /* buckets: 64 segments make a 1024-bucket table */
#define TALLY_MIN_TAIL 16           /* >= TALLY_SEEK_SPAN */
/* Grow a segment past 75% full, by 1.4x: between growths a segment is 54-75%
 * full, i.e. 10.7-14.9 bytes of table per key. Ordered probing keeps searches
 * short at that load (a search stops at the first larger tag). */
#define TALLY_MAX_LOAD_NUM 75
#define TALLY_MAX_LOAD_DEN 100
#define TALLY_GROWTH_NUM 7
#define TALLY_GROWTH_DEN 5

typedef struct { uint32_t tag; uint32_t slot; } tally_bucket;

typedef struct {
    tally_bucket *buckets;
    uint64_t capacity;              /* homes are [0, capacity) */
    uint64_t size;                  /* allocated buckets: capacity plus the tail */
    uint64_t count;
} tally_segment;

typedef struct { tally_segment segments[TALLY_SEGMENTS]; } tally_keytable;

static inline tally_segment *tally_segment_of(tally_keytable *t, uint64_t hash) {
    return &t->segments[hash >> (64 - TALLY_SEGMENT_BITS)];
}

/* The 32 hash bits after the segment's. */
static inline uint32_t tally_tag(uint64_t hash) {
    return (uint32_t)(hash >> (32 - TALLY_SEGMENT_BITS));
}

/* The tag scaled to the capacity. */
static inline uint64_t tally_home(const tally_segment *s, uint32_t tag) {
    return ((uint64_t)tag * s->capacity) >> 32;
}

/* Buckets tally_seek reads without branching (the tail holds at least these
 * past the last home). At 54-75% load an entry is almost always within 4
 * buckets of its home. */
#define TALLY_SEEK_SPAN 4

/* Prefetches the buckets a search for ``hash`` reads: the first and the last
 * of its home's TALLY_SEEK_SPAN (the same cache line, or two adjacent ones). */
static inline void tally_prefetch(tally_keytable *t, uint64_t hash) {
    tally_segment *s = tally_segment_of(t, hash);
    const tally_bucket *b = &s->buckets[tally_home(s, tally_tag(hash))];
    TALLY_PREFETCH(b);
    TALLY_PREFETCH(b + TALLY_SEEK_SPAN - 1);
}

/* The first position at or after the tag's home that is empty or holds a
 * tag >= ``tag``: where its entries start, or where it would be inserted.
 * From the home on, the buckets below ``tag`` form a prefix (occupied buckets
 * are in tag order, and an entry past an empty one has a later home), so the
 * answer is the home plus their count, taken over TALLY_SEEK_SPAN buckets
 * without a branch to mispredict. */
static inline uint64_t tally_seek(const tally_segment *s, uint32_t tag) {
    uint64_t i = tally_home(s, tag), below = 0;
    for (int j = 0; j < TALLY_SEEK_SPAN; j++) below += s->buckets[i + j].tag < tag;
    if (below < TALLY_SEEK_SPAN) return i + below;
    i += TALLY_SEEK_SPAN;
    while (s->buckets[i].tag < tag) i++;       /* stops at the empty last bucket */
    return i;
}

/* Whether position i holds an entry with this tag. */
static inline int tally_holds(const tally_segment *s, uint64_t i, uint32_t tag) {
    return s->buckets[i].tag == tag && s->buckets[i].slot != TALLY_EMPTY_SLOT;
}

static inline tally_bucket *tally_alloc_empty(uint64_t n) {
    tally_bucket *b = (tally_bucket *)malloc(n * sizeof(tally_bucket));
    if (b) memset(b, 0xff, n * sizeof(tally_bucket));   /* every slot UINT32_MAX */
    return b;
}

/* Doubles the tail of spare buckets past the last home. */
static inline int tally_extend_tail(tally_segment *s) {
    uint64_t tail = s->size - s->capacity, size = s->size + (tail > 0 ? tail : TALLY_MIN_TAIL);
    tally_bucket *b = (tally_bucket *)realloc(s->buckets, size * sizeof(tally_bucket));
    if (!b) return -1;
    memset(b + s->size, 0xff, (size - s->size) * sizeof(tally_bucket));
    s->buckets = b;
    s->size = size;
    return 0;
}

/* Puts (tag, slot) at position i, as found by tally_seek and past the equal
 * tags: the entries from i up to the next empty bucket move one to the right. */
static inline int tally_insert_at(tally_segment *s, uint64_t i, uint32_t tag, uint32_t slot) {
    uint64_t end = i;
    while (s->buckets[end].slot != TALLY_EMPTY_SLOT) end++;
    if (end == s->size - 1 && tally_extend_tail(s)) return -1;    /* keep the sentinel */
    memmove(&s->buckets[i + 1], &s->buckets[i], (end - i) * sizeof(tally_bucket));
    s->buckets[i].tag = tag;
    s->buckets[i].slot = slot;
    s->count++;
    return 0;
}

/* Re-places a segment's entries into ``capacity`` homes, in one pass: the
 * entries are in tag order, which is also their order in the new array. */
static inline int tally_segment_resize(tally_segment *s, uint64_t capacity) {
    uint64_t tail = s->size > s->capacity ? s->size - s->capacity : TALLY_MIN_TAIL;
    tally_segment grown = {tally_alloc_empty(capacity + tail), capacity, capacity + tail, s->count};
    if (!grown.buckets) return -1;
    uint64_t next = 0;              /* the first free position of the new array */
    for (uint64_t j = 0; j < s->size; j++) {
        tally_bucket b = s->buckets[j];
        if (b.slot == TALLY_EMPTY_SLOT) continue;
        uint64_t i = tally_home(&grown, b.tag);
        if (i < next) i = next;
        if (i == grown.size - 1 && tally_extend_tail(&grown)) {
            free(grown.buckets);
            return -1;
        }
        grown.buckets[i] = b;
        next = i + 1;
    }
    free(s->buckets);
    *s = grown;
    return 0;
}

/* The capacity that keeps ``count`` entries within the load limit. */
static inline uint64_t tally_capacity_for(uint64_t count) {
    uint64_t c = (count * TALLY_MAX_LOAD_DEN + TALLY_MAX_LOAD_NUM - 1) / TALLY_MAX_LOAD_NUM;
    return c < TALLY_MIN_SEGMENT ? TALLY_MIN_SEGMENT : c;
}

/* Makes room for ``extra[k]`` more entries in segment k, growing by at least
 * the growth factor so that n inserts cost O(n) re-placements in all. */
static inline int tally_keytable_reserve(tally_keytable *t, const uint64_t extra[TALLY_SEGMENTS]) {
    for (int k = 0; k < TALLY_SEGMENTS; k++) {
        tally_segment *s = &t->segments[k];
        uint64_t needed = tally_capacity_for(s->count + extra[k]);
        if (needed <= s->capacity) continue;
        uint64_t grown = s->capacity * TALLY_GROWTH_NUM / TALLY_GROWTH_DEN;
        if (tally_segment_resize(s, needed > grown ? needed : grown)) return -1;
    }
    return 0;
}

/* Reserves room for the entries of hashes[idx[0..m)], counted per segment. */
static inline int tally_keytable_reserve_hashes(tally_keytable *t, const uint64_t *hashes,
                                                const int64_t *idx, int64_t m) {
    uint64_t extra[TALLY_SEGMENTS] = {0};
    for (int64_t j = 0; j < m; j++) extra[hashes[idx[j]] >> (64 - TALLY_SEGMENT_BITS)]++;
    return tally_keytable_reserve(t, extra);
}

/* An empty table sized for ``expected`` entries spread over the segments
 * (each gets its share plus three standard deviations). */
static inline int tally_keytable_init(tally_keytable *t, uint64_t expected) {
    memset(t, 0, sizeof(*t));
    double share = (double)expected / TALLY_SEGMENTS;
    uint64_t capacity = tally_capacity_for((uint64_t)(share + 3.0 * __builtin_sqrt(share)));
    for (int k = 0; k < TALLY_SEGMENTS; k++) {
        tally_segment *s = &t->segments[k];
        s->buckets = tally_alloc_empty(capacity + TALLY_MIN_TAIL);
        if (!s->buckets) {
            for (int j = 0; j < k; j++) free(t->segments[j].buckets);
            memset(t, 0, sizeof(*t));
            return -1;
        }
        s->capacity = capacity;
        s->size = capacity + TALLY_MIN_TAIL;
    }
    return 0;
}

static inline void tally_keytable_free(tally_keytable *t) {
    for (int k = 0; k < TALLY_SEGMENTS; k++) free(t->segments[k].buckets);
    memset(t, 0, sizeof(*t));
}

/* Buckets allocated, over all segments. */
static inline uint64_t tally_keytable_buckets(const tally_keytable *t) {
    uint64_t n = 0;
    for (int k = 0; k < TALLY_SEGMENTS; k++) n += t->segments[k].size;
    return n;
}

/* A slot-ordered column (the int64 index's keys) in its own mapping: mremap
 * grows it without copying and gives no memory back to fragment. realloc
 * serves blocks below glibc's adaptive mmap threshold (up to 32 MB) from the
 * heap, where growing copies and leaves the old block resident: 35 bytes per
 * key at the peak of building 1M keys instead of 20. NULL on failure. */
static inline void *tally_column_resize(void *column, size_t old_bytes, size_t new_bytes) {
    void *grown = column ? mremap(column, old_bytes, new_bytes, MREMAP_MAYMOVE)
                         : mmap(NULL, new_bytes, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return grown == MAP_FAILED ? NULL : grown;
}

static inline void tally_column_free(void *column, size_t bytes) {
    if (column) munmap(column, bytes);
}

#endif
