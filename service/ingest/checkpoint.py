"""Checkpoints: a partition's view state and its position, saved together.

Layout under the checkpoint root (a local directory)::

    <root>/<view>/<state hash>/p<partition>/<sequence:012d>.ckpt

A checkpoint is one snapshot container (``tally.core.snapshot``): the view
state's arrays, plus in its metadata the position (ledger, entry, batch index)
of the last message folded into that state. Position and state are therefore
always consistent: restoring a checkpoint and resuming after its position
counts every message exactly once.

Sequence numbers fence out a stale owner. A worker saves checkpoint n+1 only
if n is the one it restored from or saved last; the file is published with
``os.link``, which fails if the name exists, so of two processes that both
believe they own a partition (Failover hands it over while the old owner is
still mid-batch) exactly one wins, and the loser learns it lost the partition
(``CheckpointConflict``) before it acknowledges anything.

Fault injection for tests: ``TALLY_CRASH_IN_CHECKPOINT=<probability>`` makes
the process SIGKILL itself at a random step of a checkpoint.
"""
import os
import random
import re
import signal

from tally.core import snapshot

_NAME = re.compile(r"^(\d{12})\.ckpt$")
_TEMPORARY = re.compile(r"^(\d{12})\.ckpt\.tmp-\d+$")
KEEP = 3          # older checkpoints are deleted once a newer one is published


class CheckpointConflict(RuntimeError):
    """Another process published a newer checkpoint: this one lost the partition."""


class CheckpointStore:
    def __init__(self, root):
        self.root = os.path.abspath(root)

    def directory(self, view_name, state_hash, partition):
        return os.path.join(self.root, view_name, state_hash, f"p{partition}")

    def latest_sequence(self, view_name, state_hash, partition):
        """The newest published sequence number, or 0 if there is none."""
        directory = self.directory(view_name, state_hash, partition)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return 0
        sequences = [int(m.group(1)) for m in map(_NAME.match, names) if m]
        return max(sequences, default=0)

    def load(self, view_name, state_hash, partition, sequence):
        """``(arrays, meta)`` of a published checkpoint."""
        path = os.path.join(self.directory(view_name, state_hash, partition),
                            f"{sequence:012d}.ckpt")
        return snapshot.load(path)

    def save(self, view_name, state_hash, partition, sequence, arrays, meta):
        """Publish checkpoint ``sequence``; raise CheckpointConflict if it exists."""
        directory = self.directory(view_name, state_hash, partition)
        os.makedirs(directory, exist_ok=True)
        final = os.path.join(directory, f"{sequence:012d}.ckpt")
        tmp = f"{final}.tmp-{os.getpid()}"
        _maybe_crash()
        with open(tmp, "wb") as f:
            f.write(snapshot.dumps(arrays, meta))
            f.flush()
            os.fsync(f.fileno())
        _maybe_crash()
        try:
            os.link(tmp, final)          # atomic, and fails if another owner got there
        except FileExistsError:
            raise CheckpointConflict(
                f"checkpoint {sequence} of {view_name} partition {partition} was published "
                "by another process") from None
        finally:
            os.unlink(tmp)
        _fsync_directory(directory)
        _maybe_crash()
        self._prune(directory, sequence)

    def _prune(self, directory, newest):
        """Drop old checkpoints, and temporary files that crashed writers left
        behind for sequences already published."""
        for name in os.listdir(directory):
            published, temporary = _NAME.match(name), _TEMPORARY.match(name)
            if (published and int(published.group(1)) <= newest - KEEP) or \
                    (temporary and int(temporary.group(1)) <= newest):
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass          # another process pruned it first


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_crash():
    probability = float(os.environ.get("TALLY_CRASH_IN_CHECKPOINT", "0"))
    if probability and random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
