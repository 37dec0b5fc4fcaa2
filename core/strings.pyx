# cython: language_level=3
"""Strings as 64-bit codes, and the dictionary that maps the codes back.

Arenas keep 64-bit values, so a string column is aggregated by its codes: a
string's code is ``tally_hash_bytes`` of its UTF-8 bytes (the hash the key
index uses), the same in every process and partition, so the states of two
parts of a stream merge without renumbering. A view state keeps a
:class:`StringDictionary` (code -> string) for the features whose values are
strings (first, last, last_n, top_k), saved in snapshots with the state, and
reads map codes back to ``str``.

Two different strings with one code would be merged silently, so the
dictionary refuses the second: ``encode`` leaves it without a code and
reports it (the stream dead-letters its event, a training set raises). With
64-bit codes that takes billions of distinct strings to happen by chance.
"""
import numpy as np

cimport numpy as cnp
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint64_t

cnp.import_array()

cdef extern from "tally_hash.h":
    uint64_t tally_hash_bytes(const char* data, size_t length) noexcept nogil


cdef inline int64_t _code(str text) except? -1:
    cdef Py_ssize_t length
    cdef const char* data = PyUnicode_AsUTF8AndSize(text, &length)
    return <int64_t>tally_hash_bytes(data, length)


def string_code(str text):
    """The 64-bit code of a string."""
    return _code(text)


def string_codes(values):
    """``(codes, nulls)`` of a sequence of str (None: a null, code 0), for
    aggregations that need no way back (distinct_count)."""
    values = list(values)
    cdef Py_ssize_t i, n = len(values)
    codes = np.zeros(n, dtype=np.int64)
    nulls = np.zeros(n, dtype=np.bool_)
    cdef int64_t[::1] c = codes
    for i in range(n):
        value = values[i]
        if value is None:
            nulls[i] = True
        else:
            c[i] = _code(_checked(value))
    return codes, nulls


cdef inline str _checked(value):
    if type(value) is not str:
        raise TypeError(f"a string column holds {value!r} ({type(value).__name__}); "
                        "string values must be str (None for a null)")
    return <str>value


class StringDictionary:
    """Code -> string for the strings a view state holds."""

    def __init__(self):
        self._strings = {}

    def __len__(self):
        return len(self._strings)

    def __contains__(self, code):
        return int(code) in self._strings

    def add(self, code, str text):
        """Remember that ``code`` stands for ``text`` (the caller checked that
        no other string has it)."""
        self._strings[int(code)] = text

    def encode(self, values):
        """``(codes, nulls, clashes)`` of a sequence of str (None: a null):
        each new string is remembered; ``clashes`` maps the index of each
        string whose code another string already has to that string (it
        gets code 0 and counts as a null: never two strings for one code)."""
        values = list(values)
        cdef Py_ssize_t i, n = len(values)
        codes = np.zeros(n, dtype=np.int64)
        nulls = np.zeros(n, dtype=np.bool_)
        cdef int64_t[::1] c = codes
        cdef int64_t code
        cdef dict strings = self._strings
        clashes = {}
        for i in range(n):
            value = values[i]
            if value is None:
                nulls[i] = True
                continue
            code = _code(_checked(value))
            known = strings.get(code)
            if known is None:
                strings[code] = value
            elif known is not value and known != value:
                clashes[i] = known
                nulls[i] = True
                continue
            c[i] = code
        return codes, nulls, clashes

    def strings(self, codes):
        """The strings of int64 ``codes`` (a list of str)."""
        strings = self._strings
        try:
            return [strings[code] for code in np.asarray(codes, dtype=np.int64).tolist()]
        except KeyError as error:
            raise KeyError(f"string code {error.args[0]} is not in the view's dictionary: "
                           "the state and its dictionary disagree") from None

    def merge(self, later, where="the view"):
        """Fold the dictionary of a later part of the stream into this one;
        a code standing for two strings is refused (ValueError)."""
        for code, text in later._strings.items():
            known = self._strings.setdefault(code, text)
            if known != text:
                raise ValueError(f"{where}: strings {known!r} and {text!r} have the same "
                                 f"64-bit code {code}, folded in different parts of the "
                                 "stream; the states cannot be merged without mixing them")

    def export_arrays(self):
        """``codes`` (int64, ascending), ``offsets`` and ``blob`` (UTF-8)."""
        codes = np.array(sorted(self._strings), dtype=np.int64)
        encoded = [self._strings[code].encode() for code in codes.tolist()]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return {"codes": codes, "offsets": offsets, "blob": blob}

    @classmethod
    def from_arrays(cls, arrays):
        """Restore ``export_arrays``; every string is checked against its code."""
        codes = np.asarray(arrays["codes"], dtype=np.int64)
        offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        blob = np.asarray(arrays["blob"], dtype=np.uint8).tobytes()
        if (len(offsets) != len(codes) + 1 or offsets[0] != 0 or offsets[-1] != len(blob)
                or np.any(np.diff(offsets) < 0)):
            raise ValueError("string dictionary snapshot: arrays are inconsistent")
        dictionary = cls()
        bounds = offsets.tolist()
        for j, code in enumerate(codes.tolist()):
            text = blob[bounds[j]:bounds[j + 1]].decode()
            if _code(text) != code:
                raise ValueError(f"string dictionary snapshot: {text!r} does not have "
                                 f"the code {code} stored for it")
            dictionary._strings[code] = text
        return dictionary
