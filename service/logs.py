"""How the service's processes log: text for people, or JSON for log shippers.

``json`` writes one object per line -- ``time`` (ISO 8601, UTC), ``level``,
``logger``, ``message`` -- plus the record's structured fields: what a call
passes as ``extra={"view": ..., "partition": ...}`` (see :data:`FIELDS`),
so a shipper can filter by view or partition without parsing messages.
The Pulsar client's own warnings keep its console format: routed through
Python's logging, the C++ client logged at every level while the
interpreter shut down.
"""
import datetime
import json
import logging

FORMATS = ("text", "json")
# The structured fields a log call may pass in ``extra``.
FIELDS = ("view", "version", "partition", "subscription", "consumer", "checkpoint",
          "position", "store", "active_consumer", "events", "backlog")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format="text", level=logging.INFO):
    """Send the process's logs to stderr in ``log_format`` (one of FORMATS)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)

