"""The production server for the app: waitress with deliberate limits, and waitress' own error responses (a body or
headers over its limits, a malformed request) answered as JSON with the same security headers as the app's.

Limits (``SERVER_LIMITS``): up to 500 connections at once, polled with poll() (no select() descriptor ceiling); a
connection idle for 30 s is closed, checked every 5 s, so a flood of idle connections cannot lock clients out for
long; request headers at most 64 kB.
"""

from __future__ import annotations

import json

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

SERVER_LIMITS = {
    "connection_limit": 500,
    "channel_timeout": 30,
    "cleanup_interval": 5,
    "asyncore_use_poll": True,
    "max_request_header_size": 64 * 1024,
    "backlog": 1024,
}


class JsonErrorTask(ErrorTask):
    """waitress' error response, as ``{"error": ...}`` with the app's security headers."""

    def execute(self):
        from . import SECURITY_HEADERS

        error = self.request.error
        detail = " ".join(str(error.body).split())
        body = json.dumps({"error": f"{error.reason.lower()}: {detail}" if detail else error.reason.lower()}).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        self.response_headers.extend(SECURITY_HEADERS.items())
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def make_server(app, *, host: str, port: int, threads: int, max_request_body_size: int):
    """A waitress server for ``app`` (not yet running) with ``SERVER_LIMITS`` and JSON error responses."""
    server = create_server(
        app, host=host, port=port, threads=threads, max_request_body_size=max_request_body_size, ident="retrieval",
        **SERVER_LIMITS,
    )
    listeners = [server, *getattr(server, "map", {}).values()]
    for listener in listeners:
        if hasattr(listener, "channel_class"):
            listener.channel_class = JsonErrorChannel
    return server
