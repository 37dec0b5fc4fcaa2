/* test_tally.c - a plain C test of libtally, in the manner of LMDB's mtest.c.
 *
 *   test_tally STORE VIEW              < keys
 *       Checks the API's error paths, then looks up every key (one per line
 *       on stdin; decimal for an int64 view, raw bytes for a string view)
 *       and prints, tab-separated, for the Python test to compare with the
 *       Python reader:
 *           view     NAME VERSION int64|string N RECORD_SIZE
 *           feature  I NAME TYPE                   (N lines; TYPE as
 *                    tally_type_name gives it)
 *           record   KEY notfound
 *           record   KEY FIELD VALUE|null      (_event_time, _write_time,
 *                    _valid_until, _view_version, then every feature)
 *       Floats print as %.17g, NaN as "nan"; _event_time INT64_MIN and
 *       _valid_until INT64_MAX print as "null", as the Python reader's None.
 *       A string prints as "..." with every byte outside printable ASCII,
 *       and \ " , : [ ], as \xHH; a list as [ITEM,ITEM]; a top_k as
 *       [VALUE:COUNT,...]. Every accessor of another type is checked to
 *       give its documented "nothing" on every feature.
 *
 *   test_tally STORE --views
 *       Checks tally_store_views' error paths and that a callback's non-zero
 *       return stops the listing, then lists the views, one line each, with
 *       what opening the view from inside the callback gave:
 *           listed   NAME VERSION          (or: listed NAME error CODE)
 *
 *   test_tally STORE --service NAME    < rows
 *       Checks the feature service API's error paths, then reads every
 *       request row (one per line on stdin: the entities' keys in the order
 *       tally_service_entity_name gives, tab-separated; decimal for an int64
 *       entity) and prints
 *           service  NAME VERSION
 *           entity   E NAME int64|string
 *           sview    V NAME E              (the view and its entity)
 *           column   I NAME V FEATURE_INDEX FEATURE_NAME
 *           vector   ROW COLUMN VALUE|null (values as above)
 *       Each row's records are checked to be those tally_get_* gives for the
 *       view and key (the same bytes). If the service does not open:
 *           service  error CODE
 *
 *   test_tally STORE --open
 *       Opens the store and prints what tally_store_open returned:
 *           open     CODE MESSAGE       (CODE 0 for success; *out checked)
 *
 *   test_tally STORE VIEW --watch SNAPSHOTS   < keys
 *       For a writer that keeps rewriting every key, in one transaction,
 *       with a counter c: features (c, -c, c / 2.0) and event time c.
 *       Checks in every snapshot that no record is torn, that every key
 *       has the same c (one snapshot never mixes two writes) and that c
 *       never goes back; prints "watch ok SNAPSHOTS RECORDS MIN_C MAX_C".
 *
 * Exits 0 when every check passed, 1 on the first failure (with a message
 * on stderr naming the failed expression).
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"

#define CHECK(test, msg) \
    ((test) ? (void)0 : ((void)fprintf(stderr, "%s:%d: %s: %s\n", \
        __FILE__, __LINE__, msg, tally_strerror(rc)), abort_test()))
/* E(expr): expr must return 0 */
#define E(expr) CHECK((rc = (expr)) == 0, #expr)
/* R(code, expr): expr must return code */
#define R(code, expr) CHECK((rc = (expr)) == (code), #expr " != " #code)

static void abort_test(void)
{
    exit(1);
}

typedef struct {
    char **keys;
    size_t *lens;
    int64_t *ints;
    size_t n;
} key_list;

static void read_keys(FILE *in, int key_type, key_list *kl)
{
    char line[4096];
    size_t cap = 0;
    int rc = 0;
    memset(kl, 0, sizeof *kl);
    while (fgets(line, sizeof line, in)) {
        size_t len = strlen(line);
        if (len && line[len - 1] == '\n') line[--len] = '\0';
        if (kl->n == cap) {
            cap = cap ? cap * 2 : 64;
            kl->keys = (char **)realloc(kl->keys, cap * sizeof *kl->keys);
            kl->lens = (size_t *)realloc(kl->lens, cap * sizeof *kl->lens);
            kl->ints = (int64_t *)realloc(kl->ints, cap * sizeof *kl->ints);
            CHECK(kl->keys && kl->lens && kl->ints, "out of memory");
        }
        kl->keys[kl->n] = (char *)malloc(len + 1);
        CHECK(kl->keys[kl->n] != NULL, "out of memory");
        memcpy(kl->keys[kl->n], line, len + 1);
        kl->lens[kl->n] = len;
        if (key_type == TALLY_KEY_INT64) {
            char *end;
            errno = 0;
            kl->ints[kl->n] = strtoll(line, &end, 10);
            CHECK(errno == 0 && *end == '\0' && len > 0, "bad int64 key on stdin");
        }
        kl->n++;
    }
}

static void free_keys(key_list *kl)
{
    size_t i;
    for (i = 0; i < kl->n; i++) free(kl->keys[i]);
    free(kl->keys);
    free(kl->lens);
    free(kl->ints);
}

static int get_one(tally_txn *txn, tally_view *view, const key_list *kl, size_t i,
                   tally_record *rec)
{
    if (tally_view_key_type(view) == TALLY_KEY_INT64)
        return tally_get_int64(txn, view, kl->ints[i], rec);
    return tally_get_string(txn, view, kl->keys[i], kl->lens[i], rec);
}

static void print_float(double v)
{
    if (isnan(v)) printf("nan");
    else printf("%.17g", v);
}

static void print_string(const char *p, size_t len)
{
    size_t i;
    putchar('"');
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x20 || c > 0x7e || strchr("\\\",:[]", c)) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('"');
}

/* Item j of list (or top_k) feature i, read with the accessor of its type;
 * checks that the raw items pointer agrees. */
static void print_item(const tally_record *rec, size_t i, size_t j, int item)
{
    int rc = 0;
    size_t len, count;
    const unsigned char *data = (const unsigned char *)tally_record_list_data(rec, i, &count);
    if (item == TALLY_STRING) {
        const char *s = tally_record_list_string(rec, i, j, &len);
        CHECK(s != NULL && data == NULL && count == 0, "list_string / list_data");
        print_string(s, len);
    } else if (item == TALLY_INT64) {
        int64_t v = tally_record_list_int64(rec, i, j), raw;
        memcpy(&raw, data + 8 * j, sizeof raw);     /* little-endian host assumed */
        CHECK(raw == v && count == tally_record_list_count(rec, i), "list_data int64");
        printf("%" PRId64, v);
    } else {
        double v = tally_record_list_float64(rec, i, j), raw;
        memcpy(&raw, data + 8 * j, sizeof raw);
        CHECK(memcmp(&raw, &v, sizeof v) == 0, "list_data float64");
        print_float(v);
    }
}

static int item_of(int type)
{
    switch (type) {
    case TALLY_LIST_INT64: case TALLY_TOP_K_INT64: return TALLY_INT64;
    case TALLY_LIST_FLOAT64: case TALLY_TOP_K_FLOAT64: return TALLY_FLOAT64;
    default: return TALLY_STRING;
    }
}

/* What the accessors of the other types give for feature i: nothing. */
static void check_other_accessors(const tally_record *rec, size_t i, int type)
{
    int rc = 0, item = item_of(type);
    int list = type >= TALLY_LIST_INT64, top_k = type >= TALLY_TOP_K_INT64;
    size_t len = 99, count = tally_record_list_count(rec, i);
    if (type != TALLY_INT64) CHECK(tally_record_int64(rec, i) == 0, "int64 of another type");
    if (type != TALLY_FLOAT64) CHECK(isnan(tally_record_float64(rec, i)), "float64 of other");
    if (type != TALLY_STRING)
        CHECK(tally_record_string(rec, i, &len) == NULL && len == 0, "string of another type");
    if (!list) CHECK(count == 0 && tally_record_list_data(rec, i, NULL) == NULL, "list of other");
    if (!list || item != TALLY_INT64) CHECK(tally_record_list_int64(rec, i, 0) == 0, "li64");
    if (!list || item != TALLY_FLOAT64) CHECK(isnan(tally_record_list_float64(rec, i, 0)), "lf");
    if (!list || item != TALLY_STRING)
        CHECK(tally_record_list_string(rec, i, 0, NULL) == NULL, "list_string of other");
    if (!top_k) CHECK(tally_record_top_k_count(rec, i, 0) == 0, "top_k_count of other");
    /* one past the end */
    CHECK(tally_record_list_int64(rec, i, count) == 0 &&
          isnan(tally_record_list_float64(rec, i, count)) &&
          tally_record_list_string(rec, i, count, NULL) == NULL &&
          tally_record_top_k_count(rec, i, count) == 0, "item past the end");
}

static void print_value(const tally_record *rec, size_t i, int type)
{
    size_t j, len, count = tally_record_list_count(rec, i);
    const char *s;
    check_other_accessors(rec, i, type);
    switch (type) {
    case TALLY_INT64: printf("%" PRId64, tally_record_int64(rec, i)); return;
    case TALLY_FLOAT64: print_float(tally_record_float64(rec, i)); return;
    case TALLY_STRING:
        s = tally_record_string(rec, i, &len);
        print_string(s, len);
        return;
    default: break;
    }
    putchar('[');
    for (j = 0; j < count; j++) {
        if (j) putchar(',');
        print_item(rec, i, j, item_of(type));
        if (type >= TALLY_TOP_K_INT64) printf(":%" PRId64, tally_record_top_k_count(rec, i, j));
    }
    putchar(']');
}

static void print_record(const tally_view *view, const char *key, const tally_record *rec)
{
    size_t i, n = tally_view_feature_count(view);
    int64_t t;
    t = tally_record_event_time(rec);
    if (t == TALLY_EVENT_TIME_NONE) printf("record\t%s\t_event_time\tnull\n", key);
    else printf("record\t%s\t_event_time\t%" PRId64 "\n", key, t);
    printf("record\t%s\t_write_time\t%" PRId64 "\n", key, tally_record_write_time(rec));
    t = tally_record_valid_until(rec);
    if (t == TALLY_VALID_FOREVER) printf("record\t%s\t_valid_until\tnull\n", key);
    else printf("record\t%s\t_valid_until\t%" PRId64 "\n", key, t);
    printf("record\t%s\t_view_version\t%" PRIu32 "\n", key, tally_record_view_version(rec));
    for (i = 0; i < n; i++) {
        printf("record\t%s\t%s\t", key, tally_view_feature_name(view, i));
        if (tally_record_is_null(rec, i)) printf("null");
        else print_value(rec, i, tally_view_feature_type(view, i));
        printf("\n");
    }
}

/* The API's answers to bad calls, independent of the data. */
static void check_error_paths(const char *path, tally_store *store, tally_view *view)
{
    static const int codes[] = {TALLY_SUCCESS, TALLY_NOTFOUND, TALLY_ENOVIEW, TALLY_EINVAL,
                                TALLY_ECORRUPT, TALLY_ESCHEMA, TALLY_ELAYOUT, TALLY_EVIEWS,
                                TALLY_ETRUNCATED,
                                -30798 /* MDB_NOTFOUND */, ENOENT, ENOMEM, 987654};
    tally_store *bad_store = (tally_store *)&bad_store;
    tally_view *bad_view = (tally_view *)&bad_view;
    tally_txn *txn;
    tally_record rec;
    size_t i, n = tally_view_feature_count(view);
    int major = -1, minor = -1, patch = -1, rc = 0, st = 0;
    char missing[4096];

    CHECK(strlen(tally_version(&major, &minor, &patch)) > 0, "tally_version string");
    CHECK(major == TALLY_VERSION_MAJOR && minor == TALLY_VERSION_MINOR &&
          patch == TALLY_VERSION_PATCH, "tally_version numbers");
    for (i = 0; i < sizeof codes / sizeof codes[0]; i++)
        CHECK(tally_strerror(codes[i]) && tally_strerror(codes[i])[0], "tally_strerror");
    CHECK(strcmp(tally_strerror(TALLY_ENOVIEW), tally_strerror(TALLY_NOTFOUND)) != 0,
          "distinct messages");

    /* no store here: errno passed through, *out cleared */
    snprintf(missing, sizeof missing, "%s/no-such-dir", path);
    rc = tally_store_open(missing, &bad_store);
    CHECK(rc == ENOENT && bad_store == NULL, "open of a missing store gives ENOENT");
    R(TALLY_EINVAL, tally_store_open(NULL, &bad_store));
    R(TALLY_EINVAL, tally_store_open(path, NULL));

    R(TALLY_ENOVIEW, tally_view_open(store, "no such view", &bad_view));
    CHECK(bad_view == NULL, "failed view open clears *out");
    R(TALLY_ENOVIEW, tally_view_open(store, "", &bad_view));
    R(TALLY_EINVAL, tally_view_open(store, NULL, &bad_view));

    /* schema accessors */
    CHECK(tally_view_feature_name(view, n) == NULL, "feature_name(N) is NULL");
    R(TALLY_EINVAL, tally_view_feature_type(view, n));
    R(TALLY_NOTFOUND, tally_view_feature_index(view, "no such feature"));
    for (i = 0; i < n; i++) {
        int at = tally_view_feature_index(view, tally_view_feature_name(view, i));
        CHECK(at >= 0 && at <= (int)i, "feature_index finds the feature by name");
        CHECK(strcmp(tally_view_feature_name(view, (size_t)at),
                     tally_view_feature_name(view, i)) == 0, "feature_index name");
        rc = tally_view_feature_type(view, i);
        CHECK(tally_type_name(rc) != NULL, "feature type");
    }
    CHECK(tally_view_record_size(view) == 32 + (n + 63) / 64 * 8 + 8 * n, "record size");
    CHECK(strcmp(tally_view_name(view), tally_view_name(view)) == 0, "view name");
    CHECK(tally_type_name(-1) == NULL && tally_type_name(TALLY_VALUE_TYPES) == NULL &&
          strcmp(tally_type_name(TALLY_TOP_K_STRING), "top_k<string>") == 0, "type names");

    /* lookups with wrong arguments */
    E(tally_txn_begin(store, &txn));
    if (tally_view_key_type(view) == TALLY_KEY_INT64) {
        R(TALLY_EINVAL, tally_get_string(txn, view, "1", 1, &rec));
        R(TALLY_EINVAL, tally_get_int64(txn, view, 1, NULL));
        R(TALLY_EINVAL, tally_get_int64(NULL, view, 1, &rec));
        R(TALLY_EINVAL, tally_get_many_int64(txn, view, NULL, 1, &rec, &st));
    } else {
        int64_t one = 1;
        R(TALLY_EINVAL, tally_get_int64(txn, view, 1, &rec));
        R(TALLY_EINVAL, tally_get_many_int64(txn, view, &one, 1, &rec, &st));
        R(TALLY_EINVAL, tally_get_string(txn, view, NULL, 1, &rec));
        R(TALLY_NOTFOUND, tally_get_string(txn, view, "", 0, &rec));
        memset(missing, 'x', sizeof missing);
        R(TALLY_NOTFOUND, tally_get_string(txn, view, missing, sizeof missing, &rec));
    }
    /* a reset transaction refuses lookups until renewed */
    tally_txn_reset(txn);
    tally_txn_reset(txn);
    if (tally_view_key_type(view) == TALLY_KEY_INT64)
        R(TALLY_EINVAL, tally_get_int64(txn, view, 1, &rec));
    else
        R(TALLY_EINVAL, tally_get_string(txn, view, "1", 1, &rec));
    E(tally_txn_renew(txn));
    E(tally_txn_renew(txn));            /* renewing a live txn resets it first */
    tally_txn_end(txn);
    tally_txn_end(NULL);
    tally_view_close(NULL);
    tally_store_close(NULL);
}

static int dump(const char *path, const char *view_name)
{
    tally_store *store;
    tally_view *view, *again;
    tally_txn *txn;
    tally_record rec, *many;
    key_list kl;
    int rc = 0, *status, first;
    size_t i, n, size;
    char key[64];

    E(tally_store_open(path, &store));
    E(tally_view_open(store, view_name, &view));
    check_error_paths(path, store, view);

    n = tally_view_feature_count(view);
    printf("view\t%s\t%" PRIu32 "\t%s\t%lu\t%lu\n", tally_view_name(view),
           tally_view_version(view),
           tally_view_key_type(view) == TALLY_KEY_INT64 ? "int64" : "string",
           (unsigned long)n, (unsigned long)tally_view_record_size(view));
    for (i = 0; i < n; i++)
        printf("feature\t%lu\t%s\t%s\n", (unsigned long)i, tally_view_feature_name(view, i),
               tally_type_name(tally_view_feature_type(view, i)));

    read_keys(stdin, tally_view_key_type(view), &kl);
    many = (tally_record *)calloc(kl.n + 1, sizeof *many);
    status = (int *)calloc(kl.n + 1, sizeof *status);
    CHECK(many && status, "out of memory");

    E(tally_txn_begin(store, &txn));
    if (tally_view_key_type(view) == TALLY_KEY_INT64)
        first = tally_get_many_int64(txn, view, kl.ints, kl.n, many, status);
    else
        first = tally_get_many_string(txn, view, (const char *const *)kl.keys, kl.lens,
                                      kl.n, many, status);
    rc = first;
    CHECK(first == 0, "get_many: no hard error");
    for (i = 0; i < kl.n; i++) {
        const char *shown = kl.keys[i];
        rc = get_one(txn, view, &kl, i, &rec);
        CHECK(rc == 0 || rc == TALLY_NOTFOUND, "get");
        CHECK(rc == status[i], "get_many status equals get");
        if (tally_view_key_type(view) == TALLY_KEY_INT64) {
            snprintf(key, sizeof key, "%" PRId64, kl.ints[i]);
            shown = key;
        }
        if (rc == TALLY_NOTFOUND) {
            printf("record\t%s\tnotfound\n", shown);
            continue;
        }
        CHECK(tally_record_data(&rec, &size) == tally_record_data(&many[i], NULL),
              "get_many points at the same bytes (zero copy)");
        CHECK(size >= tally_view_record_size(view), "record_data size");
        CHECK(tally_record_is_null(&rec, n) == 1, "is_null(N) is 1");
        CHECK(tally_record_int64(&rec, n) == 0, "int64(N) is 0");
        CHECK(isnan(tally_record_float64(&rec, n)), "float64(N) is NaN");
        print_record(view, shown, &rec);
    }
    rc = 0;

    /* a second handle on the same view, used after a renew, reads the same */
    E(tally_view_open(store, view_name, &again));
    /* a view opened after the snapshot was taken: renew first (asked with a
     * key that was found: one no record can have is TALLY_NOTFOUND at once) */
    for (i = 0; i < kl.n && status[i] != 0; i++) {}
    if (i < kl.n) {
        rc = get_one(txn, again, &kl, i, &rec);
        CHECK(rc == -30780 /* MDB_BAD_DBI */, "view newer than the transaction");
    }
    E(tally_txn_renew(txn));
    for (i = 0; i < kl.n; i++) {
        rc = get_one(txn, again, &kl, i, &rec);
        CHECK(rc == status[i], "same answer after renew");
        rc = 0;
    }
    tally_view_close(again);
    tally_txn_end(txn);

    free(many);
    free(status);
    free_keys(&kl);
    tally_view_close(view);
    tally_store_close(store);
    return 0;
}

/* Listing callbacks: ctx is a counter, or the store for print_view. */
static int count_views(const char *name, size_t len, void *ctx)
{
    int rc = 0;
    CHECK(strlen(name) == len && len > 0, "listed name is NUL-terminated, len bytes");
    ++*(int *)ctx;
    return 0;
}

#define STOP_LISTING 424242

static int stop_at_first(const char *name, size_t len, void *ctx)
{
    (void)name;
    (void)len;
    ++*(int *)ctx;
    return STOP_LISTING;
}

static int print_view(const char *name, size_t len, void *ctx)
{
    tally_view *view;
    int rc = tally_view_open((tally_store *)ctx, name, &view);  /* while listing */
    (void)len;
    if (rc) {
        printf("listed\t%s\terror %d\n", name, rc);
        return 0;
    }
    CHECK(strcmp(tally_view_name(view), name) == 0, "a listed view opens by its name");
    printf("listed\t%s\t%" PRIu32 "\n", name, tally_view_version(view));
    tally_view_close(view);
    return 0;
}

static int list_views(const char *path)
{
    tally_store *store;
    int rc = 0, calls = 0, n_views = 0;

    E(tally_store_open(path, &store));
    R(TALLY_EINVAL, tally_store_views(NULL, count_views, store));
    R(TALLY_EINVAL, tally_store_views(store, NULL, store));
    E(tally_store_views(store, count_views, &n_views));
    rc = tally_store_views(store, stop_at_first, &calls);
    CHECK(n_views == 0 ? rc == 0 && calls == 0 : rc == STOP_LISTING && calls == 1,
          "a non-zero callback return stops the listing and is returned");
    E(tally_store_views(store, print_view, store));
    tally_store_close(store);
    return 0;
}

static int watch(const char *path, const char *view_name, long snapshots)
{
    tally_store *store;
    tally_view *view;
    tally_txn *txn;
    tally_record rec;
    key_list kl;
    int64_t *last, min_counter = INT64_MAX, max_counter = INT64_MIN, snap_counter;
    long s, records = 0;
    size_t i;
    int rc = 0;

    E(tally_store_open(path, &store));
    E(tally_view_open(store, view_name, &view));
    CHECK(tally_view_feature_count(view) == 3 &&
          tally_view_feature_type(view, 0) == TALLY_INT64 &&
          tally_view_feature_type(view, 1) == TALLY_INT64 &&
          tally_view_feature_type(view, 2) == TALLY_FLOAT64, "watch needs (int, int, float)");
    read_keys(stdin, tally_view_key_type(view), &kl);
    last = (int64_t *)calloc(kl.n + 1, sizeof *last);
    CHECK(last != NULL, "out of memory");
    E(tally_txn_begin(store, &txn));
    for (s = 0; s < snapshots; s++) {
        snap_counter = INT64_MIN;
        for (i = 0; i < kl.n; i++) {
            int64_t c;
            rc = get_one(txn, view, &kl, i, &rec);
            if (rc == TALLY_NOTFOUND) continue;
            CHECK(rc == 0, "watch get");
            c = tally_record_int64(&rec, 0);
            CHECK(!tally_record_is_null(&rec, 0) && !tally_record_is_null(&rec, 1) &&
                  !tally_record_is_null(&rec, 2), "no nulls");
            CHECK(tally_record_int64(&rec, 1) == -c, "torn record: f1 != -f0");
            CHECK(tally_record_float64(&rec, 2) == (double)c / 2.0, "torn record: f2");
            CHECK(tally_record_event_time(&rec) == c, "torn record: event time");
            CHECK(c >= last[i], "a key's counter went back");
            if (snap_counter == INT64_MIN) snap_counter = c;
            CHECK(c == snap_counter, "one snapshot mixes two writes");
            last[i] = c;
            if (c > max_counter) max_counter = c;
            if (c < min_counter) min_counter = c;
            records++;
        }
        E(tally_txn_renew(txn));
    }
    tally_txn_end(txn);
    printf("watch ok %ld %ld %" PRId64 " %" PRId64 "\n", snapshots, records, min_counter,
           max_counter);
    free(last);
    free_keys(&kl);
    tally_view_close(view);
    tally_store_close(store);
    return 0;
}

/* ---- feature services ---- */

typedef struct {
    char **lines;               /* each row's line, its tabs made NULs */
    tally_key *keys;            /* n * n_entities keys, row by row */
    size_t n;
} row_list;

/* Rows of tab-separated keys, one per entity of svc, from in. */
static void read_rows(FILE *in, const tally_service *svc, row_list *rows)
{
    char line[4096];
    size_t cap = 0, e, n_entities = tally_service_entity_count(svc);
    int rc = 0;
    memset(rows, 0, sizeof *rows);
    while (fgets(line, sizeof line, in)) {
        size_t len = strlen(line);
        char *field;
        tally_key *keys;
        if (len && line[len - 1] == '\n') line[--len] = '\0';
        if (rows->n == cap) {
            cap = cap ? cap * 2 : 64;
            rows->lines = (char **)realloc(rows->lines, cap * sizeof *rows->lines);
            rows->keys = (tally_key *)realloc(rows->keys, cap * n_entities * sizeof *rows->keys);
            CHECK(rows->lines && rows->keys, "out of memory");
        }
        field = rows->lines[rows->n] = (char *)malloc(len + 1);
        CHECK(field != NULL, "out of memory");
        memcpy(field, line, len + 1);
        keys = &rows->keys[rows->n * n_entities];
        for (e = 0; e < n_entities; e++) {
            char *tab = strchr(field, '\t'), *end;
            CHECK((tab != NULL) == (e + 1 < n_entities), "a row needs one key per entity");
            if (tab) *tab = '\0';
            keys[e].string = field;
            keys[e].len = strlen(field);
            keys[e].int64 = 0;
            if (tally_service_entity_key_type(svc, e) == TALLY_KEY_INT64) {
                errno = 0;
                keys[e].int64 = strtoll(field, &end, 10);
                CHECK(errno == 0 && *end == '\0' && keys[e].len > 0, "bad int64 key on stdin");
            }
            if (tab) field = tab + 1;
        }
        rows->n++;
    }
}

static void free_rows(row_list *rows)
{
    size_t i;
    for (i = 0; i < rows->n; i++) free(rows->lines[i]);
    free(rows->lines);
    free(rows->keys);
}

/* The service API's answers to bad calls, and its accessors' bounds. */
static void check_service_errors(tally_store *store, tally_service *svc)
{
    tally_service *bad = (tally_service *)&bad;
    tally_txn *txn;
    tally_record recs[1];
    tally_key keys[1];
    size_t n_columns = tally_service_column_count(svc), n_views = tally_service_view_count(svc);
    size_t n_entities = tally_service_entity_count(svc), i;
    int rc = 0, found[1];
    char big[64];

    R(TALLY_ENOSERVICE, tally_service_open(store, "no such service", &bad));
    CHECK(bad == NULL, "failed service open clears *out");
    R(TALLY_EINVAL, tally_service_open(store, NULL, &bad));
    R(TALLY_EINVAL, tally_service_open(NULL, "s", &bad));
    R(TALLY_EINVAL, tally_service_open(store, "s", NULL));
    R(TALLY_ESPACE, tally_store_service(store, tally_service_name(svc), big, 1, &i));
    CHECK(n_columns > 0 && n_views > 0 && n_entities > 0, "a service reads something");
    CHECK(tally_service_column_name(svc, n_columns) == NULL, "column_name(n) is NULL");
    R(TALLY_EINVAL, tally_service_column_view(svc, n_columns));
    R(TALLY_EINVAL, tally_service_column_feature(svc, n_columns));
    CHECK(tally_service_entity_name(svc, n_entities) == NULL, "entity_name(n) is NULL");
    R(TALLY_EINVAL, tally_service_entity_key_type(svc, n_entities));
    CHECK(tally_service_view(svc, n_views) == NULL, "view(n) is NULL");
    R(TALLY_EINVAL, tally_service_view_entity(svc, n_views));

    E(tally_txn_begin(store, &txn));
    memset(keys, 0, sizeof keys);
    R(TALLY_EINVAL, tally_service_get(NULL, svc, keys, recs, found));
    R(TALLY_EINVAL, tally_service_get(txn, NULL, keys, recs, found));
    R(TALLY_EINVAL, tally_service_get(txn, svc, NULL, recs, found));
    R(TALLY_EINVAL, tally_service_get(txn, svc, keys, NULL, found));
    R(TALLY_EINVAL, tally_service_get(txn, svc, keys, recs, NULL));
    tally_txn_reset(txn);
    R(TALLY_EINVAL, tally_service_get(txn, svc, keys, recs, found));   /* a reset txn */
    tally_txn_end(txn);
    tally_service_close(NULL);
}

/* Row r's vector: each column's value, after checking that every view's
 * record is the one a plain lookup gives (the same bytes: no copy). */
static void print_vector(tally_txn *txn, const tally_service *svc, const tally_key *keys,
                         size_t r, tally_record *recs, int *found)
{
    size_t i, v;
    int rc = tally_service_get(txn, svc, keys, recs, found);
    CHECK(rc == 0, "tally_service_get");
    for (v = 0; v < tally_service_view_count(svc); v++) {
        const tally_view *view = tally_service_view(svc, v);
        const tally_key *key = &keys[tally_service_view_entity(svc, v)];
        tally_record rec;
        rc = tally_view_key_type(view) == TALLY_KEY_INT64
            ? tally_get_int64(txn, view, key->int64, &rec)
            : tally_get_string(txn, view, key->string, key->len, &rec);
        CHECK(rc == (found[v] ? 0 : TALLY_NOTFOUND), "found[v] is what a lookup gives");
        CHECK(!found[v] || tally_record_data(&rec, NULL) == tally_record_data(&recs[v], NULL),
              "the service's record is the lookup's (zero copy)");
    }
    for (i = 0; i < tally_service_column_count(svc); i++) {
        int view = tally_service_column_view(svc, i);
        size_t f = (size_t)tally_service_column_feature(svc, i);
        printf("vector\t%lu\t%s\t", (unsigned long)r, tally_service_column_name(svc, i));
        if (!found[view] || tally_record_is_null(&recs[view], f)) printf("null");
        else print_value(&recs[view], f,
                         tally_view_feature_type(tally_service_view(svc, (size_t)view), f));
        printf("\n");
    }
}

static void print_service(const tally_service *svc)
{
    size_t i;
    printf("service\t%s\t%" PRIu32 "\n", tally_service_name(svc), tally_service_version(svc));
    for (i = 0; i < tally_service_entity_count(svc); i++)
        printf("entity\t%lu\t%s\t%s\n", (unsigned long)i, tally_service_entity_name(svc, i),
               tally_service_entity_key_type(svc, i) == TALLY_KEY_INT64 ? "int64" : "string");
    for (i = 0; i < tally_service_view_count(svc); i++)
        printf("sview\t%lu\t%s\t%d\n", (unsigned long)i,
               tally_view_name(tally_service_view(svc, i)), tally_service_view_entity(svc, i));
    for (i = 0; i < tally_service_column_count(svc); i++) {
        int v = tally_service_column_view(svc, i), f = tally_service_column_feature(svc, i);
        printf("column\t%lu\t%s\t%d\t%d\t%s\n", (unsigned long)i,
               tally_service_column_name(svc, i), v, f,
               tally_view_feature_name(tally_service_view(svc, (size_t)v), (size_t)f));
    }
}

static int read_service(const char *path, const char *name)
{
    tally_store *store;
    tally_service *svc = (tally_service *)&svc;     /* must be overwritten */
    tally_txn *txn;
    tally_record *recs;
    row_list rows;
    size_t r, n_entities;
    int rc = 0, *found;

    E(tally_store_open(path, &store));
    rc = tally_service_open(store, name, &svc);
    if (rc) {
        CHECK(svc == NULL, "failed service open clears *out");
        printf("service\terror\t%d\n", rc);
        tally_store_close(store);
        return 0;
    }
    check_service_errors(store, svc);
    print_service(svc);
    read_rows(stdin, svc, &rows);
    n_entities = tally_service_entity_count(svc);
    recs = (tally_record *)calloc(tally_service_view_count(svc), sizeof *recs);
    found = (int *)calloc(tally_service_view_count(svc), sizeof *found);
    CHECK(recs && found, "out of memory");
    E(tally_txn_begin(store, &txn));
    for (r = 0; r < rows.n; r++) {
        print_vector(txn, svc, &rows.keys[r * n_entities], r, recs, found);
        tally_txn_reset(txn);                   /* a request per snapshot */
        E(tally_txn_renew(txn));
    }
    tally_txn_end(txn);
    free(recs);
    free(found);
    free_rows(&rows);
    tally_service_close(svc);
    tally_store_close(store);
    return 0;
}

/* Open the store and report the code: a truncated store must be refused
 * here, never by a SIGBUS later. */
static int open_only(const char *path)
{
    tally_store *store = (tally_store *)&store;     /* must be overwritten */
    int rc = tally_store_open(path, &store);
    CHECK(rc == 0 ? store != NULL : store == NULL, "*out is the store, or NULL on failure");
    printf("open\t%d\t%s\n", rc, tally_strerror(rc));
    tally_store_close(store);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[2], "--views") == 0) return list_views(argv[1]);
    if (argc == 3 && strcmp(argv[2], "--open") == 0) return open_only(argv[1]);
    if (argc == 4 && strcmp(argv[2], "--service") == 0) return read_service(argv[1], argv[3]);
    if (argc == 3) return dump(argv[1], argv[2]);
    if (argc == 5 && strcmp(argv[3], "--watch") == 0)
        return watch(argv[1], argv[2], atol(argv[4]));
    fprintf(stderr, "usage: %s STORE VIEW [--watch SNAPSHOTS] < keys | %s STORE --views | "
            "%s STORE --open | %s STORE --service NAME < rows\n", argv[0], argv[0], argv[0],
            argv[0]);
    return 2;
}
