"""Offloaded ledgers read straight from object storage, the broker idle.

With infinite retention most of a topic's history lies in the tier. Read
through the broker, every event of it is fetched by a broker, dispatched and
wrapped as a client message, and the broker -- sharing the cores with the
readers -- sets the pace. Here the readers open the offloaded objects
themselves:

* **Where.** The broker's admin API names each offloaded ledger's offload
  UUID (``internal-info``), and the topic's applied offload policies name the
  driver, bucket, region and endpoint; Tally's own settings
  (``[tiered_storage]`` in tally.toml, ``TieredStorage`` on the ``Cluster``)
  override any of them and give the credentials (else the platform's
  credential chain: ``AWS_ACCESS_KEY_ID``, ``~/.aws``, instance roles).
* **Plan.** Each offloaded ledger's index object (a few KB) says where its
  data blocks begin; the planner cuts the ledger into units of whole blocks,
  so a reader starts at a block header and reads only its own bytes.
* **Read.** A reader fetches its blocks in large ranged reads through
  ``pyarrow.fs`` (S3, GCS, Azure), the next range in flight while the last is
  decoded by ``tally.core.entries`` (checksums verified, batches unpacked,
  payloads decompressed) into the payload batches the broker path gives.
  With ``tiered_storage.mount``, the bucket is read as files under that
  directory instead (``<mount>/<bucket>/<key>``: Mountpoint for Amazon S3,
  gcsfuse, blobfuse2, or an S3 server's own filesystem backend).

Nothing is guessed: a ledger whose objects cannot be found or read at plan
time is planned for the broker path, and a unit that fails while being read
directly, or holds entries only the broker can decode (encrypted, chunked,
transactional), is read again through the broker. Both are logged with the
reason and counted in the bootstrap's report (``direct_fallbacks``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading

from tally.core import entries as stored
from tally.core.errors import TallyError
from tally.service.pulsar.admin import Admin
from tally.service.pulsar.cluster import TieredStorage
from tally.service.pulsar.topics import partition_topic

log = logging.getLogger("tally.tiered")

# Ranged reads of this size keep an object store's per-request latency small
# against its transfer time; one is in flight while the last is decoded.
READ_BYTES = 16 << 20
RECEIVE_BATCH = 10_000                 # messages handed to the fold at once, as on the broker path

# Pulsar's offload drivers whose objects pyarrow reads, and how
_FILESYSTEMS = {"aws-s3": "s3", "s3": "s3", "aliyun-oss": "s3",
                "google-cloud-storage": "gcs", "azureblob": "azure"}


class DirectReadError(TallyError, RuntimeError):
    """Offloaded objects that cannot be read directly: use the broker path."""


@dataclasses.dataclass(frozen=True)
class ObjectStore:
    """Where one topic's offloaded objects are, and how to open them."""
    driver: str
    bucket: str
    region: str | None = None
    endpoint: str | None = None
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    mount: str | None = None            # a directory holding the buckets as files

    def filesystem(self):
        import pyarrow.fs as pafs
        if self.mount:
            return pafs.SubTreeFileSystem(self.mount, pafs.LocalFileSystem())
        kind = _FILESYSTEMS[self.driver]
        if kind == "s3":
            options = {"region": self.region or "us-east-1"}
            if self.endpoint:
                # An S3-compatible server (MinIO, Ceph, s3proxy) may refuse
                # the flexible checksums the AWS SDK sends by default since
                # 2025; ask for them only where an operation requires them.
                # The SDK reads these when the filesystem is made.
                os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
                os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
                scheme, _, host = self.endpoint.partition("://")
                options.update(endpoint_override=host or scheme,
                               scheme=scheme if host else "https")
            if self.access_key:
                options.update(access_key=self.access_key, secret_key=self.secret_key)
            return pafs.S3FileSystem(**options)
        if kind == "gcs":
            return pafs.GcsFileSystem(**({"endpoint_override": self.endpoint}
                                         if self.endpoint else {}))
        return pafs.AzureFileSystem(account_name=self.access_key, account_key=self.secret_key,
                                    **({"blob_storage_authority": self.endpoint}
                                       if self.endpoint else {}))

    def data_path(self, ledger, uuid):
        return f"{self.bucket}/{uuid}-ledger-{ledger}"

    def index_path(self, ledger, uuid):
        return f"{self.data_path(ledger, uuid)}-index"


# A choice, not a fallback: said in the log, not on /health.
DIRECT_READS_OFF = "direct reads are turned off (tiered_storage.direct)"


def object_store(policies, settings=None):
    """The ``ObjectStore`` of a topic's applied offload ``policies`` (admin
    API) overridden by Tally's ``settings``; ``(None, reason)`` when its
    offloaded ledgers must be read through the broker."""
    settings = settings or TieredStorage()
    if not settings.direct:
        return None, DIRECT_READS_OFF
    driver = (policies.get("managedLedgerOffloadDriver") or "").lower()
    if driver not in _FILESYSTEMS:
        return None, f"offload driver {driver or 'none'!r} is not read directly"
    prefix = {"s3": "s3", "aws-s3": "s3", "aliyun-oss": "s3",
              "google-cloud-storage": "gcs"}.get(driver, "")

    def policy(name):
        return policies.get(f"managedLedgerOffload{name}") or \
            (policies.get(f"{prefix}ManagedLedgerOffload{name}") if prefix else None)
    bucket = settings.bucket or policy("Bucket")
    if not bucket:
        return None, "the offload policies name no bucket (set tiered_storage.bucket)"
    return ObjectStore(driver, bucket, settings.region or policy("Region"),
                       settings.endpoint or policy("ServiceEndpoint"),
                       settings.access_key, settings.secret_key, settings.mount), None


# --------------------------------------------------------------------------
# Planning: which ledgers are read directly, in which blocks

INDEX_READERS = 8                       # index objects fetched at once while planning


def plan_direct_reads(cluster, topic, stats):
    """``(store, blocks, fallbacks)`` for the partitions in ``stats``
    (internal stats by partition): the topic's object store (None if its
    offloaded ledgers are read through the broker), ``{partition: {ledger:
    (uuid, blocks)}}`` of the ledgers read directly (``plan_partition``), and
    why any offloaded ledger is read through the broker instead, each
    logged."""
    offloaded = {p: {info["ledgerId"]: info["entries"] for info in s["ledgers"]
                     if info.get("offloaded")} for p, s in stats.items()}
    offloaded = {p: ledgers for p, ledgers in offloaded.items() if ledgers}
    if not offloaded:
        return None, {}, []
    admin = Admin(cluster)
    store, reason = object_store(admin.offload_policies(partition_topic(topic, min(offloaded))),
                                 cluster.tiered_storage)
    if store is None:
        chosen = reason == DIRECT_READS_OFF
        log.log(logging.INFO if chosen else logging.WARNING,
                "%s: offloaded ledgers are read through the broker: %s", topic, reason)
        return None, {}, [] if chosen else [reason]
    blocks, fallbacks = {}, []
    with concurrent.futures.ThreadPoolExecutor(INDEX_READERS, "tally-tiered-plan") as pool:
        for partition, ledgers in offloaded.items():
            uuids = {ledger.ledger_id: ledger.uuid
                     for ledger in admin.offloaded_ledgers(partition_topic(topic, partition))}
            found = {ledger: pool.submit(_checked_blocks, store, ledger, uuids.get(ledger), n)
                     for ledger, n in ledgers.items()}
            for ledger, future in found.items():
                try:
                    blocks.setdefault(partition, {})[ledger] = (uuids[ledger], future.result())
                except DirectReadError as error:
                    log.warning("%s partition %d ledger %d: read through the broker: %s",
                                topic, partition, ledger, error)
                    fallbacks.append(str(error))
    return store, blocks, fallbacks


def _checked_blocks(store, ledger, uuid, entries):
    """The ledger's blocks, which must hold its entries 0..entries-1."""
    if uuid is None:
        raise DirectReadError(f"ledger {ledger} is offloaded but its offload is not complete")
    blocks = ledger_blocks(filesystem_for(store), store, ledger, uuid)
    if blocks[0][0] != 0 or blocks[-1][1] != entries - 1:
        raise DirectReadError(f"ledger {ledger}'s index covers entries {blocks[0][0]}.."
                              f"{blocks[-1][1]}, not the {entries} the broker lists")
    return blocks


def ledger_blocks(filesystem, store, ledger, uuid):
    """``[(first entry, last entry, offset, length)]`` of each data block of
    an offloaded ledger, from its index object."""
    path = store.index_path(ledger, uuid)
    try:
        with filesystem.open_input_file(path) as handle:
            index = handle.read()
    except OSError as error:
        raise DirectReadError(f"{path}: {error}") from None
    blocks, data_length, last_entry = stored.parse_index(index)
    ends = [offset for _, offset in blocks[1:]] + [data_length]
    lasts = [first - 1 for first, _ in blocks[1:]] + [last_entry]
    return [(first, last, offset, end - offset)
            for (first, offset), last, end in zip(blocks, lasts, ends)]


# --------------------------------------------------------------------------
# Reading a unit (in a reader process)


_filesystems = {}


def filesystem_for(store):
    """This process's one filesystem of ``store``."""
    if store not in _filesystems:
        _filesystems[store] = store.filesystem()
    return _filesystems[store]


def unit_messages(store, unit):
    """The messages of an offloaded unit in log order, in batches of about
    ``RECEIVE_BATCH``: ``(payloads, times, malformed)`` as ``Messages.take``
    gives them. Raises ``DirectReadError`` (or ``NeedsBroker``) when the
    broker must read it instead."""
    out = stored.Messages()
    reads = [(block, at, min(READ_BYTES, block[5] - at))
             for block in unit.blocks for at in range(0, block[5], READ_BYTES)]
    decoding = None                     # the block being decoded: [block, buffer, base, at]
    for (block, at, _), chunk in _prefetched(store, reads):
        if at == 0:
            decoding = _start_block(store, block, chunk)
        elif decoding is None or decoding[0] is not block:
            continue                    # the rest of a block already decoded to its end
        else:
            _, buffer, base, position = decoding
            rest = memoryview(buffer)[position:]
            decoding[1:] = [bytes(rest) + bytes(chunk) if len(rest) else chunk,
                            base + position, 0]
        _, buffer, base, position = decoding
        ledger, _, first, last, offset, length = block
        position, stop = stored.decode_entries(buffer, position, length - base, first, last,
                                               out)
        decoding[3] = position
        if stop != stored.NEED_MORE:
            decoding = None
        elif at + len(chunk) >= length:
            raise DirectReadError(f"ledger {ledger}: the block at {offset} ends inside an entry")
        if len(out) >= RECEIVE_BATCH:
            yield out.take()
    if out.entries != unit.entries:
        raise DirectReadError(f"read {out.entries} entries of the {unit.entries} planned "
                              f"in {unit.first}..{unit.last}")
    if len(out) or out.malformed:
        yield out.take()


def _start_block(store, block, chunk):
    """``[block, buffer, base, position]`` at a block's first entry, its header checked."""
    ledger, _, first, _, offset, length = block
    header_length, block_length, block_first = stored.parse_block_header(chunk)
    if (block_length, block_first) != (length, first):
        raise DirectReadError(f"ledger {ledger}: the block at {offset} is {block_length} bytes "
                              f"from entry {block_first}; the index said {length} from {first}")
    return [block, chunk, 0, header_length]


PREFETCH = 2                            # ranged reads in flight ahead of the decoder


def _prefetched(store, reads):
    """``((block, at, size), bytes)`` for each read in order, ``PREFETCH``
    of them in flight on threads (pyarrow releases the GIL) across blocks
    and objects, so the decoder never waits for a block's first read."""
    filesystem, handles, opening = filesystem_for(store), {}, threading.Lock()

    def read(block, at, size):
        ledger, uuid, _, _, offset, _ = block
        path = store.data_path(ledger, uuid)
        try:
            with opening:
                if path not in handles:
                    handles[path] = filesystem.open_input_file(path)
            return handles[path].read_at(size, offset + at)
        except OSError as error:
            raise DirectReadError(f"{path} at {offset + at}: {error}") from None
    with concurrent.futures.ThreadPoolExecutor(PREFETCH, "tally-tiered-read") as pool:
        pending = collections.deque()
        try:
            for item in reads:
                pending.append((item, pool.submit(read, *item)))
                if len(pending) > PREFETCH:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            for handle in handles.values():
                handle.close()
