"""A local HTTP server that stands in for an API while a real client talks to it: it records
each request (method, path, content type, authorization, body) and answers with canned JSON.
Used by record_openai.py and record_webuiapi.py to write the fixtures that the Rust tests
replay."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


def start(answer):
    """Starts the server on a free loopback port; `answer(method, path)` gives the JSON to send
    back. Returns (server, recorded list of requests)."""
    recorded = []

    class Capture(BaseHTTPRequestHandler):
        def do_GET(self):
            self.record(b"")

        def do_POST(self):
            self.record(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def record(self, body):
            recorded.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "content_type": self.headers.get("Content-Type"),
                    "authorization": self.headers.get("Authorization"),
                    "user_agent": self.headers.get("User-Agent"),
                    "body_b64": base64.b64encode(body).decode(),
                }
            )
            data = json.dumps(answer(self.command, self.path.split("?")[0])).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorded
