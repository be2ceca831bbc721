"""The API reference at /docs, rendered from the service's OpenAPI document as plain HTML.

FastAPI's own /docs page (Swagger UI) loads its scripts from a CDN and stays blank offline;
this page needs nothing but the service. /openapi.json remains the machine-readable
document for Swagger UI, Postman or client generators.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
       color: #1d2330; max-width: 900px; margin: 2rem auto; padding: 0 1.5rem; }
h1 { margin-bottom: 0.25rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #e4e7ec; }
.op { border: 1px solid #e4e7ec; border-radius: 10px; padding: 0.5rem 1.25rem 1rem;
      margin: 1rem 0; }
.verb { font-weight: 700; padding: 0.1rem 0.5rem; border-radius: 6px; margin-right: 0.5rem;
        background: #dbe4ff; color: #3b5bdb; font-size: 0.85rem; }
code, pre { background: #f5f6f8; border-radius: 4px; padding: 0.1rem 0.3rem; }
pre { padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
td, th { text-align: left; padding: 0.3rem 0.5rem; border-bottom: 1px solid #eef0f3;
         vertical-align: top; }
.muted { color: #667085; }
"""


def render_reference(spec: dict[str, Any]) -> str:
    """One HTML page: every operation with its parameters, body and responses, then the
    schemas they refer to."""
    info = spec.get("info", {})
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{escape(info.get('title', 'API'))}</title><style>{_STYLE}</style>"
             f"</head><body><h1>{escape(info.get('title', 'API'))}</h1>"
             f"<p class='muted'>version {escape(str(info.get('version', '')))} · "
             "machine-readable: <a href='openapi.json'>openapi.json</a> · "
             "<a href='./'>the page</a></p>"
             f"<p>{escape(info.get('description', ''))}</p><h2>Endpoints</h2>"]
    for path, operations in spec.get("paths", {}).items():
        for verb, op in operations.items():
            parts.append(_operation(path, verb, op))
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        parts.append("<h2>Schemas</h2>")
        for name, schema in schemas.items():
            parts.append(f"<h3 id='{escape(name)}'>{escape(name)}</h3>{_properties(schema)}")
    parts.append("</body></html>")
    return "".join(parts)


def _operation(path: str, verb: str, op: dict[str, Any]) -> str:
    html = [f"<div class='op'><h3><span class='verb'>{escape(verb.upper())}</span>"
            f"<code>{escape(path)}</code> {escape(op.get('summary', ''))}</h3>"]
    params = op.get("parameters", [])
    if params:
        html.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>about</th></tr>")
        for p in params:
            schema = p.get("schema", {})
            about = p.get("description") or schema.get("description", "")
            if "default" in schema:
                about += f" (default {schema['default']})"
            html.append(f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}"
                        f"</td><td>{escape(_type(schema))}</td><td>{escape(about)}</td></tr>")
        html.append("</table>")
    body = op.get("requestBody", {}).get("content", {})
    if body:
        kinds = ", ".join(f"<code>{escape(kind)}</code>" for kind in body)
        html.append(f"<p>Body: {kinds}</p>")
    html.append("<table><tr><th>status</th><th>meaning</th><th>content</th></tr>")
    for code, response in op.get("responses", {}).items():
        content = response.get("content", {}).get("application/json", {})
        shown = escape(_type(content["schema"])) if "schema" in content else ""
        if "example" in content:
            shown = f"<code>{escape(json.dumps(content['example']))}</code>"
        html.append(f"<tr><td>{escape(code)}</td><td>{escape(response.get('description', ''))}"
                    f"</td><td>{shown}</td></tr>")
    html.append("</table></div>")
    return "".join(html)


def _properties(schema: dict[str, Any]) -> str:
    props = schema.get("properties", {})
    if not props:
        return f"<pre>{escape(json.dumps(schema, indent=2))}</pre>"
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code></td><td>{escape(_type(prop))}</td>"
        f"<td>{escape(prop.get('description', ''))}</td></tr>" for name, prop in props.items())
    return f"<table><tr><th>field</th><th>type</th><th>about</th></tr>{rows}</table>"


def _type(schema: dict[str, Any]) -> str:
    """A short type name: string, integer, list[Prediction], Prediction | null."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    return str(schema.get("type", "any"))

