"""A deliberately vulnerable web shop for the firewall's end-to-end test: it builds SQL by string
concatenation (never do this) and shows database errors, so sqlmap can find the injection."""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import psycopg

QUERIES = {
    # path: (SQL template with the raw parameter pasted in, parameter name, its normal value)
    "/products": ("SELECT id, name, price FROM shop.products WHERE name = '{}' AND active", "name", "widget"),
    "/product": ("SELECT id, name, price FROM shop.products WHERE id = {} AND active", "id", "1"),
    "/sorted": ("SELECT id, name, price FROM shop.products WHERE active ORDER BY {} LIMIT 20", "sort",
                "price"),
    "/page": ("SELECT id, name, price FROM shop.products WHERE active ORDER BY id LIMIT {}", "limit", "20"),
}


def _handler(dsn: str) -> type[BaseHTTPRequestHandler]:
    class ShopHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path not in QUERIES:
                self._answer(404, "not found")
                return
            template, parameter, default = QUERIES[url.path]
            value = parse_qs(url.query).get(parameter, [default])[0]
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
                    rows = connection.execute(template.format(value).encode()).fetchall()  # type: ignore[call-overload]
            except psycopg.Error as exc:  # shown like a framework's debug page: class and message
                error = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
                self._answer(500, f"<p>database error: {html.escape(error)}</p>")
                return
            body = "".join(f"<tr><td>{row[0]}</td><td>{html.escape(str(row[1]))}</td><td>{row[2]}</td></tr>"
                           for row in rows)
            self._answer(200, f"<table>{body}</table><p>{len(rows)} products</p>")

        def _answer(self, status: int, body: str) -> None:
            payload = f"<html><body><h1>Shop</h1>{body}</body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    return ShopHandler


@contextmanager
def running_shop(dsn: str) -> Iterator[str]:
    """Serve the shop on 127.0.0.1:<free port>; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(dsn))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
