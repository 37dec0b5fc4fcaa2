/* bench_tally.c - single-key lookup latency of libtally.
 *
 *   bench_tally STORE VIEW KEYS LOOKUPS
 *
 * The int64-keyed view must hold keys 0..KEYS-1. Does LOOKUPS lookups of
 * keys drawn at random (xorshift, fixed seed) from that range, reading
 * feature 0 of each record, three ways, and prints ns per lookup:
 *   snapshot   all lookups in one read transaction (the bare lookup)
 *   per-call   tally_txn_renew + lookup + tally_txn_reset each time (what a
 *              server that takes a fresh snapshot per request pays)
 *   batch64    tally_get_many_int64 over batches of 64 keys
 *
 *   bench_tally STORE --service NAME KEYS LOOKUPS
 *
 * A feature service whose entities are all int64, each with keys 0..KEYS-1:
 * LOOKUPS request rows (each entity's key drawn at random), each in a fresh
 * snapshot (renew, read, reset), reading every column's null bit, two ways;
 * prints ns per row:
 *   service    tally_service_get
 *   by-view    tally_get_int64 on each of the service's views in turn (the
 *              floor a hand-written reader would reach)
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tally.h"

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what, int rc)
{
    fprintf(stderr, "%s: %s\n", what, tally_strerror(rc));
    exit(1);
}

static uint64_t next_random(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Every column's null bit of one row, through its view's record. */
static int64_t touch_columns(const tally_service *svc, const tally_record *recs,
                             const int *found)
{
    int64_t sum = 0;
    size_t i;
    for (i = 0; i < tally_service_column_count(svc); i++) {
        int v = tally_service_column_view(svc, i);
        if (found[v])
            sum += tally_record_is_null(&recs[v], (size_t)tally_service_column_feature(svc, i));
    }
    return sum;
}

static int bench_service(const char *path, const char *name, long n_keys, long lookups)
{
    tally_store *store;
    tally_service *svc;
    tally_txn *txn;
    tally_record recs[TALLY_MAX_VIEWS];
    int found[TALLY_MAX_VIEWS];
    tally_key *keys;
    uint64_t x = 88172645463325252ULL;
    size_t n_entities, n_views, e, v;
    int64_t sum = 0;
    long i;
    double t0, t1;
    int rc;

    if ((rc = tally_store_open(path, &store))) die("tally_store_open", rc);
    if ((rc = tally_service_open(store, name, &svc))) die("tally_service_open", rc);
    n_entities = tally_service_entity_count(svc);
    n_views = tally_service_view_count(svc);
    for (e = 0; e < n_entities; e++)
        if (tally_service_entity_key_type(svc, e) != TALLY_KEY_INT64)
            die("bench_tally --service needs int64 entities", TALLY_EINVAL);
    keys = (tally_key *)calloc((size_t)lookups * n_entities, sizeof *keys);
    if (!keys) die("calloc", ENOMEM);
    for (i = 0; i < lookups * (long)n_entities; i++)
        keys[i].int64 = (int64_t)(next_random(&x) % (uint64_t)n_keys);
    if ((rc = tally_txn_begin(store, &txn))) die("tally_txn_begin", rc);
    tally_txn_reset(txn);

    t0 = now_ns();
    for (i = 0; i < lookups; i++) {
        if ((rc = tally_txn_renew(txn))) die("tally_txn_renew", rc);
        rc = tally_service_get(txn, svc, keys + (size_t)i * n_entities, recs, found);
        if (rc) die("tally_service_get", rc);
        sum += touch_columns(svc, recs, found);
        tally_txn_reset(txn);
    }
    t1 = now_ns();
    printf("service\t%.1f ns/row\t(%ld rows, %lu views)\n", (t1 - t0) / lookups, lookups,
           (unsigned long)n_views);

    t0 = now_ns();
    for (i = 0; i < lookups; i++) {
        const tally_key *row = keys + (size_t)i * n_entities;
        if ((rc = tally_txn_renew(txn))) die("tally_txn_renew", rc);
        for (v = 0; v < n_views; v++) {
            rc = tally_get_int64(txn, tally_service_view(svc, v),
                                 row[tally_service_view_entity(svc, v)].int64, &recs[v]);
            if (rc != 0 && rc != TALLY_NOTFOUND) die("tally_get_int64", rc);
            found[v] = rc == 0;
        }
        sum += touch_columns(svc, recs, found);
        tally_txn_reset(txn);
    }
    t1 = now_ns();
    printf("by-view\t%.1f ns/row\n", (t1 - t0) / lookups);

    tally_txn_end(txn);
    tally_service_close(svc);
    tally_store_close(store);
    fprintf(stderr, "checksum %" PRId64 "\n", sum);
    free(keys);
    return 0;
}

int main(int argc, char **argv)
{
    tally_store *store;
    tally_view *view;
    tally_txn *txn;
    tally_record rec[64];
    int status[64];
    int64_t *keys, sum = 0;
    long n_keys, lookups, i, found = 0;
    uint64_t x = 88172645463325252ULL;
    double t0, t1;
    int rc;

    if (argc == 6 && strcmp(argv[2], "--service") == 0 && atol(argv[4]) > 0)
        return bench_service(argv[1], argv[3], atol(argv[4]), atol(argv[5]));
    if (argc != 5) {
        fprintf(stderr, "usage: %s STORE VIEW KEYS LOOKUPS | "
                "%s STORE --service NAME KEYS LOOKUPS\n", argv[0], argv[0]);
        return 2;
    }
    n_keys = atol(argv[3]);
    lookups = atol(argv[4]);
    keys = (int64_t *)malloc((size_t)lookups * sizeof *keys);
    if (!keys || n_keys <= 0) return 2;
    for (i = 0; i < lookups; i++) keys[i] = (int64_t)(next_random(&x) % (uint64_t)n_keys);
    if ((rc = tally_store_open(argv[1], &store))) die("tally_store_open", rc);
    if ((rc = tally_view_open(store, argv[2], &view))) die("tally_view_open", rc);
    if ((rc = tally_txn_begin(store, &txn))) die("tally_txn_begin", rc);

    /* warm the page cache and the B-tree's upper pages */
    for (i = 0; i < lookups && i < 200000; i++)
        if (tally_get_int64(txn, view, keys[i], &rec[0]) == 0)
            sum += tally_record_int64(&rec[0], 0);

    t0 = now_ns();
    for (i = 0; i < lookups; i++) {
        rc = tally_get_int64(txn, view, keys[i], &rec[0]);
        if (rc == 0) {
            found++;
            sum += tally_record_int64(&rec[0], 0);
        } else if (rc != TALLY_NOTFOUND) die("tally_get_int64", rc);
    }
    t1 = now_ns();
    printf("snapshot\t%.1f ns/lookup\t(%ld lookups, %ld found)\n", (t1 - t0) / lookups,
           lookups, found);

    tally_txn_reset(txn);
    t0 = now_ns();
    for (i = 0; i < lookups; i++) {
        if ((rc = tally_txn_renew(txn))) die("tally_txn_renew", rc);
        rc = tally_get_int64(txn, view, keys[i], &rec[0]);
        if (rc == 0) sum += tally_record_int64(&rec[0], 0);
        tally_txn_reset(txn);
    }
    t1 = now_ns();
    printf("per-call\t%.1f ns/lookup\t(renew + get + reset)\n", (t1 - t0) / lookups);

    if ((rc = tally_txn_renew(txn))) die("tally_txn_renew", rc);
    t0 = now_ns();
    for (i = 0; i + 64 <= lookups; i += 64) {
        int j;
        rc = tally_get_many_int64(txn, view, keys + i, 64, rec, status);
        if (rc) die("tally_get_many_int64", rc);
        for (j = 0; j < 64; j++)
            if (status[j] == 0) sum += tally_record_int64(&rec[j], 0);
    }
    t1 = now_ns();
    printf("batch64\t%.1f ns/lookup\n", (t1 - t0) / (double)(i ? i : 1));

    tally_txn_end(txn);
    tally_view_close(view);
    tally_store_close(store);
    fprintf(stderr, "checksum %" PRId64 "\n", sum);
    free(keys);
    return 0;
}
