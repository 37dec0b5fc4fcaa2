"""HTML building blocks: every text goes through :func:`e` (escaped) unless
it is markup built here, so a definition's description cannot inject markup."""
import html
import json
from urllib.parse import quote, urlencode

KIND_PATHS = {"view": "view", "service": "service", "source": "source", "entity": "entity"}


def e(text):
    return html.escape("" if text is None else str(text), quote=True)


def href(kind, name, **query):
    """The page of a definition: /view/user_taste, /source/articles?...."""
    url = f"/{KIND_PATHS[kind]}/{quote(name, safe='')}"
    return url + ("?" + urlencode(query) if query else "")


def link(url, text, cls=None):
    attribute = f' class="{e(cls)}"' if cls else ""
    return f'<a href="{e(url)}"{attribute}>{e(text)}</a>'


def ref_link(kind, name, version=None):
    text = f"{name}@v{version}" if version is not None else name
    return link(href(kind, name), text)


def table(headers, rows, cls=None):
    """Rows of already-built cell markup; headers are plain text."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    attribute = f' class="{e(cls)}"' if cls else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title, body, anchor=None):
    ident = f' id="{e(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{e(title)}</h2>{body}</section>"


def facts(pairs):
    """A definition list of (label, markup) pairs, those with no markup left out."""
    items = "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in pairs if v not in (None, ""))
    return f"<dl>{items}</dl>"


def tags(values):
    return " ".join(f'<span class="tag">{e(t)}</span>' for t in values)


def state(value):
    return f'<span class="state {e(value)}">{e(value)}</span>'


def code(text):
    return f"<code>{e(text)}</code>"


def pre(text, cls=None):
    attribute = f' class="{e(cls)}"' if cls else ""
    return f"<pre{attribute}>{e(text)}</pre>"


def value(v):
    """A served value as JSON text, the way the lookup server's HTTP front end writes it."""
    return code(json.dumps(v))


def notice(text, cls="note"):
    return f'<p class="{e(cls)}">{e(text)}</p>'


def form(action, fields, button):
    """A GET form; ``fields`` are markup (see :func:`field`)."""
    return (f'<form method="get" action="{e(action)}">{"".join(fields)}'
            f'<button type="submit">{e(button)}</button></form>')


def field(name, label, current="", placeholder=""):
    return (f'<label>{e(label)} <input name="{e(name)}" value="{e(current)}" '
            f'placeholder="{e(placeholder)}"></label>')


def select(name, label, options, current=None):
    """``options``: (value, text) pairs."""
    items = "".join(f'<option value="{e(v)}"{" selected" if str(v) == str(current) else ""}>'
                    f"{e(t)}</option>" for v, t in options)
    return f'<label>{e(label)} <select name="{e(name)}">{items}</select></label>'


def page(title, body):
    """The whole document: header with the search box, then ``body``."""
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)} - Tally</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="/favicon.svg" type="image/svg+xml">'
            '<link rel="stylesheet" href="/static/ui.css"></head><body>'
            '<header><a class="brand" href="/">Tally</a>'
            '<form method="get" action="/"><input name="q" placeholder="search views, '
            'features, services, sources, entities" aria-label="search"></form>'
            '<nav><a href="/lineage">lineage</a></nav></header>'
            f"<main><h1>{e(title)}</h1>{body}</main></body></html>")
