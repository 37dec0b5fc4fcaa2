"""A view's history, cut into work units that readers can fold in parallel.

**Topic.** For each partition the broker's internal stats list the ledgers
(id, entry count, offloaded or not) and the last confirmed entry. The cut is
that entry at plan time: the bootstrap folds every message at or before it,
the stream everything after it. Ledgers are split into units of about
``target_bytes`` of contiguous entries (a unit may span small ledgers, a large
ledger gives several units); a unit never mixes tiers -- BookKeeper,
offloaded read through the broker, offloaded read straight from object
storage (``tally.service.history.tiered``) -- so their read speeds can be
told apart. A directly read unit is a run of whole data blocks.

**Archive.** A Parquet dataset holding the events older than the topic's
history (``tally.core.archive``: where it stops and how it meets the topic),
cut into units of whole row groups.

Positions are (ledger, entry, batch index) triples, compared as tuples like
``tally.service.pulsar.topics.message_position``; ``END_OF_ENTRY`` as a batch index sorts after
every message of an entry.
"""
import math
from dataclasses import asdict, dataclass

from tally.core.archive import open_dataset
from tally.core.errors import TallyError
from tally.service.pulsar.topics import END_OF_ENTRY



class HistoryError(TallyError, RuntimeError):
    """The history cannot be planned or read as asked."""


@dataclass(frozen=True)
class TopicUnit:
    """Entries ``first``..``last`` (each a (ledger, entry) pair, inclusive) of
    one partition. ``blocks``: for a unit read from object storage, its data
    blocks, each ``(ledger, uuid, first entry, last entry, offset, length)``;
    empty for one read through the broker."""
    partition: int
    first: tuple
    last: tuple
    entries: int
    bytes: int
    offloaded: bool
    blocks: tuple = ()

    kind = "topic"

    @property
    def tier(self):
        return "direct" if self.blocks else "offloaded" if self.offloaded else "bookkeeper"

    def to_dict(self):
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class ArchiveUnit:
    """Row groups ``row_groups`` of one Parquet file of the archive."""
    path: str
    row_groups: tuple
    rows: int

    kind = "archive"

    def to_dict(self):
        return {"kind": self.kind, **asdict(self)}


def unit_from_dict(data):
    data = dict(data)
    kind = data.pop("kind")
    if kind == "topic":
        return TopicUnit(data["partition"], tuple(data["first"]), tuple(data["last"]),
                         data["entries"], data["bytes"], data["offloaded"],
                         tuple(tuple(block) for block in data.get("blocks", ())))
    return ArchiveUnit(data["path"], tuple(data["row_groups"]), data["rows"])


# --------------------------------------------------------------------------
# Topic


def partition_cut(stats):
    """The (ledger, entry) of the last confirmed entry in a partition's
    internal stats; entry -1 when its current ledger is still empty."""
    ledger, entry = stats["lastConfirmedEntry"].split(":")
    return int(ledger), int(entry)


def ledger_ranges(stats):
    """``(ledger, entries, bytes, offloaded)`` of every ledger holding entries
    at or before the cut, oldest first. The open ledger reports no entries or
    size in ``ledgers``; its share comes from the cut and ``currentLedger*``."""
    cut_ledger, cut_entry = partition_cut(stats)
    ranges = []
    for info in stats["ledgers"]:
        ledger = info["ledgerId"]
        if ledger > cut_ledger:
            break
        entries, size = info["entries"], info.get("size") or 0
        if entries == 0 and ledger == cut_ledger:          # the open ledger
            entries = stats.get("currentLedgerEntries") or 0
            size = stats.get("currentLedgerSize") or 0
        if ledger == cut_ledger and entries > cut_entry + 1:
            size = size * (cut_entry + 1) // entries
            entries = cut_entry + 1
        if entries > 0:
            ranges.append((ledger, entries, size, bool(info.get("offloaded"))))
    return ranges


def plan_partition(partition, stats, target_bytes, blocks=None, direct_target_bytes=None):
    """The work units of one partition, in log order: about ``target_bytes``
    each (entries hold varying numbers of messages; bytes track events).
    ``blocks``: the offloaded ledgers read from object storage, ``{ledger:
    (uuid, [(first entry, last entry, offset, length), ...])}``: their units
    are runs of whole blocks, of about ``direct_target_bytes`` (default:
    ``target_bytes``)."""
    units = _Units(partition, target_bytes, direct_target_bytes or target_bytes)
    for ledger, entries, size, offloaded in ledger_ranges(stats):
        if blocks and ledger in blocks:
            uuid, ledger_blocks = blocks[ledger]
            for first, last, offset, length in ledger_blocks:
                units.add("direct", (ledger, first), (ledger, last), last - first + 1, length,
                          (ledger, uuid, first, last, offset, length))
            continue
        tier = "offloaded" if offloaded else "bookkeeper"
        bytes_per_entry = max(size / entries, 1.0)
        start = 0
        while start < entries:
            take = min(entries - start, max(1, int(units.room(tier) // bytes_per_entry)))
            units.add(tier, (ledger, start), (ledger, start + take - 1), take,
                      int(take * bytes_per_entry))
            start += take
            if units.room(tier) < bytes_per_entry:
                units.close()
    units.close()
    return units.done


class _Units:
    """Units being planned: entries are added in log order to the open unit
    until it is full or the tier changes."""

    def __init__(self, partition, target_bytes, direct_target_bytes):
        self.partition = partition
        self.targets = {"direct": direct_target_bytes}
        self.target_bytes = target_bytes
        self.done, self.open = [], None     # open: [first, last, entries, bytes, tier, blocks]

    def room(self, tier):
        target = self.targets.get(tier, self.target_bytes)
        if self.open is None or self.open[4] != tier:
            return target
        return target - self.open[3]

    def add(self, tier, first, last, entries, size, block=None):
        if self.open and (self.open[4] != tier or
                          (block and self.open[3] + size > self.targets[tier])):
            self.close()
        if self.open is None:
            self.open = [first, last, 0, 0, tier, []]
        self.open[1] = last
        self.open[2] += entries
        self.open[3] += size
        if block:
            self.open[5].append(block)

    def close(self):
        if self.open:
            first, last, entries, size, tier, blocks = self.open
            self.done.append(TopicUnit(self.partition, first, last, entries, size,
                                       tier != "bookkeeper", tuple(blocks)))
            self.open = None


def target_unit_size(total, readers, units_per_reader=6, minimum=1):
    """Units small enough that ``readers`` stay busy to the end (and a resumed
    run loses little), large enough that a unit's setup cost is noise."""
    return max(minimum, math.ceil(total / max(1, readers * units_per_reader)))


def cut_position(stats):
    """The checkpoint position that covers everything up to the cut."""
    ledger, entry = partition_cut(stats)
    return (ledger, entry, END_OF_ENTRY)


def last_position(units):
    """The (ledger, entry) of the newest entry the units cover, or None."""
    return units[-1].last if units else None


# --------------------------------------------------------------------------
# Archive




def plan_archive(uri, readers, units_per_reader, minimum_rows=10_000):
    """The archive's work units: runs of row groups of one file, in file order,
    sized like the topic's (``target_unit_size``) by rows."""
    dataset, _ = open_dataset(uri)
    files = [(fragment.path, _row_group_sizes(fragment)) for fragment in dataset.get_fragments()]
    total = sum(rows for _, groups in files for _, rows in groups)
    target = target_unit_size(total, readers, units_per_reader, minimum=minimum_rows)
    units = []
    for path, groups in files:
        indexes, rows = [], 0
        for index, n_rows in groups:
            indexes.append(index)
            rows += n_rows
            if rows >= target:
                units.append(ArchiveUnit(path, tuple(indexes), rows))
                indexes, rows = [], 0
        if indexes:
            units.append(ArchiveUnit(path, tuple(indexes), rows))
    return units


def _row_group_sizes(fragment):
    metadata = fragment.metadata
    return [(i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]








