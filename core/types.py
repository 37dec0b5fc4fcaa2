"""The type names of definitions, shared by every layer (a leaf module).

The order of ``KEY_TYPES`` is also the key type code stored in a view's
schema (0 int64, 1 string: see ``cext/tally.h``); the order of
``VALUE_TYPES`` is the value type code of each feature there.
"""
KEY_TYPES = ("int64", "string")
FIELD_TYPES = ("int64", "float64", "string", "bool")
NUMERIC_TYPES = ("int64", "float64", "bool")
PAYLOAD_FORMATS = ("msgpack", "json", "arrow", "msgpack-columnar")
COLUMNAR_FORMATS = ("msgpack-columnar", "arrow")
# How a source's producers route keys to partitions (tally.core.routing); the
# order is the scheme's code in core/includes/tally_routing.h.
ROUTINGS = ("murmur3", "java_string_hash", "go_java_string_hash")
# Event times a message carries beside its payload: the producer-set event
# timestamp and the broker's publish timestamp (Pulsar message metadata).
MESSAGE_TIME_FIELDS = ("@event_time", "@publish_time")
# The type of a feature's value, online and in training sets alike; see
# tally.core.aggregations.value_type. top_k<T> is a list of (value, count).
VALUE_TYPES = ("int64", "float64", "string", "list<int64>", "list<float64>",
               "list<string>", "top_k<int64>", "top_k<float64>", "top_k<string>")
