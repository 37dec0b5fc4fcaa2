"""``tally.training_set``: point-in-time training sets, with the service's I/O.

The replay itself is ``tally.core.training`` (pure computation over event
sources); this wrapper opens what the core cannot: a registry given by its
path, and a broker given by its ``Cluster``, URL or client (its topics read
through ``PulsarTopic``, in parallel when the cluster has an admin URL). Arguments are otherwise
those of :func:`tally.core.training.training_set`.
"""
import contextlib
import os

from tally.core import training as _core
from tally.service.history.topic import PulsarTopic
from tally.service.registry import Registry

__all__ = ["PulsarTopic", "iter_training_batches", "training_set"]


def training_set(spine, features=None, sources=None, *, registry=None, pulsar=None, **options):
    """The spine with one column per feature, as of each row's time (see
    :func:`tally.core.training.training_set`). ``registry`` may be a path,
    ``pulsar`` a ``Cluster``, a service URL, a ``pulsar.Client`` or a ``PulsarTopic``."""
    with _opened(registry) as opened:
        return _core.training_set(spine, features, sources, registry=opened,
                                  pulsar=_event_source(pulsar), **options)


def iter_training_batches(spine, features=None, sources=None, *, registry=None, pulsar=None,
                          **options):
    """Arrow RecordBatches of the training set (see
    :func:`tally.core.training.iter_training_batches`)."""
    with _opened(registry) as opened:
        yield from _core.iter_training_batches(spine, features, sources, registry=opened,
                                               pulsar=_event_source(pulsar), **options)


@contextlib.contextmanager
def _opened(registry):
    if registry is None or hasattr(registry, "get"):
        yield registry
        return
    with Registry(os.fspath(registry)) as opened:
        yield opened


def _event_source(pulsar):
    if pulsar is None or hasattr(pulsar, "sorted_chunks"):
        return pulsar
    return PulsarTopic(pulsar)
