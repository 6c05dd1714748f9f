"""A loopback HTTPS server for MTA-STS policies (RFC 8461 §3.3) and TLS-RPT reports (RFC 8460
§5.4, POSTs are kept in `posts`), for tests: it answers
`/.well-known/mta-sts.txt` by Host header with what the test set (`serve`), with the
certificate chosen by SNI (`certificate`, default one naming every policy host), and can
redirect, answer with another type, send too much, or never answer (`hang`). It counts
the requests per host."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False


class StsServer:
    def __init__(self, host: str, default: ssl.SSLContext) -> None:
        self.host = host
        self.answers: dict[str, Answer] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.silent: set[str] = set()
        self.requests: dict[str, int] = {}
        #: POSTs received: (Host, path, Content-Type, body)
        self.posts: list[tuple[str, str, str, bytes]] = []
        self.release = threading.Event()
        self._default = default
        default.sni_callback = self._sni
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").split(":")[0].lower()
                server.requests[name] = server.requests.get(name, 0) + 1
                if name in server.silent:
                    server.release.wait(30)
                    return
                answer = server.answers.get(name)
                if answer is None or self.path != "/.well-known/mta-sts.txt":
                    answer = Answer(b"not found", 404)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                if answer.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(answer.body), 100):
                        part = answer.body[i : i + 100]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)

            def do_POST(self) -> None:  # a TLS-RPT collector (RFC 8460 §5.4)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.posts.append((self.headers.get("Host") or "", self.path,
                                     self.headers.get("Content-Type") or "", body))  # fmt: skip
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, address = super().get_request()
                return default.wrap_socket(sock, server_side=True), address

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that give up on TLS (a certificate they refuse) are expected

        self._server = Server((host, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _sni(self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
        context = self.contexts.get((name or "").lower())
        if context is not None:
            sock.context = context

    def serve(self, domain: str, policy: str | bytes | Answer) -> None:
        """What https://mta-sts.<domain>/.well-known/mta-sts.txt answers."""
        if not isinstance(policy, Answer):
            policy = Answer(policy.encode() if isinstance(policy, str) else policy)
        self.answers[f"mta-sts.{domain}"] = policy

    def certificate(self, domain: str, context: ssl.SSLContext, host: str = "mta-sts") -> None:
        """The certificate <host>.<domain> presents."""
        self.contexts[f"{host}.{domain}"] = context

    def hang(self, domain: str) -> None:
        self.silent.add(f"mta-sts.{domain}")

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
