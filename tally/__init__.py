"""Tally: a streaming feature store for machine learning, built on Apache Pulsar.

The implementation lives in ``tally.core`` (definitions and the compiled
aggregation core) and ``tally.service`` (the runtime). This module re-exports
the small public surface.
"""
__version__ = "0.1.0"
