/** @file tally.h
 * @brief libtally: read Tally's online store from C or C++, with no copy.
 *
 * Tally keeps one record per (feature view, entity) in an LMDB environment
 * that a Python writer (``tally.service.store.lmdb.LmdbStore``) updates.
 * This library opens that environment read-only and hands out pointers into
 * the memory map: a lookup costs one B-tree search and a few comparisons.
 * LMDB readers never block the writer and never see a half-written record;
 * a read transaction (#tally_txn) pins one consistent snapshot.
 *
 * A typical server:
 *
 *     tally_store *store;  tally_view *view;  tally_txn *txn;  tally_record rec;
 *     int rc = tally_store_open("/var/lib/tally/store", &store);
 *     if (rc == 0) rc = tally_view_open(store, "user_clicks", &view);
 *     if (rc == 0) rc = tally_txn_begin(store, &txn);
 *     for (each request) {
 *         rc = tally_get_int64(txn, view, user_id, &rec);
 *         if (rc == 0 && !tally_record_is_null(&rec, 0))
 *             use(tally_record_int64(&rec, 0));
 *         else if (rc != TALLY_NOTFOUND)
 *             log("%s", tally_strerror(rc));
 *         tally_txn_reset(txn);          // drop the snapshot; rec is now invalid
 *         rc = tally_txn_renew(txn);     // next request sees newer writes
 *     }
 *     tally_txn_end(txn);  tally_view_close(view);  tally_store_close(store);
 *
 * Conventions (those of lmdb.h): opaque handles, tally_<object>_<verb>
 * names, and functions that can fail return an int: 0 on success, otherwise
 * one of the TALLY_* codes below, an LMDB code (MDB_*, -30799..-30700) or a
 * positive errno value (ENOENT, EACCES, ENOMEM, ...), all passed through
 * unchanged; #tally_strerror describes every one of them.
 *
 * Threads: a #tally_store and its #tally_view handles may be shared by any
 * number of threads. A #tally_txn, and the records read through it, must be
 * used by one thread at a time; it may move between threads (the store is
 * opened with MDB_NOTLS). Do not open the same store twice in one process
 * (an LMDB rule): share one #tally_store instead. The Python ``LmdbStore`` in
 * the same process counts as an open.
 *
 * This header defines the stored layout: the TALLY_RECORD_* and
 * TALLY_SCHEMA_* macros below give every offset and size, and the Python
 * side (``tally.core.record``) follows them (tests/test_cext.py compares the
 * two). Little-endian, all offsets in bytes. A view whose features are all
 * numbers (int64, float64) has records of layout 1; a view with any string,
 * list or top_k feature has records of layout 2: layout 1 plus a variable
 * area.
 *
 *     offset  size    field
 *     0       1       layout version (1, or 2 with a variable area)
 *     1       1       flags (0; reserved)
 *     2       2       feature count N (uint16)
 *     4       4       view version (uint32)
 *     8       8       newest event time of the entity, epoch ms (int64;
 *                     INT64_MIN: none)
 *     16      8       write time, epoch ms (int64)
 *     24      8       valid until, epoch ms (int64): the time at which a
 *                     windowed value changes by expiry alone; INT64_MAX if
 *                     none does
 *     32      B       null bitmap, B = ceil(N / 64) * 8: bit i (byte i / 8,
 *                     bit i % 8, least significant first) set means feature
 *                     i is null
 *     32 + B  8 * N   one 8-byte slot per feature, in schema order: an int64
 *                     or float64 (IEEE 754 binary64) value; for a variable
 *                     feature a uint32 offset (from the record's start) then
 *                     a uint32 length of its value in the variable area
 *     F       ...     layout 2 only, F = 32 + B + 8 * N: the variable
 *                     values, each starting at a multiple of 8
 *
 * A record of layout 1 is therefore exactly F bytes; one of layout 2 at
 * least F. The slot of a null feature holds unspecified bytes. The variable
 * values, by type:
 *
 *     TALLY_STRING        its UTF-8 bytes (no NUL)
 *     TALLY_LIST_INT64, TALLY_LIST_FLOAT64
 *                         uint32 count n, uint32 0, n 8-byte items
 *     TALLY_LIST_STRING   uint32 count n, n + 1 uint32 offsets into the
 *                         bytes that follow (the first 0, the last their
 *                         length), the UTF-8 bytes of the n strings
 *     TALLY_TOP_K_*       uint32 k, uint32 0, k int64 counts, then the k
 *                         values as the matching list (largest count first)
 *
 * The LMDB database "__schemas__" maps each view name (UTF-8 bytes) to the
 * schema of the version it serves, and "<view name>@v<version>" to that
 * version's schema. Schema layout 1 (numbers-only views) or 2:
 *
 *     0       1       schema layout version (1 or 2)
 *     1       1       key type: 0 int64, 1 string
 *     2       2       feature count N (uint16)
 *     4       4       view version (uint32)
 *     8       ...     N entries: value type (1 byte: a TALLY_INT64 ...
 *                     TALLY_TOP_K_STRING code; layout 1 has only
 *                     TALLY_INT64 and TALLY_FLOAT64), name length L
 *                     (1 byte), L bytes of UTF-8 name
 *
 * The records of a view version live in the LMDB database
 * "view:<view name>@v<version>". Keys: an int64 entity key is 8 bytes
 * big-endian of (key XOR 2^63), so byte order matches numeric order; a
 * string key is its UTF-8 bytes.
 */
#ifndef TALLY_H
#define TALLY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @defgroup version Version
 * The header's version; #tally_version gives the library's at run time.
 * @{ */
#define TALLY_VERSION_MAJOR 0
#define TALLY_VERSION_MINOR 3
#define TALLY_VERSION_PATCH 0
/** MAJOR * 10000 + MINOR * 100 + PATCH, for preprocessor comparisons. */
#define TALLY_VERSION_NUMBER \
    (TALLY_VERSION_MAJOR * 10000 + TALLY_VERSION_MINOR * 100 + TALLY_VERSION_PATCH)
/** The record and schema layout versions this library reads: 1 for views of
 * numbers only, 2 for views with a variable feature. */
#define TALLY_RECORD_LAYOUT_VERSION 1
#define TALLY_RECORD_VARIABLE_LAYOUT_VERSION 2
#define TALLY_SCHEMA_LAYOUT_VERSION 1
#define TALLY_SCHEMA_VARIABLE_LAYOUT_VERSION 2
/** @} */

/** @defgroup layout Stored layout
 * Offsets and sizes in bytes of the record and schema layouts described at
 * the top of this header. #tally_record_data gives a record's bytes.
 * @{ */
#define TALLY_RECORD_LAYOUT_OFFSET          0   /**< uint8 */
#define TALLY_RECORD_LAYOUT_SIZE            1
#define TALLY_RECORD_FLAGS_OFFSET           1   /**< uint8, reserved (0) */
#define TALLY_RECORD_FLAGS_SIZE             1
#define TALLY_RECORD_FEATURE_COUNT_OFFSET   2   /**< uint16 */
#define TALLY_RECORD_FEATURE_COUNT_SIZE     2
#define TALLY_RECORD_VIEW_VERSION_OFFSET    4   /**< uint32 */
#define TALLY_RECORD_VIEW_VERSION_SIZE      4
#define TALLY_RECORD_EVENT_TIME_OFFSET      8   /**< int64 */
#define TALLY_RECORD_EVENT_TIME_SIZE        8
#define TALLY_RECORD_WRITE_TIME_OFFSET      16  /**< int64 */
#define TALLY_RECORD_WRITE_TIME_SIZE        8
#define TALLY_RECORD_VALID_UNTIL_OFFSET     24  /**< int64 */
#define TALLY_RECORD_VALID_UNTIL_SIZE       8
#define TALLY_RECORD_HEADER_SIZE            32
/** The null bitmap follows the header, in whole 64-bit words. */
#define TALLY_RECORD_BITMAP_WORD_SIZE       8
/** Every feature's slot (an int64 or float64 value, or a variable value's
 * offset and length) takes 8 bytes. */
#define TALLY_RECORD_VALUE_SIZE             8
/** In a variable feature's slot: the uint32 offset, then the uint32 length. */
#define TALLY_RECORD_SLOT_OFFSET_OFFSET     0
#define TALLY_RECORD_SLOT_LENGTH_OFFSET     4
/** Variable values start at multiples of this. */
#define TALLY_RECORD_VARIABLE_ALIGN         8
/** A list's header: uint32 count, uint32 reserved (for a list of strings,
 * the count and the first offset); a top_k's: uint32 k, uint32 reserved. */
#define TALLY_RECORD_LIST_HEADER_SIZE       8
/** The bitmap's size B for n features: ceil(n / 64) words. */
#define TALLY_RECORD_BITMAP_SIZE(n) \
    (((n) + 8 * TALLY_RECORD_BITMAP_WORD_SIZE - 1) / (8 * TALLY_RECORD_BITMAP_WORD_SIZE) * \
     TALLY_RECORD_BITMAP_WORD_SIZE)
/** The size of a record of n features in layout 1 (of the fixed part in
 * layout 2): header, bitmap, slots. */
#define TALLY_RECORD_SIZE(n) \
    (TALLY_RECORD_HEADER_SIZE + TALLY_RECORD_BITMAP_SIZE(n) + TALLY_RECORD_VALUE_SIZE * (n))

#define TALLY_SCHEMA_LAYOUT_OFFSET          0   /**< uint8 */
#define TALLY_SCHEMA_LAYOUT_SIZE            1
#define TALLY_SCHEMA_KEY_TYPE_OFFSET        1   /**< uint8: a TALLY_KEY_* */
#define TALLY_SCHEMA_KEY_TYPE_SIZE          1
#define TALLY_SCHEMA_FEATURE_COUNT_OFFSET   2   /**< uint16 */
#define TALLY_SCHEMA_FEATURE_COUNT_SIZE     2
#define TALLY_SCHEMA_VIEW_VERSION_OFFSET    4   /**< uint32 */
#define TALLY_SCHEMA_VIEW_VERSION_SIZE      4
#define TALLY_SCHEMA_HEADER_SIZE            8
/** Each feature entry: value type (a TALLY_INT64 ... TALLY_TOP_K_STRING byte),
 * name length L (one byte), then L bytes of name. */
#define TALLY_SCHEMA_ENTRY_HEADER_SIZE      2
/** @} */

/** Symbol visibility: the library is built with -fvisibility=hidden. */
#if defined(_WIN32)
#  define TALLY_API
#elif defined(__GNUC__) && __GNUC__ >= 4
#  define TALLY_API __attribute__((visibility("default")))
#else
#  define TALLY_API
#endif

/** @defgroup errors Return codes
 * 0 is success. Tally's own codes lie in -30599..-30500, clear of LMDB's
 * (-30799..-30700) and of errno values (positive).
 * @{ */
#define TALLY_SUCCESS   0
/** The view has no record for this key (not an error for a server). */
#define TALLY_NOTFOUND  (-30500)
/** The store has no view of this name. */
#define TALLY_ENOVIEW   (-30501)
/** An invalid argument: a NULL pointer, or a key of the wrong type for the
 * view (tally_get_int64 on a string-keyed view, and the reverse). */
#define TALLY_EINVAL    (-30502)
/** Stored bytes do not follow the layout: a truncated record or schema, an
 * unknown key or value type, a variable value out of the record's bounds or
 * inconsistent with its type's encoding. */
#define TALLY_ECORRUPT  (-30503)
/** A well-formed record that disagrees with the view's schema as read by
 * #tally_view_open (feature count or size): the view was most likely
 * redefined since; close the view and open it again. */
#define TALLY_ESCHEMA   (-30504)
/** A record or schema layout version this library does not read; a newer
 * writer needs a newer libtally. */
#define TALLY_ELAYOUT   (-30505)
/** More views opened than the store allows (#TALLY_MAX_VIEWS). */
#define TALLY_EVIEWS    (-30506)
/** The data file is shorter than the pages the store says it holds (a disk
 * that filled up, a partial copy): reading such a page through the memory
 * map would kill the process with SIGBUS, so #tally_store_open refuses the
 * store. Rebuild it (for Tally: delete it with its checkpoints, and let the
 * pipeline recompute both). */
#define TALLY_ETRUNCATED (-30507)
/** No feature service of this name in the store. */
#define TALLY_ENOSERVICE (-30508)
/** The caller's buffer is too small (see #tally_store_service). */
#define TALLY_ESPACE (-30509)
/** @} */

/** How many distinct views one #tally_store can open. */
#define TALLY_MAX_VIEWS 255

/** Key types of a view (the schema's key type byte). */
#define TALLY_KEY_INT64  0
#define TALLY_KEY_STRING 1

/** Value types of a feature (the schema's value type byte), in the order of
 * ``tally.core.types.VALUE_TYPES``. A top_k feature holds up to k (value,
 * count) pairs, the most frequent value first. */
#define TALLY_INT64          0
#define TALLY_FLOAT64        1
#define TALLY_STRING         2
#define TALLY_LIST_INT64     3
#define TALLY_LIST_FLOAT64   4
#define TALLY_LIST_STRING    5
#define TALLY_TOP_K_INT64    6
#define TALLY_TOP_K_FLOAT64  7
#define TALLY_TOP_K_STRING   8
/** The number of value types. */
#define TALLY_VALUE_TYPES    9

/** Header values meaning "none" (see the record layout). */
#define TALLY_EVENT_TIME_NONE  INT64_MIN
#define TALLY_VALID_FOREVER    INT64_MAX

/** An open online store (one LMDB environment). Opaque. */
typedef struct tally_store tally_store;
/** One feature view's schema and database. Opaque, immutable once open. */
typedef struct tally_view tally_view;
/** A read transaction: one snapshot of the store. Opaque. */
typedef struct tally_txn tally_txn;

/** A feature service opened for reading: its columns resolved to the
 * features of its open views. Opaque, immutable once open. */
typedef struct tally_service tally_service;

/** One entity's key in a feature service request (#tally_service_get): the
 * member the entity's key type names is read, the other ignored. */
typedef struct tally_key {
    int64_t int64;          /**< for a #TALLY_KEY_INT64 entity */
    const char *string;     /**< for a #TALLY_KEY_STRING entity: len bytes of
                                 UTF-8, not necessarily NUL-terminated */
    size_t len;
} tally_key;

/** One record, as a pointer into the memory map plus the view that decodes
 * it. Declared here only so that callers can place records on the stack or
 * in arrays: never read or write its members, use the accessors. A record
 * is valid from a successful get until its transaction is reset, renewed or
 * ended, and while its view is open. It owns nothing and needs no freeing. */
typedef struct tally_record {
    const unsigned char *priv_data;
    const tally_view *priv_view;
    size_t priv_size;
} tally_record;

/** @brief The library's version, which may differ from the header's.
 * @param[out] major, minor, patch Filled with the version if not NULL.
 * @return A static string such as "libtally 0.1.0"; never free it. */
TALLY_API const char *tally_version(int *major, int *minor, int *patch);

/** @brief A value type's name as Tally writes it ("int64", "list<string>",
 * "top_k<int64>", ...).
 * @return A static string, or NULL for a code that is no TALLY_* value type. */
TALLY_API const char *tally_type_name(int type);

/** @brief A description of a return code: Tally's, LMDB's or an errno value.
 * @return A static, never NULL, non-empty string; never free it. */
TALLY_API const char *tally_strerror(int err);

/** @defgroup store Store
 * @{ */

/** @brief Open an online store read-only.
 *
 * @param[in] path The store's directory (the one holding data.mdb and
 *     lock.mdb). The caller needs write access to lock.mdb, as every LMDB
 *     reader does (on a read-only file system the lock file is skipped).
 * @param[out] out Receives the new store; close it with #tally_store_close.
 * @return 0, or ENOENT (no store at path), EACCES, ENOMEM, TALLY_EINVAL,
 *     TALLY_ETRUNCATED (data.mdb is shorter than its last used page), or an
 *     LMDB code such as MDB_INVALID (not an LMDB file) or
 *     MDB_VERSION_MISMATCH. On failure *out is set to NULL.
 */
TALLY_API int tally_store_open(const char *path, tally_store **out);

/** @brief Close a store and free it. Every view and transaction opened on
 * it must be closed or ended first; every record read from it becomes
 * invalid. NULL is ignored. */
TALLY_API void tally_store_close(tally_store *store);

/** @brief A callback of #tally_store_views, called once per view.
 * @param[in] name The view's name, NUL-terminated UTF-8. Owned by the
 *     library and valid only until the callback returns: copy it to keep it.
 * @param[in] len The name's length in bytes, without the NUL.
 * @param[in] ctx The ctx passed to #tally_store_views, unchanged.
 * @return 0 to go on; any other value stops the listing, and
 *     #tally_store_views returns it. */
typedef int (tally_view_name_fn)(const char *name, size_t len, void *ctx);

/** @brief List the views the store serves, in the byte order of their names.
 *
 * The views are the names #tally_view_open accepts: the keys of
 * "__schemas__" except the "<view>@v<version>" entries (and except names
 * holding a NUL byte, which no C string can pass). The listing reads one
 * snapshot, through a read transaction of its own that stays live while the
 * callbacks run: keep them short. A callback may open views and read through
 * other transactions; it must not close the store. Thread-safe.
 *
 * @param[in] store An open store.
 * @param[in] fn Called with each view's name, in the calling thread.
 * @param[in] ctx Passed to fn.
 * @return 0 (also for a store with no view yet), fn's first non-zero return
 *     value, TALLY_EINVAL (a NULL store or fn), ENOMEM, or an LMDB code
 *     (such as MDB_READERS_FULL or MDB_MAP_RESIZED, see #tally_txn_begin).
 */
TALLY_API int tally_store_views(tally_store *store, tally_view_name_fn *fn, void *ctx);

/** @} */

/** @defgroup view View
 * @{ */

/** @brief Open a view: read its schema and find its database.
 *
 * The schema is read once: if the writer later redefines the view, lookups
 * report #TALLY_ESCHEMA until the view is opened again. A view may be used
 * with any transaction begun or renewed after this call returns.
 * Thread-safe (serialised internally).
 *
 * @param[in] store An open store.
 * @param[in] view_name The view's name, NUL-terminated UTF-8.
 * @param[out] out Receives the view; close it with #tally_view_close before
 *     closing the store. It may be shared between threads.
 * @return 0, TALLY_ENOVIEW, TALLY_ECORRUPT or TALLY_ELAYOUT (a bad schema),
 *     TALLY_EVIEWS, TALLY_EINVAL, ENOMEM, or an LMDB code. On failure *out
 *     is set to NULL.
 */
TALLY_API int tally_view_open(tally_store *store, const char *view_name, tally_view **out);

/** @brief Free a view. Records read through it become invalid. NULL is
 * ignored. */
TALLY_API void tally_view_close(tally_view *view);

/** @brief The view's name as passed to #tally_view_open; owned by the view,
 * valid until it is closed. */
TALLY_API const char *tally_view_name(const tally_view *view);

/** @brief The view's version from its schema. */
TALLY_API uint32_t tally_view_version(const tally_view *view);

/** @brief #TALLY_KEY_INT64 or #TALLY_KEY_STRING. */
TALLY_API int tally_view_key_type(const tally_view *view);

/** @brief The number of features N (0..65535). */
TALLY_API size_t tally_view_feature_count(const tally_view *view);

/** @brief The size in bytes of the fixed part of the view's records, 32 + B
 * + 8 * N: of every record if the view has no variable feature (layout 1);
 * records with a variable area are longer (see #tally_record_data). */
TALLY_API size_t tally_view_record_size(const tally_view *view);

/** @brief Feature i's name, NUL-terminated UTF-8, owned by the view and
 * valid until it is closed; NULL if i >= N. */
TALLY_API const char *tally_view_feature_name(const tally_view *view, size_t i);

/** @brief Feature i's type: #TALLY_INT64 ... #TALLY_TOP_K_STRING;
 * TALLY_EINVAL if i >= N. */
TALLY_API int tally_view_feature_type(const tally_view *view, size_t i);

/** @brief The index of the first feature called name, or TALLY_NOTFOUND.
 * Linear in N: look names up once, not per request. */
TALLY_API int tally_view_feature_index(const tally_view *view, const char *name);

/** @} */

/** @defgroup txn Read transactions
 * @{ */

/** @brief Begin a read transaction on the newest committed snapshot.
 *
 * If the writer grew the map beyond this process's mapping, the store
 * adopts the new size itself when no other transaction of it is live;
 * otherwise MDB_MAP_RESIZED is returned: reset or end the others, retry.
 *
 * @param[out] out Receives the transaction; end it with #tally_txn_end.
 * @return 0, ENOMEM, TALLY_EINVAL, or an LMDB code such as MDB_READERS_FULL
 *     (all reader slots in use) or MDB_MAP_RESIZED. On failure *out is set
 *     to NULL.
 */
TALLY_API int tally_txn_begin(tally_store *store, tally_txn **out);

/** @brief Release the transaction's snapshot but keep its reader slot, so
 * that #tally_txn_renew is cheap (no allocation, no lock of the reader
 * table). Every record read through it becomes invalid. Resetting a reset
 * transaction does nothing. Long-lived snapshots make the writer's file
 * grow: reset between requests. */
TALLY_API void tally_txn_reset(tally_txn *txn);

/** @brief Take a new snapshot in a reset transaction (see #tally_txn_begin
 * for MDB_MAP_RESIZED). Renewing a live transaction resets it first. On
 * failure the transaction stays reset and may be renewed again.
 * @return 0, TALLY_EINVAL, or an LMDB code. */
TALLY_API int tally_txn_renew(tally_txn *txn);

/** @brief End the transaction and free it; every record read through it
 * becomes invalid. NULL is ignored. */
TALLY_API void tally_txn_end(tally_txn *txn);

/** @} */

/** @defgroup get Lookups
 * On success the record points into the memory map: no copy is made. The
 * bytes belong to the store; do not modify them (the map is read-only: a
 * write faults). They stay valid until the transaction is reset, renewed
 * or ended. Each record is checked against the view before it is returned:
 * layout version (TALLY_ELAYOUT), feature count and size (TALLY_ESCHEMA),
 * and every variable value's bounds and encoding (TALLY_ECORRUPT; the UTF-8
 * of strings is not checked), so the accessors never read outside it.
 * The record's view version is not checked; read it with
 * #tally_record_view_version.
 * @{ */

/** @brief Look up an int64 entity key in an int64-keyed view.
 * @param[out] out Filled on success; left untouched otherwise.
 * @return 0, TALLY_NOTFOUND, TALLY_EINVAL (a NULL argument, a string-keyed
 *     view or a reset transaction), TALLY_ESCHEMA, TALLY_ELAYOUT, or an
 *     LMDB code (MDB_BAD_DBI: the view was opened after the transaction
 *     began; renew it).
 */
TALLY_API int tally_get_int64(tally_txn *txn, const tally_view *view, int64_t key,
                              tally_record *out);

/** @brief Look up a string entity key (len bytes of UTF-8, not necessarily
 * NUL-terminated) in a string-keyed view. A key that LMDB cannot store
 * (empty, or longer than its key limit of 511 bytes) is TALLY_NOTFOUND.
 * @return As #tally_get_int64, with TALLY_EINVAL for an int64-keyed view.
 */
TALLY_API int tally_get_string(tally_txn *txn, const tally_view *view, const char *key,
                               size_t len, tally_record *out);

/** @brief Look up n int64 keys in one snapshot.
 * @param[in] keys n keys.
 * @param[out] out n records; out[i] is filled where status[i] == 0.
 * @param[out] status n codes, one per key, as #tally_get_int64 returns.
 * @return 0 if every status is 0 or TALLY_NOTFOUND, else the first other
 *     status (every status is filled all the same), or TALLY_EINVAL for a
 *     NULL argument or a string-keyed view (then no status is filled). */
TALLY_API int tally_get_many_int64(tally_txn *txn, const tally_view *view,
                                   const int64_t *keys, size_t n,
                                   tally_record *out, int *status);

/** @brief Look up n string keys in one snapshot: key i is keys[i], lens[i]
 * bytes. Returns and fills as #tally_get_many_int64. */
TALLY_API int tally_get_many_string(tally_txn *txn, const tally_view *view,
                                    const char *const *keys, const size_t *lens, size_t n,
                                    tally_record *out, int *status);

/** @} */

/** @defgroup record Record accessors
 * All take a record filled by a successful lookup, whose transaction is
 * still live. They never fail and never read outside the record.
 * @{ */

/** @brief 1 if feature i is null (or i >= N), else 0. */
TALLY_API int tally_record_is_null(const tally_record *rec, size_t i);

/** @brief Feature i's value if it is an int64 feature; 0 if i >= N or the
 * feature is float64. A null feature's value is unspecified: check
 * #tally_record_is_null first. */
TALLY_API int64_t tally_record_int64(const tally_record *rec, size_t i);

/** @brief Feature i's value if it is a float64 feature; NaN if it is null,
 * if i >= N or if the feature is int64. */
TALLY_API double tally_record_float64(const tally_record *rec, size_t i);

/** @brief The entity's newest event time, epoch ms, or
 * #TALLY_EVENT_TIME_NONE (INT64_MIN). */
TALLY_API int64_t tally_record_event_time(const tally_record *rec);

/** @brief When the record was written, epoch ms. */
TALLY_API int64_t tally_record_write_time(const tally_record *rec);

/** @brief When a windowed value in the record changes by expiry alone,
 * epoch ms, or #TALLY_VALID_FOREVER (INT64_MAX). */
TALLY_API int64_t tally_record_valid_until(const tally_record *rec);

/** @brief The view version the record was written under. */
TALLY_API uint32_t tally_record_view_version(const tally_record *rec);

/** @brief The record's bytes, laid out as described at the top of this
 * header; *size (if size is not NULL) receives their number:
 * tally_view_record_size() for a view of numbers only, at least that with
 * a variable area. Owned by the store, read-only, valid as the record is. */
TALLY_API const void *tally_record_data(const tally_record *rec, size_t *size);

/** @} */

/** @defgroup service Feature services
 * A feature service names the features one model reads, across views and
 * entities; #tally_service_open resolves its columns once, and
 * #tally_service_get reads one request row's records, one per view, in
 * one snapshot. Column i is then feature tally_service_column_feature(i) of
 * record recs[tally_service_column_view(i)], read with the record accessors:
 *
 *     tally_service *svc;  tally_txn *txn;
 *     tally_record recs[8];  int found[8];     // >= tally_service_view_count
 *     tally_key keys[2];                       // >= tally_service_entity_count
 *     size_t i;
 *     int rc = tally_service_open(store, "recommend", &svc);
 *     if (rc == 0) rc = tally_txn_begin(store, &txn);
 *     for (each request) {
 *         keys[0].int64 = user_id;             // entity 0 is "user", int64
 *         keys[1].string = article;  keys[1].len = strlen(article);
 *         rc = tally_service_get(txn, svc, keys, recs, found);
 *         for (i = 0; rc == 0 && i < tally_service_column_count(svc); i++) {
 *             int v = tally_service_column_view(svc, i);
 *             int f = tally_service_column_feature(svc, i);
 *             if (!found[v] || tally_record_is_null(&recs[v], (size_t)f))
 *                 use_null(tally_service_column_name(svc, i));
 *             else
 *                 use(tally_service_column_name(svc, i), &recs[v], (size_t)f);
 *         }
 *         if (rc == TALLY_ESCHEMA) { ... }     // a view was redefined: reopen svc
 *         tally_txn_reset(txn);                // recs are now invalid
 *         rc = tally_txn_renew(txn);
 *     }
 *     tally_txn_end(txn);  tally_service_close(svc);
 *
 * Threads: a #tally_service may be shared by any number of threads, each
 * reading through a #tally_txn of its own (see #tally_txn_begin).
 *
 * Columns are the service's stored features. Its request-time features
 * (computed from a row's features and request fields, e.g. "is the current
 * article in the user's top category") are computed by the lookup server and
 * the Python readers, not here: compute them from the columns in the caller.
 * @{ */

/** @brief Copy the stored definition of a feature service.
 *
 * A feature service names the features one model reads, across views: its
 * definition is text, one header line "tally-service 1 <name> <version>"
 * then one line "<column> <view> <feature> <entity>" per feature, every
 * field an identifier separated by one space (see tally/core/serving.py).
 * #tally_service_open parses it and opens its views: most callers need
 * only that. Thread-safe; reads a snapshot through a transaction of its
 * own.
 *
 * @param[in] store An open store.
 * @param[in] name The service's name, NUL-terminated.
 * @param[out] buf Receives the text and a NUL; may be NULL when cap is 0.
 * @param[in] cap The size of buf in bytes.
 * @param[out] len Receives the text's length without the NUL (also when
 *     the buffer is too small, so the caller can retry with len + 1).
 * @return 0, TALLY_ENOSERVICE, TALLY_ESPACE (buf holds less than len + 1
 *     bytes; nothing is copied), TALLY_EINVAL, ENOMEM, or an LMDB code.
 */
TALLY_API int tally_store_service(tally_store *store, const char *name, char *buf,
                                  size_t cap, size_t *len);

/** @brief Open a feature service: parse its stored definition, open each of
 * its views (#tally_view_open) and find each column's feature.
 *
 * The definition and the views' schemas are read once, as
 * #tally_view_open reads a schema: a service the writer publishes again, or
 * a view it redefines, is seen once the service is opened again (lookups of
 * a redefined view report #TALLY_ESCHEMA). Use it with transactions begun or
 * renewed after this call returns. Thread-safe.
 *
 * @param[in] store An open store.
 * @param[in] name The service's name, NUL-terminated.
 * @param[out] out Receives the service; close it with #tally_service_close
 *     before closing the store. It may be shared between threads.
 * @return 0; TALLY_ENOSERVICE (no service of this name); TALLY_ECORRUPT
 *     (the text does not follow the format: a header other than
 *     "tally-service 1 <name> <version>" with this name and a decimal
 *     uint32 version, a line of other than 4 fields, an empty line, a NUL
 *     byte, no column, a column name given twice, a view given with two
 *     entities); TALLY_ESCHEMA (the store's views disagree with the
 *     service: a view lacks the column's feature, or one entity has views
 *     of int64 and of string keys); any code of #tally_view_open for one of
 *     its views (such as TALLY_ENOVIEW); TALLY_EINVAL, ENOMEM, or an LMDB
 *     code. On failure *out is set to NULL and everything opened is closed.
 */
TALLY_API int tally_service_open(tally_store *store, const char *name, tally_service **out);

/** @brief Close a service and the views it opened; records read through it
 * become invalid. NULL is ignored. */
TALLY_API void tally_service_close(tally_service *svc);

/** @brief The service's name; owned by the service, valid until it is
 * closed. */
TALLY_API const char *tally_service_name(const tally_service *svc);

/** @brief The service's version, from its definition's header. */
TALLY_API uint32_t tally_service_version(const tally_service *svc);

/** @brief The number of columns (at least 1), in the service's order. */
TALLY_API size_t tally_service_column_count(const tally_service *svc);

/** @brief Column i's name (NUL-terminated, owned by the service, valid
 * until it is closed); NULL if i >= the column count. */
TALLY_API const char *tally_service_column_name(const tally_service *svc, size_t i);

/** @brief The index (0 ..  view count - 1) of the view holding column i:
 * the index into #tally_service_get's recs and found; TALLY_EINVAL if i >=
 * the column count. */
TALLY_API int tally_service_column_view(const tally_service *svc, size_t i);

/** @brief The index of column i's feature in its view (for the record
 * accessors and #tally_view_feature_type); TALLY_EINVAL if i >= the column
 * count. */
TALLY_API int tally_service_column_feature(const tally_service *svc, size_t i);

/** @brief The number of entities a request row gives a key for (at least
 * 1): the length of #tally_service_get's keys. Entities are in the order
 * of their first column. */
TALLY_API size_t tally_service_entity_count(const tally_service *svc);

/** @brief Entity e's name (the request row's field); owned by the service,
 * valid until it is closed; NULL if e >= the entity count. */
TALLY_API const char *tally_service_entity_name(const tally_service *svc, size_t e);

/** @brief Entity e's key type, #TALLY_KEY_INT64 or #TALLY_KEY_STRING (that
 * of its views); TALLY_EINVAL if e >= the entity count. */
TALLY_API int tally_service_entity_key_type(const tally_service *svc, size_t e);

/** @brief The number of distinct views the columns read (at least 1):
 * the length of #tally_service_get's recs and found. Views are in the
 * order of their first column. */
TALLY_API size_t tally_service_view_count(const tally_service *svc);

/** @brief View v, owned by the service (never close it), valid until the
 * service is closed; NULL if v >= the view count. */
TALLY_API const tally_view *tally_service_view(const tally_service *svc, size_t v);

/** @brief The index of the entity whose key view v is read with;
 * TALLY_EINVAL if v >= the view count. */
TALLY_API int tally_service_view_entity(const tally_service *svc, size_t v);

/** @brief Read one request row: for each view v, the record of its
 * entity's key, as #tally_get_int64 or #tally_get_string would (no copy;
 * the same checks), all in the transaction's snapshot.
 *
 * @param[in] txn A live transaction, begun or renewed after the service was
 *     opened (else MDB_BAD_DBI: renew it).
 * @param[in] svc An open service of the transaction's store.
 * @param[in] keys One key per entity, in the entity order of
 *     #tally_service_entity_name; each read as its entity's key type says.
 * @param[out] recs One record per view; recs[v] is filled where found[v]
 *     is 1 and stays valid until the transaction is reset, renewed or
 *     ended, and while the service is open.
 * @param[out] found One flag per view: 1 if the view has a record for its
 *     entity's key, 0 if not (not an error; its columns are null).
 * @return 0 (whatever was found), or the first error of a view's lookup:
 *     TALLY_ESCHEMA (reopen the service), TALLY_ELAYOUT, TALLY_ECORRUPT, an
 *     LMDB code; then recs and found are unspecified. TALLY_EINVAL for a
 *     NULL argument, a reset transaction, a service of another store, or a
 *     NULL string key of non-zero length.
 */
TALLY_API int tally_service_get(tally_txn *txn, const tally_service *svc,
                                const tally_key *keys, tally_record *recs, int *found);

/** @} */

/** @defgroup variable Strings, lists and top_k
 * Accessors of variable features, under the rules of the record accessors.
 * Returned pointers point into the record (no copy): owned by the store,
 * read-only, valid as the record is. Strings are not NUL-terminated: use
 * the length. Items of a top_k feature are its values, read with the list
 * accessors of their type; #tally_record_top_k_count gives their counts.
 * @{ */

/** @brief Feature i's string, if it is a #TALLY_STRING feature: a pointer
 * to *len bytes of UTF-8 (len may be NULL). NULL (and *len 0) if the
 * feature is null, of another type, or i >= N; an empty string is a
 * non-NULL pointer with *len 0. */
TALLY_API const char *tally_record_string(const tally_record *rec, size_t i, size_t *len);

/** @brief The number of items of a list feature, or of (value, count)
 * pairs of a top_k feature; 0 if it is null, of another type, or i >= N. */
TALLY_API size_t tally_record_list_count(const tally_record *rec, size_t i);

/** @brief Item j of a #TALLY_LIST_INT64 or #TALLY_TOP_K_INT64 feature; 0 if
 * j >= tally_record_list_count() or the feature is of another type. */
TALLY_API int64_t tally_record_list_int64(const tally_record *rec, size_t i, size_t j);

/** @brief Item j of a #TALLY_LIST_FLOAT64 or #TALLY_TOP_K_FLOAT64 feature;
 * NaN if j >= tally_record_list_count() or the feature is of another type. */
TALLY_API double tally_record_list_float64(const tally_record *rec, size_t i, size_t j);

/** @brief Item j of a #TALLY_LIST_STRING or #TALLY_TOP_K_STRING feature: a
 * pointer to *len bytes of UTF-8 (len may be NULL); NULL (and *len 0) if j
 * is out of range or the feature is of another type. */
TALLY_API const char *tally_record_list_string(const tally_record *rec, size_t i, size_t j,
                                               size_t *len);

/** @brief The items of a list or top_k feature of int64 or float64 values
 * at once: a pointer to *count (count may be NULL) little-endian 8-byte
 * items, 8-aligned within the record but not necessarily in memory (LMDB
 * aligns values to 2 bytes only): copy them with memcpy rather than
 * casting the pointer. NULL (and *count 0) for a null feature, one of
 * another type, or i >= N. */
TALLY_API const void *tally_record_list_data(const tally_record *rec, size_t i, size_t *count);

/** @brief The count of pair j of a top_k feature (how often its value was
 * seen, as estimated); 0 if j is out of range or the feature is not a
 * top_k. */
TALLY_API int64_t tally_record_top_k_count(const tally_record *rec, size_t i, size_t j);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* TALLY_H */
