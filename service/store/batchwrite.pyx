# cython: language_level=3
"""The Aerospike store's batch write records, built in one C loop.

The official client takes a batch write as a list of
``aerospike_helpers.batch.records.Write`` objects, each with a list of
operation dicts; it reads them, converts them to C and writes each one's
result back. Built in Python that was ~4 µs per record (a function call,
six dict displays and ``Write.__init__``'s two frames of attribute
assignments) on top of the client's own ~18 µs: a fifth of the write path.
Here each record is a copy of a template dict per operation with its value
set, one tuple for the key, and a ``Write`` whose ``__dict__`` is a copy of a
template instance's (so it carries exactly the attributes this client
version's ``Write.__init__`` sets): ~0.7 µs.

This module does not import the client (an optional dependency): the caller
passes the ``Write`` class and the templates.
"""
from cpython.dict cimport PyDict_Copy, PyDict_SetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject_SetAttr
from cpython.ref cimport Py_INCREF


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)


def write_records(write_type, dict attributes, str namespace, str set_name, list user_keys,
                  list columns, list op_templates, tuple shared_ops, list rows=None):
    """One ``write_type`` instance per record: record ``r`` (``rows[i]``, or
    every ``i`` if ``rows`` is None) gets the key ``(namespace, set_name,
    user_keys[r])`` and the operations ``op_templates[j]`` with ``"val"`` set
    to ``columns[j][r]``, for every j, then ``shared_ops`` (the same dicts in
    every record: the client only reads them). ``attributes``: the
    ``__dict__`` of a template instance, copied for each record."""
    cdef Py_ssize_t n_keys = len(user_keys)
    cdef Py_ssize_t n = n_keys if rows is None else len(rows)
    cdef Py_ssize_t n_values = len(op_templates), n_shared = len(shared_ops)
    cdef Py_ssize_t i, j, r
    cdef list out = [None] * n
    cdef list ops
    cdef dict op
    cdef list items = list(attributes.items())
    if len(columns) != n_values:
        raise ValueError(f"{len(columns)} columns for {n_values} operations")
    for column in columns:
        if len(<list>column) != n_keys:
            raise ValueError(f"a column of {len(<list>column)} values for {n_keys} keys")
    if rows is not None:
        for r in rows:
            if not 0 <= r < n_keys:
                raise IndexError(f"row {r} of {n_keys} keys")
    for i in range(n):
        r = i if rows is None else <Py_ssize_t>rows[i]
        ops = PyList_New(n_values + n_shared)
        for j in range(n_values):
            op = PyDict_Copy(<dict>op_templates[j])
            PyDict_SetItem(op, "val", (<list>columns[j])[r])
            PyObject_GC_UnTrack(<void *>op)
            Py_INCREF(op)
            PyList_SET_ITEM(ops, j, op)
        for j in range(n_shared):
            shared = shared_ops[j]
            Py_INCREF(shared)
            PyList_SET_ITEM(ops, n_values + j, shared)
        record = write_type.__new__(write_type)
        for name, value in items:
            PyObject_SetAttr(record, name, value)
        key = (namespace, set_name, user_keys[r])
        PyObject_GC_UnTrack(<void *>key)
        record.key = key
        record.ops = ops
        PyObject_GC_UnTrack(<void *>ops)
        PyObject_GC_UnTrack(<void *>record)
        out[i] = record
    return out
