"""The registry's SQLite schema, as numbered migrations.

``MIGRATIONS[n]`` turns a schema of version ``n - 1`` into version ``n``;
:class:`~tally.service.registry.db.Registry` runs the missing steps when it
opens a file and refuses a file newer than ``SCHEMA_VERSION``. The ``meta``
table (schema version, deploy mode) precedes every migration: the Registry
creates it first.

* ``versions`` - every stored version: its canonical body, hashes and state;
* ``heads``    - per (kind, name): the current and the candidate version;
* ``changes``  - the change log the streaming service polls;
* ``facets``   - what search matches (entity, source, topic, owner, tag, ...);
* ``lineage``  - per view version and feature: the source fields it reads.
"""

SCHEMA_VERSION = 1

MIGRATIONS = {
    1: [
        """CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            hash TEXT NOT NULL,
            state_hash TEXT,
            body TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            origin TEXT,
            UNIQUE (kind, name, version),
            UNIQUE (kind, name, hash))""",
        """CREATE TABLE heads (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            current INTEGER,
            candidate INTEGER,
            PRIMARY KEY (kind, name))""",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            event TEXT NOT NULL,
            from_version INTEGER,
            detail TEXT,
            actor TEXT)""",
        """CREATE TABLE facets (
            version_id INTEGER NOT NULL REFERENCES versions(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL)""",
        "CREATE INDEX facets_by_value ON facets (key, value)",
        "CREATE INDEX facets_by_version ON facets (version_id)",
        """CREATE TABLE lineage (
            version_id INTEGER NOT NULL REFERENCES versions(id),
            view TEXT NOT NULL,
            feature TEXT NOT NULL,
            source TEXT NOT NULL,
            topic TEXT NOT NULL,
            field TEXT NOT NULL,
            role TEXT NOT NULL)""",
        "CREATE INDEX lineage_by_topic ON lineage (topic, field)",
        "CREATE INDEX lineage_by_source ON lineage (source, field)",
        "CREATE INDEX lineage_by_version ON lineage (version_id)",
    ],
}
