"""The Tally SQL dialect: sqlglot's SQL plus ``WINDOW SLIDING | TUMBLING |
LIFETIME``, ``CREATE SOURCE`` and ``CREATE FEATURE SERVICE``, by subclassing sqlglot's ``Dialect``,
``Tokenizer``, ``Parser`` and ``Generator`` (no text is pre-processed).

A leaf: it knows SQL syntax, not definitions. :mod:`tally.core.sql`
translates its ASTs into definitions, :mod:`tally.core.filters` parses
filters with it.
"""
from sqlglot import exp, generator, parser, tokens
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from tally.core.durations import unit_ms


class WindowSpec(exp.Expression):
    """``[name AS] SLIDING 7 DAYS HOP 1 HOUR [LATENESS 5 MINUTES]`` (sizes in ms)."""
    arg_types = {"this": False, "kind": True, "size": False, "hop": False, "lateness": False}


_SQL_UNITS = (("DAY", 86_400_000), ("HOUR", 3_600_000),
              ("MINUTE", 60_000), ("SECOND", 1000), ("MILLISECOND", 1))


def sql_duration(ms):
    """Milliseconds -> SQL text in the largest exact unit up to days: 604800000 -> '7 DAYS',
    5400000 -> '90 MINUTES'."""
    for unit, size in _SQL_UNITS:
        if ms % size == 0:
            count = ms // size
            return f"{count} {unit}{'' if count == 1 else 'S'}"
    raise ValueError(ms)


def window_spec_sql(generator_, spec):
    name = spec.args.get("this")
    text = f"{generator_.sql(name)} AS " if name else ""
    kind = spec.args["kind"]
    if kind == "LIFETIME":
        return text + "LIFETIME"
    size = sql_duration(spec.args["size"])
    text += f"SLIDING {size} HOP {sql_duration(spec.args['hop'])}" if kind == "SLIDING" \
        else f"TUMBLING {size}"
    if spec.args.get("lateness"):
        text += f" LATENESS {sql_duration(spec.args['lateness'])}"
    return text


class Tally(Dialect):
    """sqlglot's SQL plus ``WINDOW SLIDING/TUMBLING/LIFETIME`` and ``CREATE SOURCE``."""

    class Tokenizer(tokens.Tokenizer):
        KEYWORDS = {
            **tokens.Tokenizer.KEYWORDS,
            "SOURCE": TokenType.SOURCE,
            # CREATE FEATURE SERVICE: any creatable token sqlglot leaves unused
            # here will do; its kind reads back as the keyword's own text
            "FEATURE SERVICE": TokenType.SEMANTIC_VIEW,
            "FLOAT64": TokenType.DOUBLE,
        }

    class Parser(parser.Parser):
        # WITH (key = value, ...) stays a list of plain key/value properties:
        # no key is special (sqlglot would turn e.g. FORMAT into its own node).
        PROPERTY_PARSERS = {"WITH": parser.Parser.PROPERTY_PARSERS["WITH"]}

        def _parse_window_clause(self):
            if not self._match(TokenType.WINDOW):
                return None
            return self._parse_csv(self._parse_window_spec)

        def _parse_window_spec(self):
            name = None
            if not self._window_kind_ahead():
                name = self._parse_id_var(any_token=False)
                if name is None or not self._match(TokenType.ALIAS):
                    self.raise_error("Expected SLIDING, TUMBLING or LIFETIME after WINDOW "
                                     "(e.g. WINDOW SLIDING 7 DAYS HOP 1 HOUR)")
                if self._match(TokenType.L_PAREN, advance=False):
                    self.raise_error("Standard SQL window specifications (WINDOW w AS (...)) "
                                     "are outside the Tally dialect; write WINDOW w AS "
                                     "SLIDING 7 DAYS HOP 1 HOUR")
                if not self._window_kind_ahead():
                    self.raise_error("Expected SLIDING, TUMBLING or LIFETIME")
            kind = self._curr.text.upper()
            self._advance()
            size = hop = lateness = 0
            if kind == "SLIDING":
                size = self._parse_duration()
                if not self._match_text_seq("HOP"):
                    self.raise_error("Expected HOP after the window size (SLIDING 7 DAYS "
                                     "HOP 1 HOUR)")
                hop = self._parse_duration()
            elif kind == "TUMBLING":
                size = hop = self._parse_duration()
            if kind != "LIFETIME" and self._match_text_seq("LATENESS"):
                lateness = self._parse_duration()
            return WindowSpec(this=name, kind=kind, size=size, hop=hop, lateness=lateness)

        def _window_kind_ahead(self):
            return self._curr is not None and self._curr.token_type == TokenType.VAR and \
                self._curr.text.upper() in ("SLIDING", "TUMBLING", "LIFETIME")

        def _parse_duration(self):
            if self._curr is None or self._curr.token_type != TokenType.NUMBER \
                    or not self._curr.text.isdigit():
                self.raise_error("Expected a duration: a whole number and a unit, "
                                 "e.g. 7 DAYS or 30 MINUTES")
            count = int(self._curr.text)
            self._advance()
            ms = unit_ms(self._curr.text) if self._curr else None
            if not ms or len(self._curr.text) < 3:
                self.raise_error("Expected a time unit (MILLISECONDS, SECONDS, MINUTES, "
                                 "HOURS, DAYS or WEEKS)")
            self._advance()
            return count * ms

        def _parse_as_command(self, start):
            while self._curr:
                self._advance()
            text = " ".join(self._find_sql(start, self._prev).split())
            self.raise_error(f"The statement '{_shorten(text)}' is outside the Tally SQL "
                             "dialect; write CREATE SOURCE ..., CREATE VIEW ... AS SELECT "
                             "..., CREATE FEATURE SERVICE ... AS SELECT ... or SELECT ...",
                             token=start)

    class Generator(generator.Generator):
        TRANSFORMS = {**generator.Generator.TRANSFORMS, WindowSpec: window_spec_sql}

        def not_sql(self, expression):
            # x IS NOT NULL, x NOT IN (...), x NOT BETWEEN ...: as people write them
            inner = expression.this
            if isinstance(inner, exp.Is):
                return f"{self.sql(inner, 'this')} IS NOT {self.sql(inner, 'expression')}"
            if isinstance(inner, (exp.In, exp.Between)):
                text = self.sql(inner)
                operand = self.sql(inner, "this")
                keyword = " IN " if isinstance(inner, exp.In) else " BETWEEN "
                if text.startswith(operand + keyword):
                    return f"{operand} NOT{text[len(operand):]}"
            return super().not_sql(expression)


def _shorten(text, limit=60):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_parse_error(error):
    """A one-line description of a sqlglot error: 'line 1, col 25: Expecting ('."""
    details = getattr(error, "errors", None)
    if details:
        first = details[0]
        description = first.get("description") or str(error)
        if first.get("line") is not None:
            return f"line {first['line']}, col {first['col']}: {description}"
        return description
    return str(error).splitlines()[0]


def needs_quotes(name):
    """Whether an identifier must be quoted to read back as itself (a keyword,
    a space, ...)."""
    try:
        tokens_ = Tally().tokenize(name)
    except (TokenError, ValueError):
        return True
    return not (len(tokens_) == 1 and tokens_[0].token_type == TokenType.VAR
                and tokens_[0].text == name)
