"""A stand-in OpenTelemetry collector for the benchmarks: accepts OTLP/HTTP trace exports
(`POST /v1/traces`), answers 200 with an empty `ExportTraceServiceResponse`, and counts the
exports and bytes it got (`GET /stats`). It decodes nothing, so it costs the machine as little
as a remote collector would.

    .venv/bin/python scripts/otlp_sink.py PORT
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    exports = 0
    received_bytes = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        Sink.exports += 1
        Sink.received_bytes += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = json.dumps({"exports": Sink.exports, "bytes": Sink.received_bytes}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
