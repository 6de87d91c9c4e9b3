"""A local HTTP server for shards, in a thread, that can fail the way object stores do."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Event, Lock, Thread


@dataclass
class ShardServer:
    """Serves the files of `root`. `faults[name]` lists what the first requests for a file get, in order:
    'error' (HTTP 500), 'drop' (half the body, then the connection closes once `release` is set) or
    'stall' (half the body, then nothing, the connection left open until the server stops);
    `broken` files always fail; `missing` files always get HTTP 404."""

    root: Path
    faults: dict[str, list[str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    requests: Counter = field(default_factory=Counter)
    url: str = ""
    lock: Lock = field(default_factory=Lock)
    release: Event = field(default_factory=Event)
    stopping: Event = field(default_factory=Event)

    def next_fault(self, name: str) -> str | None:
        with self.lock:
            self.requests[name] += 1
            if name in self.missing:
                return "missing"
            if name in self.broken:
                return "error"
            planned = self.faults.get(name, [])
            return planned.pop(0) if planned else None


def _handler(server: ShardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            name = self.path.lstrip("/")
            fault = server.next_fault(name)
            path = server.root / name
            if fault in ("error", "missing") or not path.is_file():
                self.send_error(500 if fault == "error" else 404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with suppress(ConnectionError):  # a reader may stop before the end
                if fault not in ("drop", "stall"):
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall":
                    server.stopping.wait()
                else:
                    server.release.wait(timeout=5)  # a test sets it once it has read from the first half
            self.close_connection = True

        def log_message(self, *args: object) -> None:  # quiet
            pass

    return Handler


@contextmanager
def serve(
    root: Path,
    faults: dict[str, list[str]] | None = None,
    broken: set[str] | None = None,
    missing: set[str] | None = None,
) -> Iterator[ShardServer]:
    """Serve `root` on a free port of 127.0.0.1 until the block ends; `.url` is the base URL."""
    state = ShardServer(Path(root), dict(faults or {}), set(broken or ()), set(missing or ()))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
