"""The type names of definitions, shared by every layer (a leaf module).

The order of ``KEY_TYPES`` is also the key type code stored in a view's
schema (0 int64, 1 string: see ``cext/tally.h``).
"""
KEY_TYPES = ("int64", "string")
FIELD_TYPES = ("int64", "float64", "string", "bool")
NUMERIC_TYPES = ("int64", "float64", "bool")
PAYLOAD_FORMATS = ("msgpack", "json", "arrow", "msgpack-columnar")
COLUMNAR_FORMATS = ("msgpack-columnar", "arrow")
