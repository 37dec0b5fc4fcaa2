"""Durations: ``"7d"``, ``"1h"``, ``"7 days"`` and plain milliseconds.

A leaf of ``tally.core``: definitions, the SQL dialect and the CLI read and
write durations through these functions only.
"""
import re

from tally.core.errors import DefinitionError

UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
           "w": 7 * 86_400_000}
# Unit words (singular and plural, any case), as SQL writes them: 7 DAYS.
UNIT_WORDS = {}
for _short, _words in (("ms", ("millisecond", "milli")), ("s", ("second", "sec")),
                       ("m", ("minute", "min")), ("h", ("hour", "hr")),
                       ("d", ("day",)), ("w", ("week",))):
    for _word in _words:
        UNIT_WORDS[_word] = UNIT_WORDS[_word + "s"] = _short
    UNIT_WORDS[_short] = _short

_DURATION = re.compile(r"^\s*(\d+)\s*([a-zA-Z]+)\s*$")


def unit_ms(unit):
    """Milliseconds in one ``unit`` ('h', 'hour', 'HOURS', ...), or None."""
    short = UNIT_WORDS.get(str(unit).lower())
    return None if short is None else UNIT_MS[short]


def duration_ms(value) -> int:
    """``"7d"``, ``"1h"``, ``"250ms"``, ``"7 days"`` or an int of milliseconds ->
    milliseconds."""
    if isinstance(value, bool):
        raise DefinitionError(f"duration {value!r}: write a number and a unit "
                              "(ms, s, m, h, d or w), e.g. '7d' or '1h'")
    if isinstance(value, int):
        return value
    match = _DURATION.match(str(value))
    ms = match and unit_ms(match.group(2))
    if not ms:
        raise DefinitionError(f"duration {value!r}: write a number and a unit "
                              "(ms, s, m, h, d or w), e.g. '7d' or '1h'")
    return int(match.group(1)) * ms


def format_duration(ms) -> str:
    """Milliseconds -> the shortest exact text: 604800000 -> '7d', 5400000 -> '90m'."""
    if ms == 0:
        return "0"
    for unit in ("d", "h", "m", "s"):
        if ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"
