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
import logging
import os
import random
import re
import signal
from dataclasses import dataclass, field

from tally.core import snapshot
from tally.core.errors import SnapshotError, TallyError

log = logging.getLogger("tally.checkpoint")

_NAME = re.compile(r"^(\d{12})\.ckpt$")
_TEMPORARY = re.compile(r"^(\d{12})\.ckpt\.tmp-\d+$")
KEEP = 3          # older checkpoints are deleted once a newer one is published


class CheckpointConflict(TallyError, RuntimeError):
    """Another process published a newer checkpoint: this one lost the partition."""


@dataclass
class Restored:
    """The newest valid checkpoint of a partition (``sequence`` 0: none) and
    the newer ones found corrupt, set aside as ``<sequence>.ckpt.corrupt``."""
    sequence: int = 0
    arrays: dict = None
    meta: dict = None
    corrupt: list = field(default_factory=list)      # [(sequence, reason)]


class CheckpointStore:
    def __init__(self, root):
        self.root = os.path.abspath(root)

    def directory(self, view_name, state_hash, partition):
        return os.path.join(self.root, view_name, state_hash, f"p{partition}")

    def latest_sequence(self, view_name, state_hash, partition):
        """The newest published sequence number, or 0 if there is none."""
        return max(self._sequences(self.directory(view_name, state_hash, partition)),
                   default=0)

    def load(self, view_name, state_hash, partition, sequence):
        """``(arrays, meta)`` of a published checkpoint."""
        path = os.path.join(self.directory(view_name, state_hash, partition),
                            f"{sequence:012d}.ckpt")
        return snapshot.load(path)

    def restore(self, view_name, state_hash, partition):
        """The newest checkpoint that loads. A corrupt one (truncated, a
        flipped byte: the snapshot's CRC catches it) is logged, set aside and
        passed over for the one before it: restoring an older checkpoint with
        its own position loses nothing, its messages are read again."""
        directory = self.directory(view_name, state_hash, partition)
        restored = Restored()
        for sequence in sorted(self._sequences(directory), reverse=True):
            try:
                restored.arrays, restored.meta = self.load(view_name, state_hash, partition,
                                                           sequence)
                restored.sequence = sequence
                return restored
            except (SnapshotError, OSError, ValueError, KeyError) as error:
                restored.corrupt.append((sequence, f"{type(error).__name__}: {error}"))
                log.error("%s partition %d: checkpoint %d is corrupt (%s); set aside, "
                          "restoring the one before it", view_name, partition, sequence, error)
                self._set_aside(directory, sequence)
        return restored

    @staticmethod
    def _sequences(directory):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return [int(m.group(1)) for m in map(_NAME.match, names) if m]

    @staticmethod
    def _set_aside(directory, sequence):
        path = os.path.join(directory, f"{sequence:012d}.ckpt")
        try:
            os.replace(path, f"{path}.corrupt")
        except FileNotFoundError:
            pass                          # another process set it aside first

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
