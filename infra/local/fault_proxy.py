"""A fault-injecting HTTP proxy between S3 clients (s3fs, boto) and an S3 server (moto), on 127.0.0.1.

    python -m infra.local.fault_proxy --target http://127.0.0.1:9000 --port 9100 \
        --config '{"seed": 7, "rules": {"write": {"rate": 0.05, "faults": ["after:reset"]}}}'

Point clients at the proxy (AWS_ENDPOINT_URL=http://127.0.0.1:9100). Each request is classified by kind:

- `lock`: the output lock (`*/_job.lock`), any method;
- `marker`: shard markers (`*.stats.json`), any method;
- `part`: multipart uploads (create, upload part, complete, abort);
- `write`: other PUT, POST and DELETE (objects, copies, batch deletes);
- `read`: other GET and HEAD (objects, listings).

A rule per kind gives the fraction of its requests that get a fault, and the faults to choose from, each
`PHASE:ACTION`. PHASE `before`: the proxy acts instead of forwarding (the request never reaches the server).
PHASE `after`: the request is forwarded and lands, then its answer is replaced, so the client cannot tell
whether it landed: the case that conditional writes must survive. ACTION is one of `500` (InternalError),
`503` (ServiceUnavailable), `slowdown` (503 SlowDown), `delay` (wait `delay_s`, then go on normally) and
`reset` (the connection is reset: TCP RST, no answer).

The seed decides: the n-th request of a kind gets the fault that (seed, kind, n) picks, so a schedule is
reproducible per kind (which request is the n-th depends on timing when clients run in parallel).

An outage overlays the rules for a while: every request of its kinds gets its fault (a `delay` holds each
request until the outage ends, as a store that stops answering would).

Control, never faulted: `GET /_fault_proxy/stats` (requests and faults per kind, multipart requests by step
(`create`, `part`, `complete`, `abort`: as they arrived, faulted or not), and the faults injected, with times), `PUT /_fault_proxy/config` (a new config as JSON; counters start again), `PUT /_fault_proxy/outage`
(`{"kinds": [...], "fault": "before:503", "seconds": 10}`, counted as `outage:KIND:FAULT`). S3 bucket names
cannot begin with `_`, so these paths never shadow a bucket.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
KINDS = ("read", "write", "part", "marker", "lock")
PHASES = ("before", "after")
ACTIONS = ("500", "503", "slowdown", "delay", "reset")
ALL_FAULTS = tuple(f"{phase}:{action}" for phase in PHASES for action in ACTIONS)
CONTROL_PREFIX = "/_fault_proxy/"
MAX_EVENTS = 20000  # faults kept for /stats; counters keep counting past it
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}
_ERRORS = {  # action -> (HTTP status, S3 error code, message)
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Rule:
    rate: float
    faults: tuple[str, ...]

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be between 0 and 1, got {self.rate!r}")
        unknown = sorted(set(self.faults) - set(ALL_FAULTS))
        if unknown or not self.faults:
            raise ValueError(f"faults must be a non-empty list of {list(ALL_FAULTS)}, got {list(self.faults)!r}")


@dataclass(frozen=True)
class FaultConfig:
    seed: int = 0
    rules: dict[str, Rule] = field(default_factory=dict)
    delay_s: tuple[float, float] = (0.1, 1.0)  # a `delay` waits a time drawn from this range

    @classmethod
    def from_json(cls, value: dict) -> "FaultConfig":
        unknown_keys = sorted(set(value) - {"seed", "rules", "delay_s"})
        if unknown_keys:
            raise ValueError(f"unknown config keys {unknown_keys}")
        rules = value.get("rules", {})
        unknown_kinds = sorted(set(rules) - set(KINDS))
        if unknown_kinds:
            raise ValueError(f"unknown request kinds {unknown_kinds}; kinds are {list(KINDS)}")
        low, high = value.get("delay_s", (0.1, 1.0))
        if not 0 <= low <= high:
            raise ValueError(f"delay_s must be [low, high] with 0 <= low <= high, got {[low, high]}")
        return cls(
            seed=int(value.get("seed", 0)),
            rules={kind: Rule(float(rule["rate"]), tuple(rule["faults"])) for kind, rule in rules.items()},
            delay_s=(float(low), float(high)),
        )

    def to_json(self) -> dict:
        return {"seed": self.seed, "delay_s": list(self.delay_s),
                "rules": {kind: {"rate": r.rate, "faults": list(r.faults)} for kind, r in self.rules.items()}}

    def decide(self, kind: str, n: int) -> tuple[str, float] | None:
        """The fault for the n-th request of `kind` (and its delay), or None: a function of the seed alone."""
        rule = self.rules.get(kind)
        if rule is None or rule.rate == 0:
            return None
        rng = random.Random(f"{self.seed}:{kind}:{n}")
        if rng.random() >= rule.rate:
            return None
        return rng.choice(rule.faults), rng.uniform(*self.delay_s)


@dataclass(frozen=True)
class Outage:
    kinds: tuple[str, ...]
    fault: str
    seconds: float

    @classmethod
    def from_json(cls, value: dict) -> "Outage":
        outage = cls(tuple(value["kinds"]), value["fault"], float(value["seconds"]))
        if not outage.kinds or set(outage.kinds) - set(KINDS) or outage.fault not in ALL_FAULTS or outage.seconds <= 0:
            raise ValueError(f"an outage needs kinds from {list(KINDS)}, one fault of {list(ALL_FAULTS)} and "
                             f"seconds > 0, got {value!r}")
        return outage


def request_kind(method: str, path: str) -> str:
    """Which rule applies to a request, from its method and path-style URL (/bucket/key?query)."""
    parsed = urllib.parse.urlsplit(path)
    key = urllib.parse.unquote(parsed.path)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    if key.endswith("/_job.lock"):
        return "lock"
    if key.endswith(".stats.json"):
        return "marker"
    if "uploadId" in query or "uploads" in query:
        return "part"
    return "write" if method in ("PUT", "POST", "DELETE") else "read"


def multipart_step(method: str, path: str) -> str | None:
    """Which step of a multipart upload a request is (create, part, complete, abort), or None."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)
    if "uploads" in query:
        return "create" if method == "POST" else None  # GET ?uploads lists uploads
    if "uploadId" in query:
        return {"PUT": "part", "POST": "complete", "DELETE": "abort"}.get(method)
    return None


class FaultState:
    """The config in force and what happened under it, shared by the request threads."""

    def __init__(self, config: FaultConfig):
        self._lock = threading.Lock()
        self.configure(config)

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self.started = time.monotonic()
            self.requests = {kind: 0 for kind in KINDS}
            self.multipart = {step: 0 for step in ("create", "part", "complete", "abort")}
            self.faults: dict[str, int] = {}
            self.events: list[dict] = []
            self.outage: Outage | None = None
            self.outage_ends = 0.0

    def start_outage(self, outage: Outage) -> None:
        with self._lock:
            self.outage, self.outage_ends = outage, time.monotonic() + outage.seconds

    def next_fault(self, kind: str, method: str, path: str) -> tuple[str, float] | None:
        with self._lock:
            n = self.requests[kind]
            self.requests[kind] += 1
            step = multipart_step(method, path) if kind == "part" else None
            if step is not None:
                self.multipart[step] += 1
            now = time.monotonic()
            in_outage = self.outage is not None and kind in self.outage.kinds and now < self.outage_ends
            decision = (self.outage.fault, self.outage_ends - now) if in_outage else self.config.decide(kind, n)
            if decision is not None:
                name = f"{'outage:' if in_outage else ''}{kind}:{decision[0]}"
                self.faults[name] = self.faults.get(name, 0) + 1
                if len(self.events) < MAX_EVENTS:
                    self.events.append({"t": round(now - self.started, 3), "kind": kind, "n": n, "fault": decision[0],
                                        "outage": in_outage, "method": method, "path": path.split("?")[0]})
            return decision

    def stats(self) -> dict:
        with self._lock:
            return {"config": self.config.to_json(), "requests": dict(self.requests), "faults": dict(self.faults),
                    "multipart": dict(self.multipart), "events": list(self.events)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's aiohttp client expects
    server: "FaultProxy"

    def log_message(self, format, *args):  # one line per request would drown the logs
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        body = self._read_body()
        if self.path.startswith(CONTROL_PREFIX):
            self._control(body)
            return
        kind = request_kind(self.command, self.path)
        decision = self.server.state.next_fault(kind, self.command, self.path)
        phase, action, delay_s = ("", "", 0.0)
        if decision is not None:
            (phase, action), delay_s = decision[0].split(":"), decision[1]
        if phase == "before" and not self._act(action, delay_s):
            return
        try:
            status, reason, headers, answer = self._forward(body)
        except OSError as exc:
            self._send(502, "Bad Gateway", [("Content-Type", "text/plain")], f"upstream: {exc}".encode())
            return
        if phase == "after" and not self._act(action, delay_s):
            return
        self._send(status, reason, headers, answer)

    def _act(self, action: str, delay_s: float) -> bool:
        """Acts out a fault. Returns True if the request goes on (after a delay), False if it ends here."""
        if action == "delay":
            time.sleep(delay_s)
            return True
        if action == "reset":
            self._reset()
        else:
            self._error(action)
        return False

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = self.server.upstream()
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            self.server.drop_upstream()
            raise OSError(f"{self.server.target} did not answer {self.command} {self.path}") from None
        return response.status, response.reason, response.getheaders(), answer

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":  # a HEAD answer keeps the object's Content-Length and has no body
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, action: str) -> None:
        status, code, message = _ERRORS[action]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml")] + ([("Retry-After", "1")] if status == 503 else [])
        self._send(status, code, headers, body)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST: the client gets no answer at all."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _control(self, body: bytes) -> None:
        name = self.path[len(CONTROL_PREFIX):].split("?")[0]
        state = self.server.state
        if name == "stats" and self.command == "GET":
            self._send(200, "OK", [("Content-Type", "application/json")], json.dumps(state.stats()).encode())
            return
        setters = {"config": (FaultConfig.from_json, state.configure), "outage": (Outage.from_json, state.start_outage)}
        if name in setters and self.command == "PUT":
            parse, apply = setters[name]
            try:
                value = parse(json.loads(body))
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, "Bad Request", [("Content-Type", "text/plain")], f"bad {name}: {exc}".encode())
                return
            apply(value)
            self._send(200, "OK", [("Content-Type", "text/plain")], f"{name} set".encode())
            return
        self._send(404, "Not Found", [("Content-Type", "text/plain")], b"GET stats, PUT config or PUT outage")

    def finish(self):
        try:
            super().finish()
        except OSError:  # the connection was reset on purpose
            pass


class FaultProxy(ThreadingHTTPServer):
    """The proxy server: `start()` serves in a thread, `url` is what clients point at."""

    daemon_threads = True

    def __init__(self, target: str, port: int = 0, config: FaultConfig = FaultConfig()):
        parsed = urllib.parse.urlsplit(target)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"target must be an http:// URL, got {target!r}")
        self.target = target
        self._target_address = (parsed.hostname, parsed.port or 80)
        self.state = FaultState(config)
        self._local = threading.local()
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def upstream(self) -> http.client.HTTPConnection:
        """This request thread's keep-alive connection to the target."""
        if getattr(self._local, "connection", None) is None:
            self._local.connection = http.client.HTTPConnection(*self._target_address, timeout=120)
        return self._local.connection

    def drop_upstream(self) -> None:
        connection, self._local.connection = getattr(self._local, "connection", None), None
        if connection is not None:
            connection.close()

    def start(self) -> "FaultProxy":
        threading.Thread(target=self.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.fault_proxy", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target", required=True, help="the S3 server to forward to (http://127.0.0.1:PORT)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--config", default="{}", help="fault config as JSON (see the module's help); {} = none")
    args = parser.parse_args(argv)
    try:
        proxy = FaultProxy(args.target, args.port, FaultConfig.from_json(json.loads(args.config)))
    except (ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"fault proxy {proxy.url} -> {args.target}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=proxy.shutdown).start())
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    proxy.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
