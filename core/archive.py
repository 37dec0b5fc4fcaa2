"""Parquet archives: history older than a topic's first retained message.

An archive is a Parquet dataset (a local path or any pyarrow filesystem URI,
e.g. ``s3://bucket/read_events/``) with a source's schema. It declares the
event time it stops at, ``events_before_ms`` = T, in ``_tally_archive.json``
at its root: it holds the events with time < T and the topic supplies those
with time >= T, so an event at the boundary is counted once whichever side
also stored it. Without the file, T is one past the newest event time in the
archive (from the row-group statistics): then write archives at a time
boundary. The bootstrap and training sets both meet an archive and its
topic by this rule.
"""
import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tally.core.errors import TallyError

ARCHIVE_MANIFEST = "_tally_archive.json"


class ArchiveError(TallyError, OSError):
    """An archive cannot be opened or declares no usable boundary."""


def open_dataset(uri):
    """``(dataset, filesystem)`` of a Parquet path or URI."""
    # here, not at the top: pyarrow.dataset imports pandas (~0.2 s), which a
    # bootstrap's reader processes pay at every start though few read archives
    import pyarrow.dataset as ds
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        filesystem, path = pafs.LocalFileSystem(), uri
    try:
        return ds.dataset(path, format="parquet", filesystem=filesystem), filesystem
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as error:
        raise ArchiveError(f"archive {uri!r}: {error}") from None


def archive_boundary(uri, timestamp_field):
    """T: the archive holds the events with time < T (see the module doc)."""
    dataset, filesystem = open_dataset(uri)
    manifest = _read_manifest(dataset, filesystem)
    if manifest is not None:
        try:
            return int(manifest["events_before_ms"])
        except (KeyError, TypeError, ValueError):
            raise ArchiveError(f"archive {uri!r}: {ARCHIVE_MANIFEST} must hold "
                               '{"events_before_ms": <epoch ms>}') from None
    newest = None
    for fragment in dataset.get_fragments():
        metadata = fragment.metadata
        column = metadata.schema.names.index(timestamp_field) \
            if timestamp_field in metadata.schema.names else None
        if column is None:
            raise ArchiveError(f"archive {uri!r} has no column {timestamp_field!r}")
        for i in range(metadata.num_row_groups):
            stats = metadata.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max:
                raise ArchiveError(
                    f"archive {uri!r}: row groups without time statistics; declare the "
                    f"boundary in {ARCHIVE_MANIFEST} ({{\"events_before_ms\": ...}})")
            high = stats.max
            high = int(high.timestamp() * 1000) if hasattr(high, "timestamp") else int(high)
            newest = high if newest is None else max(newest, high)
    return None if newest is None else newest + 1


def _read_manifest(dataset, filesystem):
    files = dataset.files
    if not files:
        return None
    root = _common_directory(files)
    path = f"{root}/{ARCHIVE_MANIFEST}" if root else ARCHIVE_MANIFEST
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def _common_directory(files):
    parts = [f.split("/")[:-1] for f in files]
    common = parts[0]
    for other in parts[1:]:
        while other[:len(common)] != common:
            common = common[:-1]
    return "/".join(common)


def write_archive(table, path, events_before_ms, row_group_size=64_000,
                  file_name="part-0.parquet"):
    """Write events (an Arrow table) as an archive that declares its boundary."""
    os.makedirs(path, exist_ok=True)
    pq.write_table(table, os.path.join(path, file_name), row_group_size=row_group_size)
    with open(os.path.join(path, ARCHIVE_MANIFEST), "w") as manifest:
        json.dump({"events_before_ms": int(events_before_ms)}, manifest)


def _row_group_sizes(fragment):
    metadata = fragment.metadata
    return [(i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
