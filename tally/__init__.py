"""Tally: a streaming feature store for machine learning, built on Apache Pulsar.

The public surface, in one import::

    from tally import Entity, Source, Window, Feature, FeatureView, Join, training_set

Definitions (``Entity``, ``Source``, ``Window``, ``Feature``, ``FeatureView``, ``Join``,
``sql``, ``load_sql``) come from ``tally.core``; point-in-time training sets,
the registry, the lookup clients and the online stores from
``tally.service``. Names are loaded lazily, so ``import tally`` stays cheap
for the command line.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "Entity": "tally.core.definitions",
    "Source": "tally.core.definitions",
    "Window": "tally.core.definitions",
    "Feature": "tally.core.definitions",
    "FeatureView": "tally.core.definitions",
    "FeatureService": "tally.core.definitions",
    "Join": "tally.core.definitions",
    "Derived": "tally.core.definitions",
    "RequestFunction": "tally.core.definitions",
    "sql": "tally.core.sql",
    "load_sql": "tally.core.sql",
    "TallyError": "tally.core.errors",
    "DefinitionError": "tally.core.errors",
    "TrainingSetError": "tally.core.errors",
    "training_set": "tally.service.training",
    "iter_training_batches": "tally.service.training",
    "PulsarTopic": "tally.service.training",
    "Cluster": "tally.service.pulsar.cluster",
    "Registry": "tally.service.registry",
    "LookupClient": "tally.service.lookup.client",
    "AsyncLookupClient": "tally.service.lookup.client",
    "LookupServerError": "tally.service.lookup.client",
    "open_store": "tally.service.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tally' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
