/* libtally: see tally.h for the API, the record layout and the rules. */
#include "tally.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lmdb.h>

#define SCHEMAS_DB "__schemas__"
#define SERVICE_PREFIX "_service:"
#define VIEW_DB_PREFIX "view:"

struct tally_store {
    MDB_env *env;
    pthread_mutex_t lock;       /* guards the fields below and dbi opens */
    unsigned live_txns;         /* transactions holding a snapshot */
    unsigned epoch;             /* bumped by each view open */
};

struct tally_view {
    tally_store *store;
    MDB_dbi dbi;
    unsigned epoch;             /* store epoch once its dbi was usable */
    char *name;
    uint32_t version;
    int key_type;
    size_t n_features;
    size_t bitmap_bytes;
    size_t record_size;         /* of the fixed part, with variable features */
    int variable;               /* any variable feature: records of layout 2 */
    unsigned char *types;       /* n_features value types */
    char **names;               /* n_features NUL-terminated names */
};

struct tally_txn {
    tally_store *store;
    MDB_txn *txn;
    unsigned epoch;             /* store epoch when the snapshot was taken */
    int live;
};

/* ---- byte order: the layout is little-endian, keys are big-endian ---- */

static uint64_t load_le64(const unsigned char *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
           (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 |
           (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static uint32_t load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static unsigned load_le16(const unsigned char *p)
{
    return (unsigned)p[0] | (unsigned)p[1] << 8;
}

static int64_t as_int64(uint64_t bits)
{
    int64_t v;
    memcpy(&v, &bits, sizeof v);    /* two's complement, no overflow UB */
    return v;
}

static double as_double(uint64_t bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static void encode_int64_key(int64_t key, unsigned char out[8])
{
    uint64_t u;
    int i;
    memcpy(&u, &key, sizeof u);
    u ^= (uint64_t)1 << 63;
    for (i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(u & 0xff);
        u >>= 8;
    }
}

/* ---- version, type names and errors ---- */

#define STR2(x) #x
#define STR(x) STR2(x)

const char *tally_version(int *major, int *minor, int *patch)
{
    if (major) *major = TALLY_VERSION_MAJOR;
    if (minor) *minor = TALLY_VERSION_MINOR;
    if (patch) *patch = TALLY_VERSION_PATCH;
    return "libtally " STR(TALLY_VERSION_MAJOR) "." STR(TALLY_VERSION_MINOR) "."
        STR(TALLY_VERSION_PATCH);
}

static const char *const TYPE_NAMES[TALLY_VALUE_TYPES] = {
    "int64", "float64", "string", "list<int64>", "list<float64>", "list<string>",
    "top_k<int64>", "top_k<float64>", "top_k<string>"};

const char *tally_type_name(int type)
{
    return type >= 0 && type < TALLY_VALUE_TYPES ? TYPE_NAMES[type] : NULL;
}

static int is_fixed(int type)
{
    return type == TALLY_INT64 || type == TALLY_FLOAT64;
}

const char *tally_strerror(int err)
{
    const char *s;
    switch (err) {
    case TALLY_SUCCESS: return "Successful return: 0";
    case TALLY_NOTFOUND: return "TALLY_NOTFOUND: No record for this key";
    case TALLY_ENOVIEW: return "TALLY_ENOVIEW: No view of this name in the store";
    case TALLY_EINVAL: return "TALLY_EINVAL: Invalid argument or key type";
    case TALLY_ECORRUPT: return "TALLY_ECORRUPT: Stored record or schema does not follow the layout";
    case TALLY_ESCHEMA: return "TALLY_ESCHEMA: Record does not match the view's schema; reopen the view";
    case TALLY_ELAYOUT: return "TALLY_ELAYOUT: Unsupported record or schema layout version";
    case TALLY_EVIEWS: return "TALLY_EVIEWS: Too many views open in this store";
    case TALLY_ETRUNCATED: return "TALLY_ETRUNCATED: The store's data file is shorter than "
        "its last page (truncated); rebuild the store";
    case TALLY_ENOSERVICE: return "TALLY_ENOSERVICE: No feature service of this name in the store";
    case TALLY_ESPACE: return "TALLY_ESPACE: The buffer is too small; *len tells the size needed";
    default: break;
    }
    /* mdb_strerror covers LMDB's codes and falls back to strerror(). */
    s = mdb_strerror(err);
    return (s && *s) ? s : "Unknown error";
}

/* ---- store ---- */

/* A data file shorter than its last used page: LMDB maps the whole file and
 * trusts its meta page, so a reader touching a page past the end of the file
 * would die of SIGBUS. The meta page itself lies in the first two pages,
 * which mdb_env_open has already read. */
static int check_not_truncated(MDB_env *env)
{
    MDB_envinfo info;
    MDB_stat stat;
    mdb_filehandle_t fd;
    struct stat file;
    int rc = mdb_env_info(env, &info);
    if (rc == 0) rc = mdb_env_stat(env, &stat);
    if (rc == 0) rc = mdb_env_get_fd(env, &fd);
    if (rc) return rc;
    if (fstat(fd, &file) != 0) return errno;
    if ((unsigned long long)file.st_size <
        ((unsigned long long)info.me_last_pgno + 1) * stat.ms_psize)
        return TALLY_ETRUNCATED;
    return 0;
}

int tally_store_open(const char *path, tally_store **out)
{
    tally_store *store;
    int rc, dead;

    if (!out) return TALLY_EINVAL;
    *out = NULL;
    if (!path) return TALLY_EINVAL;
    store = (tally_store *)calloc(1, sizeof *store);
    if (!store) return ENOMEM;
    if (pthread_mutex_init(&store->lock, NULL) != 0) {
        free(store);
        return ENOMEM;
    }
    rc = mdb_env_create(&store->env);
    if (rc) goto fail;
    /* one database per view plus __schemas__ */
    rc = mdb_env_set_maxdbs(store->env, TALLY_MAX_VIEWS + 1);
    if (rc) goto fail;
    /* Map size 0 adopts the writer's, recorded in the file. MDB_NOTLS: a
     * reader slot belongs to the tally_txn, not the thread. */
    rc = mdb_env_open(store->env, path, MDB_RDONLY | MDB_NOTLS, 0644);
    if (rc) goto fail;
    rc = check_not_truncated(store->env);
    if (rc) goto fail;
    /* Free the slots of readers that died, so the writer can reuse pages. */
    (void)mdb_reader_check(store->env, &dead);
    *out = store;
    return 0;
fail:
    if (store->env) mdb_env_close(store->env);
    pthread_mutex_destroy(&store->lock);
    free(store);
    return rc;
}

void tally_store_close(tally_store *store)
{
    if (!store) return;
    mdb_env_close(store->env);
    pthread_mutex_destroy(&store->lock);
    free(store);
}

/* ---- listing views ---- */

/* "<view>@v<version>" keys name view versions, not views. */
static int is_version_key(const MDB_val *key)
{
    const unsigned char *p = (const unsigned char *)key->mv_data;
    size_t i;
    for (i = 0; i + 1 < key->mv_size; i++)
        if (p[i] == '@' && p[i + 1] == 'v') return 1;
    return 0;
}

/* "_service:<name>" keys hold feature services, not views (view names never
 * start with '_'). */
static int is_service_key(const MDB_val *key)
{
    return key->mv_size >= sizeof SERVICE_PREFIX - 1 &&
        memcmp(key->mv_data, SERVICE_PREFIX, sizeof SERVICE_PREFIX - 1) == 0;
}

/* Open "__schemas__" in a transaction of its own, committed so that the
 * handle is usable in every transaction begun afterwards. */
static int open_schemas(tally_store *store, MDB_dbi *out)
{
    MDB_txn *txn;
    int rc;
    pthread_mutex_lock(&store->lock);           /* serialises dbi opens */
    rc = mdb_txn_begin(store->env, NULL, MDB_RDONLY, &txn);
    if (rc == 0) {
        rc = mdb_dbi_open(txn, SCHEMAS_DB, 0, out);
        if (rc == 0) rc = mdb_txn_commit(txn);
        else mdb_txn_abort(txn);
    }
    pthread_mutex_unlock(&store->lock);
    return rc;
}

/* Call fn for each view name under the cursor, each copied into name (room
 * for the longest key) to add the NUL. */
static int each_view(MDB_cursor *cursor, char *name, tally_view_name_fn *fn, void *ctx)
{
    MDB_val key, data;
    MDB_cursor_op op = MDB_FIRST;
    int rc;
    while ((rc = mdb_cursor_get(cursor, &key, &data, op)) == 0) {
        op = MDB_NEXT;
        if (is_version_key(&key) || is_service_key(&key) ||
            memchr(key.mv_data, '\0', key.mv_size)) continue;
        memcpy(name, key.mv_data, key.mv_size);
        name[key.mv_size] = '\0';
        rc = fn(name, key.mv_size, ctx);
        if (rc) return rc;
    }
    return rc == MDB_NOTFOUND ? 0 : rc;
}

int tally_store_views(tally_store *store, tally_view_name_fn *fn, void *ctx)
{
    tally_txn *txn = NULL;
    MDB_cursor *cursor = NULL;
    MDB_dbi schemas;
    char *name;
    int rc;

    if (!store || !fn) return TALLY_EINVAL;
    rc = open_schemas(store, &schemas);
    if (rc == MDB_NOTFOUND) return 0;           /* not a Tally store yet: no views */
    if (rc) return rc;
    name = (char *)malloc((size_t)mdb_env_get_maxkeysize(store->env) + 1);
    if (!name) return ENOMEM;
    rc = tally_txn_begin(store, &txn);
    if (rc == 0) rc = mdb_cursor_open(txn->txn, schemas, &cursor);
    if (rc == 0) rc = each_view(cursor, name, fn, ctx);
    if (cursor) mdb_cursor_close(cursor);
    tally_txn_end(txn);
    free(name);
    return rc;
}

/* ---- view ---- */

static void view_free(tally_view *view)
{
    size_t i;
    if (!view) return;
    if (view->names) {
        for (i = 0; i < view->n_features; i++) free(view->names[i]);
        free(view->names);
    }
    free(view->types);
    free(view->name);
    free(view);
}

static char *copy_bytes(const void *bytes, size_t len)
{
    char *s = (char *)malloc(len + 1);
    if (!s) return NULL;
    memcpy(s, bytes, len);
    s[len] = '\0';
    return s;
}

/* Parse a binary schema into view; TALLY_ECORRUPT / TALLY_ELAYOUT / ENOMEM. */
static int parse_schema(tally_view *view, const unsigned char *p, size_t size)
{
    size_t i, at, n;

    int layout, n_types;

    if (size < TALLY_SCHEMA_HEADER_SIZE) return TALLY_ECORRUPT;
    layout = p[TALLY_SCHEMA_LAYOUT_OFFSET];
    if (layout != TALLY_SCHEMA_LAYOUT_VERSION && layout != TALLY_SCHEMA_VARIABLE_LAYOUT_VERSION)
        return TALLY_ELAYOUT;
    /* layout 1 knows the two numeric types only */
    n_types = layout == TALLY_SCHEMA_LAYOUT_VERSION ? TALLY_FLOAT64 + 1 : TALLY_VALUE_TYPES;
    view->key_type = p[TALLY_SCHEMA_KEY_TYPE_OFFSET];
    if (view->key_type != TALLY_KEY_INT64 && view->key_type != TALLY_KEY_STRING)
        return TALLY_ECORRUPT;
    n = load_le16(p + TALLY_SCHEMA_FEATURE_COUNT_OFFSET);
    view->version = load_le32(p + TALLY_SCHEMA_VIEW_VERSION_OFFSET);
    view->n_features = 0;                       /* grows as names are copied */
    view->bitmap_bytes = TALLY_RECORD_BITMAP_SIZE(n);
    view->record_size = TALLY_RECORD_SIZE(n);
    view->types = (unsigned char *)malloc(n ? n : 1);
    view->names = (char **)calloc(n ? n : 1, sizeof *view->names);
    if (!view->types || !view->names) return ENOMEM;
    at = TALLY_SCHEMA_HEADER_SIZE;
    for (i = 0; i < n; i++) {
        const unsigned char *name;
        size_t len;
        if (size - at < TALLY_SCHEMA_ENTRY_HEADER_SIZE) return TALLY_ECORRUPT;
        if (p[at] >= n_types) return TALLY_ECORRUPT;
        if (!is_fixed(p[at])) view->variable = 1;
        len = p[at + 1];
        if (size - at - TALLY_SCHEMA_ENTRY_HEADER_SIZE < len) return TALLY_ECORRUPT;
        name = p + at + TALLY_SCHEMA_ENTRY_HEADER_SIZE;
        if (memchr(name, '\0', len)) return TALLY_ECORRUPT;  /* C strings */
        view->types[i] = p[at];
        view->names[i] = copy_bytes(name, len);
        if (!view->names[i]) return ENOMEM;
        view->n_features = i + 1;
        at += TALLY_SCHEMA_ENTRY_HEADER_SIZE + len;
    }
    if (at != size) return TALLY_ECORRUPT;      /* trailing bytes */
    return 0;
}

int tally_view_open(tally_store *store, const char *view_name, tally_view **out)
{
    tally_view *view;
    MDB_txn *txn = NULL;
    MDB_dbi schemas;
    MDB_val key, data;
    char *db_name = NULL;
    size_t name_len, db_name_size;
    int rc;

    if (!out) return TALLY_EINVAL;
    *out = NULL;
    if (!store || !view_name) return TALLY_EINVAL;
    name_len = strlen(view_name);
    view = (tally_view *)calloc(1, sizeof *view);
    if (!view) return ENOMEM;
    view->store = store;
    view->name = copy_bytes(view_name, name_len);
    /* records of each view version live in "view:<name>@v<version>"; the
     * schema under <name> names the current version */
    db_name_size = sizeof VIEW_DB_PREFIX + name_len + sizeof "@v4294967295";
    db_name = (char *)malloc(db_name_size);
    if (!view->name || !db_name) {
        rc = ENOMEM;
        goto done;
    }

    /* LMDB: one transaction at a time may open databases in a process, and
     * the handles become visible to others when it commits. */
    pthread_mutex_lock(&store->lock);
    rc = mdb_txn_begin(store->env, NULL, MDB_RDONLY, &txn);
    if (rc) goto unlock;
    rc = mdb_dbi_open(txn, SCHEMAS_DB, 0, &schemas);
    if (rc == MDB_NOTFOUND) rc = TALLY_ENOVIEW;         /* not a Tally store yet */
    if (rc) goto unlock;
    key.mv_data = (void *)view_name;
    key.mv_size = name_len;
    rc = name_len ? mdb_get(txn, schemas, &key, &data) : MDB_NOTFOUND;
    if (rc == MDB_NOTFOUND || rc == MDB_BAD_VALSIZE) rc = TALLY_ENOVIEW;
    if (rc) goto unlock;
    rc = parse_schema(view, (const unsigned char *)data.mv_data, data.mv_size);
    if (rc) goto unlock;
    snprintf(db_name, db_name_size, VIEW_DB_PREFIX "%s@v%lu", view_name,
             (unsigned long)view->version);
    rc = mdb_dbi_open(txn, db_name, 0, &view->dbi);
    if (rc == MDB_NOTFOUND) rc = TALLY_ENOVIEW;         /* schema without records db */
    if (rc == MDB_DBS_FULL) rc = TALLY_EVIEWS;
    if (rc) goto unlock;
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) goto unlock;
    view->epoch = ++store->epoch;
unlock:
    if (txn) mdb_txn_abort(txn);
    pthread_mutex_unlock(&store->lock);
done:
    free(db_name);
    if (rc) {
        view_free(view);
        return rc;
    }
    *out = view;
    return 0;
}

void tally_view_close(tally_view *view)
{
    /* The LMDB database handle stays open in the environment (LMDB advises
     * against mdb_dbi_close); opening the view again reuses it. */
    view_free(view);
}

const char *tally_view_name(const tally_view *view) { return view->name; }
uint32_t tally_view_version(const tally_view *view) { return view->version; }
int tally_view_key_type(const tally_view *view) { return view->key_type; }
size_t tally_view_feature_count(const tally_view *view) { return view->n_features; }
size_t tally_view_record_size(const tally_view *view) { return view->record_size; }

const char *tally_view_feature_name(const tally_view *view, size_t i)
{
    return i < view->n_features ? view->names[i] : NULL;
}

int tally_view_feature_type(const tally_view *view, size_t i)
{
    return i < view->n_features ? (int)view->types[i] : TALLY_EINVAL;
}

int tally_view_feature_index(const tally_view *view, const char *name)
{
    size_t i;
    if (!name) return TALLY_NOTFOUND;
    for (i = 0; i < view->n_features; i++)
        if (strcmp(view->names[i], name) == 0) return (int)i;
    return TALLY_NOTFOUND;
}

/* ---- transactions ---- */

/* Take a snapshot in txn (fresh if txn->txn is NULL, else renewed). The
 * snapshot is counted as live before LMDB is entered, so a thread that finds
 * itself the only live one may remap the environment safely. */
static int take_snapshot(tally_txn *t)
{
    tally_store *store = t->store;
    int rc, attempt;

    for (attempt = 0; attempt < 2; attempt++) {
        pthread_mutex_lock(&store->lock);
        store->live_txns++;
        t->epoch = store->epoch;
        pthread_mutex_unlock(&store->lock);

        rc = t->txn ? mdb_txn_renew(t->txn)
                    : mdb_txn_begin(store->env, NULL, MDB_RDONLY, &t->txn);
        if (rc == 0) {
            t->live = 1;
            return 0;
        }
        /* A failed mdb_txn_begin leaves t->txn NULL; a failed renew leaves
         * it reset, ready to be renewed again. */
        pthread_mutex_lock(&store->lock);
        store->live_txns--;
        if (rc == MDB_MAP_RESIZED && store->live_txns == 0 && attempt == 0) {
            /* The writer grew the map past ours: adopt its size. Holding the
             * lock keeps other snapshots from starting meanwhile. */
            int rc2 = mdb_env_set_mapsize(store->env, 0);
            pthread_mutex_unlock(&store->lock);
            if (rc2) return rc2;
            continue;
        }
        pthread_mutex_unlock(&store->lock);
        return rc;
    }
    return rc;
}

int tally_txn_begin(tally_store *store, tally_txn **out)
{
    tally_txn *t;
    int rc;

    if (!out) return TALLY_EINVAL;
    *out = NULL;
    if (!store) return TALLY_EINVAL;
    t = (tally_txn *)calloc(1, sizeof *t);
    if (!t) return ENOMEM;
    t->store = store;
    rc = take_snapshot(t);
    if (rc) {
        /* mdb_txn_begin frees its transaction on failure */
        free(t);
        return rc;
    }
    *out = t;
    return 0;
}

void tally_txn_reset(tally_txn *t)
{
    if (!t || !t->live) return;
    mdb_txn_reset(t->txn);
    t->live = 0;
    pthread_mutex_lock(&t->store->lock);
    t->store->live_txns--;
    pthread_mutex_unlock(&t->store->lock);
}

int tally_txn_renew(tally_txn *t)
{
    if (!t) return TALLY_EINVAL;
    tally_txn_reset(t);
    return take_snapshot(t);
}

void tally_txn_end(tally_txn *t)
{
    if (!t) return;
    tally_txn_reset(t);
    mdb_txn_abort(t->txn);
    free(t);
}

/* ---- lookups ---- */

/* Whether len bytes at p follow the list encoding of item type item (an
 * int64, float64 or string) with count items; 64-bit sums cannot overflow. */
static int list_ok(const unsigned char *p, uint64_t len, int item, uint64_t *count)
{
    uint64_t n, start, j, prev = 0;
    if (len < TALLY_RECORD_LIST_HEADER_SIZE) return 0;
    n = load_le32(p);
    *count = n;
    if (item != TALLY_STRING) return len == TALLY_RECORD_LIST_HEADER_SIZE + 8 * n;
    start = 8 + 4 * n;                  /* count, then n + 1 offsets */
    if (start > len) return 0;
    for (j = 0; j <= n; j++) {
        uint64_t end = load_le32(p + 4 + 4 * j);
        if ((j == 0 && end != 0) || end < prev) return 0;
        prev = end;
    }
    return prev == len - start;
}

/* The item type of a list or top_k type. */
static int item_type(int type)
{
    switch (type) {
    case TALLY_LIST_INT64: case TALLY_TOP_K_INT64: return TALLY_INT64;
    case TALLY_LIST_FLOAT64: case TALLY_TOP_K_FLOAT64: return TALLY_FLOAT64;
    default: return TALLY_STRING;
    }
}

static int is_top_k(int type)
{
    return type >= TALLY_TOP_K_INT64;
}

/* Whether a variable value of type follows its encoding. */
static int value_ok(int type, const unsigned char *p, uint64_t len)
{
    uint64_t k, count;
    if (type == TALLY_STRING) return 1;
    if (!is_top_k(type)) return list_ok(p, len, item_type(type), &count);
    if (len < TALLY_RECORD_LIST_HEADER_SIZE) return 0;
    k = load_le32(p);
    if (TALLY_RECORD_LIST_HEADER_SIZE + 8 * k > len) return 0;
    p += TALLY_RECORD_LIST_HEADER_SIZE + 8 * k;
    len -= TALLY_RECORD_LIST_HEADER_SIZE + 8 * k;
    return list_ok(p, len, item_type(type), &count) && count == k;
}

/* Every non-null variable value of a layout 2 record lies in its variable
 * area and follows its type's encoding: the accessors then need no checks. */
static int check_variable(const tally_view *view, const unsigned char *p, size_t size)
{
    size_t i;
    for (i = 0; i < view->n_features; i++) {
        const unsigned char *slot = p + TALLY_RECORD_HEADER_SIZE + view->bitmap_bytes +
                                    TALLY_RECORD_VALUE_SIZE * i;
        uint64_t at, len;
        if (is_fixed(view->types[i]) || ((p[TALLY_RECORD_HEADER_SIZE + i / 8] >> (i % 8)) & 1))
            continue;
        at = load_le32(slot + TALLY_RECORD_SLOT_OFFSET_OFFSET);
        len = load_le32(slot + TALLY_RECORD_SLOT_LENGTH_OFFSET);
        if (at < view->record_size || at + len > size || !value_ok(view->types[i], p + at, len))
            return TALLY_ECORRUPT;
    }
    return 0;
}

static int check_record(const tally_view *view, const MDB_val *data, tally_record *out)
{
    const unsigned char *p = (const unsigned char *)data->mv_data;
    int layout, rc;
    if (data->mv_size < TALLY_RECORD_HEADER_SIZE) return TALLY_ECORRUPT;
    layout = p[TALLY_RECORD_LAYOUT_OFFSET];
    if (layout != TALLY_RECORD_LAYOUT_VERSION && layout != TALLY_RECORD_VARIABLE_LAYOUT_VERSION)
        return TALLY_ELAYOUT;
    if (load_le16(p + TALLY_RECORD_FEATURE_COUNT_OFFSET) != view->n_features ||
        layout != (view->variable ? TALLY_RECORD_VARIABLE_LAYOUT_VERSION
                                  : TALLY_RECORD_LAYOUT_VERSION))
        return TALLY_ESCHEMA;
    if (!view->variable) {
        if (data->mv_size != view->record_size) return TALLY_ESCHEMA;
    } else {
        if (data->mv_size < view->record_size) return TALLY_ESCHEMA;
        rc = check_variable(view, p, data->mv_size);
        if (rc) return rc;
    }
    out->priv_data = p;
    out->priv_view = view;
    out->priv_size = data->mv_size;
    return 0;
}

static int get_raw(tally_txn *t, const tally_view *view, MDB_val *key, tally_record *out)
{
    MDB_val data;
    int rc;
    if (view->epoch > t->epoch) return MDB_BAD_DBI;     /* renew the txn */
    rc = mdb_get(t->txn, view->dbi, key, &data);
    if (rc == MDB_NOTFOUND) return TALLY_NOTFOUND;
    if (rc) return rc;
    return check_record(view, &data, out);
}

static int check_args(tally_txn *t, const tally_view *view, const void *out, int key_type)
{
    if (!t || !view || !out || !t->live) return TALLY_EINVAL;
    if (view->key_type != key_type || view->store != t->store) return TALLY_EINVAL;
    return 0;
}

static int get_int64(tally_txn *t, const tally_view *view, int64_t key, tally_record *out)
{
    unsigned char raw[8];
    MDB_val k;
    encode_int64_key(key, raw);
    k.mv_data = raw;
    k.mv_size = sizeof raw;
    return get_raw(t, view, &k, out);
}

static int get_string(tally_txn *t, const tally_view *view, const char *key, size_t len,
                      tally_record *out)
{
    MDB_val k;
    if (!key && len) return TALLY_EINVAL;
    if (len == 0 || len > (size_t)mdb_env_get_maxkeysize(t->store->env))
        return TALLY_NOTFOUND;                  /* no record can have this key */
    k.mv_data = (void *)key;
    k.mv_size = len;
    return get_raw(t, view, &k, out);
}

int tally_get_int64(tally_txn *t, const tally_view *view, int64_t key, tally_record *out)
{
    int rc = check_args(t, view, out, TALLY_KEY_INT64);
    return rc ? rc : get_int64(t, view, key, out);
}

int tally_get_string(tally_txn *t, const tally_view *view, const char *key, size_t len,
                     tally_record *out)
{
    int rc = check_args(t, view, out, TALLY_KEY_STRING);
    return rc ? rc : get_string(t, view, key, len, out);
}

static int first_error(int first, int rc)
{
    return (first == 0 && rc != 0 && rc != TALLY_NOTFOUND) ? rc : first;
}

int tally_get_many_int64(tally_txn *t, const tally_view *view, const int64_t *keys,
                         size_t n, tally_record *out, int *status)
{
    size_t i;
    int rc = check_args(t, view, out, TALLY_KEY_INT64), first = 0;
    if (rc) return rc;
    if ((!keys || !status) && n) return TALLY_EINVAL;
    for (i = 0; i < n; i++) {
        status[i] = get_int64(t, view, keys[i], &out[i]);
        first = first_error(first, status[i]);
    }
    return first;
}

int tally_get_many_string(tally_txn *t, const tally_view *view, const char *const *keys,
                          const size_t *lens, size_t n, tally_record *out, int *status)
{
    size_t i;
    int rc = check_args(t, view, out, TALLY_KEY_STRING), first = 0;
    if (rc) return rc;
    if ((!keys || !lens || !status) && n) return TALLY_EINVAL;
    for (i = 0; i < n; i++) {
        status[i] = get_string(t, view, keys[i], lens[i], &out[i]);
        first = first_error(first, status[i]);
    }
    return first;
}

/* ---- record accessors ---- */

static const unsigned char *value_at(const tally_record *rec, size_t i)
{
    return rec->priv_data + TALLY_RECORD_HEADER_SIZE + rec->priv_view->bitmap_bytes +
           TALLY_RECORD_VALUE_SIZE * i;
}

int tally_record_is_null(const tally_record *rec, size_t i)
{
    if (i >= rec->priv_view->n_features) return 1;
    return (rec->priv_data[TALLY_RECORD_HEADER_SIZE + i / 8] >> (i % 8)) & 1;
}

int64_t tally_record_int64(const tally_record *rec, size_t i)
{
    const tally_view *view = rec->priv_view;
    if (i >= view->n_features || view->types[i] != TALLY_INT64) return 0;
    return as_int64(load_le64(value_at(rec, i)));
}

double tally_record_float64(const tally_record *rec, size_t i)
{
    const tally_view *view = rec->priv_view;
    if (i >= view->n_features || view->types[i] != TALLY_FLOAT64 ||
        tally_record_is_null(rec, i))
        return NAN;
    return as_double(load_le64(value_at(rec, i)));
}

int64_t tally_record_event_time(const tally_record *rec)
{
    return as_int64(load_le64(rec->priv_data + TALLY_RECORD_EVENT_TIME_OFFSET));
}

int64_t tally_record_write_time(const tally_record *rec)
{
    return as_int64(load_le64(rec->priv_data + TALLY_RECORD_WRITE_TIME_OFFSET));
}

int64_t tally_record_valid_until(const tally_record *rec)
{
    return as_int64(load_le64(rec->priv_data + TALLY_RECORD_VALID_UNTIL_OFFSET));
}

uint32_t tally_record_view_version(const tally_record *rec)
{
    return load_le32(rec->priv_data + TALLY_RECORD_VIEW_VERSION_OFFSET);
}

const void *tally_record_data(const tally_record *rec, size_t *size)
{
    if (size) *size = rec->priv_size;
    return rec->priv_data;
}

/* ---- feature services ---- */

int tally_store_service(tally_store *store, const char *name, char *buf, size_t cap,
                        size_t *len)
{
    tally_txn *txn = NULL;
    MDB_dbi schemas;
    MDB_val key, data;
    char *service_key;
    size_t name_len;
    int rc;

    if (!store || !name || !len || (cap && !buf)) return TALLY_EINVAL;
    name_len = strlen(name);
    rc = open_schemas(store, &schemas);
    if (rc == MDB_NOTFOUND) return TALLY_ENOSERVICE;   /* not a Tally store yet */
    if (rc) return rc;
    service_key = (char *)malloc(sizeof SERVICE_PREFIX + name_len);
    if (!service_key) return ENOMEM;
    memcpy(service_key, SERVICE_PREFIX, sizeof SERVICE_PREFIX - 1);
    memcpy(service_key + sizeof SERVICE_PREFIX - 1, name, name_len);
    key.mv_data = service_key;
    key.mv_size = sizeof SERVICE_PREFIX - 1 + name_len;
    rc = tally_txn_begin(store, &txn);
    if (rc == 0) {
        rc = mdb_get(txn->txn, schemas, &key, &data);
        if (rc == MDB_NOTFOUND) rc = TALLY_ENOSERVICE;
    }
    if (rc == 0) {
        *len = data.mv_size;
        if (data.mv_size + 1 > cap) rc = TALLY_ESPACE;
        else {
            memcpy(buf, data.mv_data, data.mv_size);
            buf[data.mv_size] = '\0';
        }
    }
    tally_txn_end(txn);
    free(service_key);
    return rc;
}

/* ---- opening a feature service ---- */

typedef struct {
    const char *name, *feature_name;    /* into the service's text */
    int view;                   /* index into the service's views */
    int feature;                /* index in that view */
} service_column;

struct tally_service {
    tally_store *store;
    char *text;                 /* the definition, separators made NULs: names point here */
    const char *name;
    uint32_t version;
    size_t n_columns, n_views, n_entities;
    service_column *columns;
    const char **view_names;    /* n_views, in the order of their first column */
    tally_view **views;         /* n_views, opened by the service */
    int *view_entity;           /* n_views entity indexes */
    const char **entity_names;  /* n_entities, in the order of their first column */
    int *entity_key_types;      /* n_entities */
};

/* The stored text of service name, NUL-terminated, in *text (malloc'd, the
 * caller frees it, also on failure). */
static int read_definition(tally_store *store, const char *name, char **text, size_t *len)
{
    size_t cap = 0;
    int rc;
    *text = NULL;
    /* a definition republished between the two calls may have grown: retry */
    while ((rc = tally_store_service(store, name, *text, cap, len)) == TALLY_ESPACE) {
        free(*text);
        cap = *len + 1;
        *text = (char *)malloc(cap);
        if (!*text) return ENOMEM;
    }
    return rc;
}

static int is_blank(char c)
{
    /* Python's str.split() separators, less the line break */
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/* Split the NUL-terminated line at runs of blanks, each field NUL-terminated
 * in place; returns the field count, up to max + 1 (meaning "more"). */
static int split_fields(char *p, char **fields, int max)
{
    int n = 0;
    for (;;) {
        while (is_blank(*p)) *p++ = '\0';
        if (!*p) return n;
        if (n == max) return max + 1;
        fields[n++] = p;
        while (*p && !is_blank(*p)) p++;
    }
}

/* A decimal uint32 of digits only. */
static int parse_version(const char *s, uint32_t *out)
{
    uint64_t v = 0;
    if (!*s) return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return 0;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > UINT32_MAX) return 0;
    }
    *out = (uint32_t)v;
    return 1;
}

/* The index of name among the n names, or n if absent. */
static size_t index_of(const char *const *names, size_t n, const char *name)
{
    size_t i;
    for (i = 0; i < n && strcmp(names[i], name) != 0; i++) {}
    return i;
}

/* The index of name among the n names, appended (and n grown) if absent;
 * the array has room for one more. */
static size_t intern(const char **names, size_t *n, const char *name)
{
    size_t i = index_of(names, *n, name);
    if (i == *n) names[(*n)++] = name;
    return i;
}

/* One line "<column> <view> <feature> <entity>" into the next column, its
 * view and entity interned; TALLY_ECORRUPT if the line breaks the format. */
static int parse_column(tally_service *svc, char *line)
{
    char *f[4];
    service_column *c = &svc->columns[svc->n_columns];
    size_t e, v, i, views_before = svc->n_views;
    if (split_fields(line, f, 4) != 4) return TALLY_ECORRUPT;
    for (i = 0; i < svc->n_columns; i++)
        if (strcmp(svc->columns[i].name, f[0]) == 0) return TALLY_ECORRUPT;   /* twice */
    e = intern(svc->entity_names, &svc->n_entities, f[3]);
    v = intern(svc->view_names, &svc->n_views, f[1]);
    if (svc->n_views > views_before) svc->view_entity[v] = (int)e;
    else if (svc->view_entity[v] != (int)e) return TALLY_ECORRUPT;   /* one view, two entities */
    c->name = f[0];
    c->feature_name = f[2];
    c->view = (int)v;
    svc->n_columns++;
    return 0;
}

/* The text of len bytes (its NUL at len) into svc's columns, views and
 * entities; TALLY_ECORRUPT or ENOMEM. */
static int parse_definition(tally_service *svc, const char *name, size_t len)
{
    char *head[4], *line = svc->text, *end = svc->text + len, *next;
    size_t n_lines = 1, i;
    int rc;
    if (memchr(svc->text, '\0', len)) return TALLY_ECORRUPT;
    for (i = 0; i < len; i++) n_lines += svc->text[i] == '\n';
    /* a column per line at most; a view and an entity per column at most */
    svc->columns = (service_column *)calloc(n_lines, sizeof *svc->columns);
    svc->view_names = (const char **)calloc(n_lines, sizeof *svc->view_names);
    svc->views = (tally_view **)calloc(n_lines, sizeof *svc->views);
    svc->view_entity = (int *)calloc(n_lines, sizeof *svc->view_entity);
    svc->entity_names = (const char **)calloc(n_lines, sizeof *svc->entity_names);
    svc->entity_key_types = (int *)calloc(n_lines, sizeof *svc->entity_key_types);
    if (!svc->columns || !svc->view_names || !svc->views || !svc->view_entity ||
        !svc->entity_names || !svc->entity_key_types)
        return ENOMEM;
    for (i = 0; line < end; i++, line = next) {
        next = (char *)memchr(line, '\n', (size_t)(end - line));
        next = next ? next : end;
        *next++ = '\0';                /* the last line's NUL is the text's */
        if (i == 0) {
            if (split_fields(line, head, 4) != 4 || strcmp(head[0], "tally-service") != 0 ||
                strcmp(head[1], "1") != 0 || strcmp(head[2], name) != 0 ||
                !parse_version(head[3], &svc->version))
                return TALLY_ECORRUPT;
            svc->name = head[2];
        } else if (line[0] == ':' || line[0] == '?' || line[0] == '=') {
            continue;                  /* request-time features: the lookup server's */
        } else if ((rc = parse_column(svc, line)) != 0) {
            return rc;
        }
    }
    return svc->n_columns ? 0 : TALLY_ECORRUPT;   /* an empty text, or no column */
}

/* Open every view, then find each column's feature and each entity's key
 * type in them. */
static int open_views(tally_service *svc)
{
    size_t i;
    int rc;
    for (i = 0; i < svc->n_entities; i++) svc->entity_key_types[i] = -1;
    for (i = 0; i < svc->n_views; i++) {
        int *key_type = &svc->entity_key_types[svc->view_entity[i]];
        rc = tally_view_open(svc->store, svc->view_names[i], &svc->views[i]);
        if (rc) return rc;
        if (*key_type != -1 && *key_type != svc->views[i]->key_type)
            return TALLY_ESCHEMA;       /* one entity, int64 and string keys */
        *key_type = svc->views[i]->key_type;
    }
    for (i = 0; i < svc->n_columns; i++) {
        service_column *c = &svc->columns[i];
        c->feature = tally_view_feature_index(svc->views[c->view], c->feature_name);
        if (c->feature < 0) return TALLY_ESCHEMA;   /* the view no longer has it */
    }
    return 0;
}

void tally_service_close(tally_service *svc)
{
    size_t i;
    if (!svc) return;
    if (svc->views)
        for (i = 0; i < svc->n_views; i++) tally_view_close(svc->views[i]);
    free(svc->columns);
    free((void *)svc->view_names);
    free(svc->views);
    free(svc->view_entity);
    free((void *)svc->entity_names);
    free(svc->entity_key_types);
    free(svc->text);
    free(svc);
}

int tally_service_open(tally_store *store, const char *name, tally_service **out)
{
    tally_service *svc;
    size_t len;
    int rc;

    if (!out) return TALLY_EINVAL;
    *out = NULL;
    if (!store || !name) return TALLY_EINVAL;
    svc = (tally_service *)calloc(1, sizeof *svc);
    if (!svc) return ENOMEM;
    svc->store = store;
    rc = read_definition(store, name, &svc->text, &len);
    if (rc == 0) rc = parse_definition(svc, name, len);
    if (rc == 0) rc = open_views(svc);
    if (rc) {
        tally_service_close(svc);
        return rc;
    }
    *out = svc;
    return 0;
}

const char *tally_service_name(const tally_service *svc) { return svc->name; }
uint32_t tally_service_version(const tally_service *svc) { return svc->version; }
size_t tally_service_column_count(const tally_service *svc) { return svc->n_columns; }
size_t tally_service_entity_count(const tally_service *svc) { return svc->n_entities; }
size_t tally_service_view_count(const tally_service *svc) { return svc->n_views; }

const char *tally_service_column_name(const tally_service *svc, size_t i)
{
    return i < svc->n_columns ? svc->columns[i].name : NULL;
}

int tally_service_column_view(const tally_service *svc, size_t i)
{
    return i < svc->n_columns ? svc->columns[i].view : TALLY_EINVAL;
}

int tally_service_column_feature(const tally_service *svc, size_t i)
{
    return i < svc->n_columns ? svc->columns[i].feature : TALLY_EINVAL;
}

const char *tally_service_entity_name(const tally_service *svc, size_t e)
{
    return e < svc->n_entities ? svc->entity_names[e] : NULL;
}

int tally_service_entity_key_type(const tally_service *svc, size_t e)
{
    return e < svc->n_entities ? svc->entity_key_types[e] : TALLY_EINVAL;
}

const tally_view *tally_service_view(const tally_service *svc, size_t v)
{
    return v < svc->n_views ? svc->views[v] : NULL;
}

int tally_service_view_entity(const tally_service *svc, size_t v)
{
    return v < svc->n_views ? svc->view_entity[v] : TALLY_EINVAL;
}

/* ---- reading a feature service ---- */

int tally_service_get(tally_txn *t, const tally_service *svc, const tally_key *keys,
                      tally_record *recs, int *found)
{
    size_t v;
    if (!t || !svc || !keys || !recs || !found) return TALLY_EINVAL;
    for (v = 0; v < svc->n_views; v++) {
        const tally_view *view = svc->views[v];
        const tally_key *key = &keys[svc->view_entity[v]];
        int rc = view->key_type == TALLY_KEY_INT64
            ? tally_get_int64(t, view, key->int64, &recs[v])
            : tally_get_string(t, view, key->string, key->len, &recs[v]);
        found[v] = rc == 0;
        if (rc != 0 && rc != TALLY_NOTFOUND) return rc;
    }
    return 0;
}

/* ---- variable values (checked by check_variable at lookup) ---- */

/* Feature i's value and its length, if it is a non-null feature of a type
 * that want accepts; NULL otherwise. */
static const unsigned char *variable_at(const tally_record *rec, size_t i,
                                        int (*want)(int), size_t *len)
{
    const unsigned char *slot;
    *len = 0;
    if (i >= rec->priv_view->n_features || !want(rec->priv_view->types[i]) ||
        tally_record_is_null(rec, i))
        return NULL;
    slot = value_at(rec, i);
    *len = load_le32(slot + TALLY_RECORD_SLOT_LENGTH_OFFSET);
    return rec->priv_data + load_le32(slot + TALLY_RECORD_SLOT_OFFSET_OFFSET);
}

static int is_string(int type) { return type == TALLY_STRING; }
static int is_list(int type) { return !is_fixed(type) && type != TALLY_STRING; }
static int has_int64_items(int type) { return is_list(type) && item_type(type) == TALLY_INT64; }
static int has_float64_items(int type)
{
    return is_list(type) && item_type(type) == TALLY_FLOAT64;
}
static int has_number_items(int type) { return is_list(type) && item_type(type) != TALLY_STRING; }
static int has_string_items(int type) { return is_list(type) && item_type(type) == TALLY_STRING; }

/* The list (count, then items) of a list feature, or the values of a top_k. */
static const unsigned char *list_of(const tally_record *rec, size_t i, int (*want)(int),
                                    size_t *count)
{
    size_t len;
    const unsigned char *p = variable_at(rec, i, want, &len);
    *count = 0;
    if (!p) return NULL;
    if (is_top_k(rec->priv_view->types[i]))
        p += TALLY_RECORD_LIST_HEADER_SIZE + 8 * (size_t)load_le32(p);
    *count = load_le32(p);
    return p;
}

const char *tally_record_string(const tally_record *rec, size_t i, size_t *len)
{
    size_t n;
    const unsigned char *p = variable_at(rec, i, is_string, &n);
    if (len) *len = n;
    return (const char *)p;
}

size_t tally_record_list_count(const tally_record *rec, size_t i)
{
    size_t count;
    list_of(rec, i, is_list, &count);
    return count;
}

const void *tally_record_list_data(const tally_record *rec, size_t i, size_t *count)
{
    size_t n;
    const unsigned char *p = list_of(rec, i, has_number_items, &n);
    if (count) *count = n;
    return p ? p + TALLY_RECORD_LIST_HEADER_SIZE : NULL;
}

int64_t tally_record_list_int64(const tally_record *rec, size_t i, size_t j)
{
    size_t count;
    const unsigned char *p = list_of(rec, i, has_int64_items, &count);
    if (!p || j >= count) return 0;
    return as_int64(load_le64(p + TALLY_RECORD_LIST_HEADER_SIZE + 8 * j));
}

double tally_record_list_float64(const tally_record *rec, size_t i, size_t j)
{
    size_t count;
    const unsigned char *p = list_of(rec, i, has_float64_items, &count);
    if (!p || j >= count) return NAN;
    return as_double(load_le64(p + TALLY_RECORD_LIST_HEADER_SIZE + 8 * j));
}

const char *tally_record_list_string(const tally_record *rec, size_t i, size_t j, size_t *len)
{
    size_t count, start, begin;
    const unsigned char *p = list_of(rec, i, has_string_items, &count);
    if (len) *len = 0;
    if (!p || j >= count) return NULL;
    start = 8 + 4 * count;
    begin = load_le32(p + 4 + 4 * j);
    if (len) *len = load_le32(p + 4 + 4 * (j + 1)) - begin;
    return (const char *)p + start + begin;
}

int64_t tally_record_top_k_count(const tally_record *rec, size_t i, size_t j)
{
    size_t len;
    const unsigned char *p = variable_at(rec, i, is_top_k, &len);
    if (!p || j >= load_le32(p)) return 0;
    return as_int64(load_le64(p + TALLY_RECORD_LIST_HEADER_SIZE + 8 * j));
}
