// Compiled by `make check-header` as C++ (and, as header_check.c, as C99 and
// C11): tally.h must stand alone, need no C-only construct and declare every
// function with C linkage.
#include "tally.h"

extern "C" int tally_header_check(tally_store *store);

static int ignore_view(const char *name, size_t len, void *ctx)
{
    return name && len && ctx ? 0 : 1;
}

int tally_header_check(tally_store *store)
{
    tally_view *view = nullptr;
    tally_txn *txn = nullptr;
    tally_record rec[2] = {};
    int64_t keys[2] = {1, TALLY_EVENT_TIME_NONE};
    int status[2];
    int rc = tally_store_views(store, ignore_view, store);
    if (rc == TALLY_SUCCESS) rc = tally_view_open(store, "v", &view);
    if (rc == TALLY_SUCCESS) rc = tally_txn_begin(store, &txn);
    if (rc == TALLY_SUCCESS) rc = tally_get_many_int64(txn, view, keys, 2, rec, status);
    if (rc == TALLY_SUCCESS && !tally_record_is_null(&rec[0], 0))
        rc = static_cast<int>(tally_record_int64(&rec[0], 0) + tally_record_event_time(&rec[0]));
    tally_service *svc = nullptr;
    tally_key request[2] = {{1, nullptr, 0}, {0, "a", 1}};
    int found[2];
    if (rc == TALLY_SUCCESS) rc = tally_service_open(store, "s", &svc);
    if (rc == TALLY_SUCCESS) rc = tally_service_get(txn, svc, request, rec, found);
    if (rc == TALLY_SUCCESS && found[0] && tally_service_view(svc, 0) != nullptr)
        rc = tally_service_column_feature(svc, 0);
    tally_service_close(svc);
    static_assert(TALLY_VERSION_NUMBER >= 100, "version number");
    static_assert(TALLY_RECORD_SIZE(65) == 32 + 16 + 8 * 65, "record size macro");
    (void)tally_strerror(rc);
    tally_txn_end(txn);
    tally_view_close(view);
    return rc;
}
