"""Tally: a streaming feature store for machine learning, built on Apache Pulsar.

The implementation lives in ``tally.core`` (definitions and the compiled
aggregation core) and ``tally.service`` (the runtime). This module re-exports
the small public surface, lazily: ``import tally`` stays cheap for the CLI.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "training_set": "tally.core.training",
    "iter_training_batches": "tally.core.training",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tally' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
