"""Servers the benchmark starts on 127.0.0.1: nginx with a fixed reply, and a latency endpoint.

nginx costs far less CPU per request than any Python client, so CPU-bound runs measure the
client. The latency endpoint is the reference server (``python -m modal_llm.server``) when it
starts and answers as the workloads need, else the tiny one in ``_latency_server.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks._clients import NGINX_REPLY_TEXT, STREAM_PROMPT_FILLER, THROUGHPUT_PROMPT

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{temp_paths}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{reply}';
        }}
    }}
}}
"""
TEMP_PATH_DIRECTIVES = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class Server:
    """A running server: where it listens and what it is, for the report."""

    url: str
    kind: str
    note: str = ""


def free_port() -> int:
    """Ask the kernel for a free port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> bool:
    """Wait until something accepts on the port, or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _post(url: str, body: dict[str, object], timeout: float = 10.0) -> tuple[str, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream, application/x-ndjson, text/plain, application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.headers.get("Content-Type", ""), resp.read()


def probe_reply(url: str, prompt: str = "probe prompt 7") -> str:
    """Return "" when a plain call answers as the workloads need, else what is wrong."""
    try:
        _, raw = _post(url, {"prompt": prompt})
        text = json.loads(raw)["prompt"]
    except Exception as exc:
        return f"plain call failed: {type(exc).__name__}: {exc}"
    if not isinstance(text, str) or prompt not in text:
        return "the reply does not contain the prompt (langchain_community's Modal needs that)"
    return ""


def probe_stream(url: str, pieces: int) -> str:
    """Return "" when a streaming call answers SSE with the expected number of pieces."""
    try:
        ctype, raw = _post(
            url, {"prompt": f"probe: {STREAM_PROMPT_FILLER}", "stream": True}, timeout=60.0
        )
    except Exception as exc:
        return f"stream call failed: {type(exc).__name__}: {exc}"
    if not ctype.startswith("text/event-stream"):
        return f"stream answered {ctype!r}, not text/event-stream"
    data = [ln for ln in raw.splitlines() if ln.startswith(b"data:")]
    got = len([ln for ln in data if ln[5:].strip() != b"[DONE]"])
    if got != pieces:
        return f"stream sent {got} pieces, expected {pieces}"
    return ""


class Servers:
    """Starts servers on demand, reuses them across workloads, stops them all on exit."""

    def __init__(
        self,
        *,
        use_nginx: bool = True,
        latency_server: str = "auto",
        server_cpus: set[int] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self._use_nginx = use_nginx
        self._latency_choice = latency_server
        self._cpus = server_cpus
        self._log = log
        self._procs: list[subprocess.Popen[bytes]] = []
        self._tmpdirs: list[tempfile.TemporaryDirectory[str]] = []
        self._cache: dict[tuple[object, ...], Server] = {}
        self.notes: list[str] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self._procs):
            _stop(proc)
        self._procs.clear()
        for tmp in self._tmpdirs:
            tmp.cleanup()
        self._tmpdirs.clear()

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            self._log(f"[servers] {text}")

    def cpu_server(self) -> Server:
        """nginx answering a fixed JSON reply; the Python endpoint if nginx is missing."""
        key: tuple[object, ...] = ("cpu",)
        if key not in self._cache:
            server = self._start_nginx() if self._use_nginx else None
            if server is None:
                server = self._start_latency(0.0, 0, 0.0, need_stream=False)
                self._note(
                    "CPU-bound runs use the Python endpoint instead of nginx "
                    f"({server.kind}); it competes with the client for CPU, "
                    "so those figures understate every client"
                )
                server = Server(server.url, server.kind, "nginx unavailable")
            self._cache[key] = server
        return self._cache[key]

    def latency_server(
        self, latency: float, *, pieces: int = 200, piece_delay: float = 0.0, stream: bool = False
    ) -> Server:
        """An endpoint that answers after ``latency`` s, or streams ``pieces`` SSE events."""
        key: tuple[object, ...] = ("latency", latency, pieces, piece_delay, stream)
        if key not in self._cache:
            self._cache[key] = self._start_latency(latency, pieces, piece_delay, need_stream=stream)
        return self._cache[key]

    def sse_server(self, pieces: int, piece_delay: float) -> Server:
        """``benchmarks/_sse_server.py``: raw-asyncio SSE, pieces stamped with their write time."""
        key: tuple[object, ...] = ("sse", pieces, piece_delay)
        if key not in self._cache:
            port = free_port()
            cmd = [sys.executable, "-m", "benchmarks._sse_server", "--port", str(port)]
            cmd += ["--pieces", str(pieces), "--piece-delay", str(piece_delay)]
            if self._spawn(cmd, port) is None:
                raise RuntimeError("the benchmark SSE server did not start")
            kind = "benchmarks/_sse_server.py (raw asyncio"
            kind += ", uvloop)" if importlib.util.find_spec("uvloop") else ")"
            self._cache[key] = Server(f"http://127.0.0.1:{port}/", kind)
        return self._cache[key]

    def _start_nginx(self) -> Server | None:
        nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
        )
        if nginx is None:
            self._note(
                "nginx is not installed (apt-get install -y nginx-light); "
                "falling back to the Python endpoint for CPU-bound runs"
            )
            return None
        tmp = tempfile.TemporaryDirectory(prefix="bench-nginx-")
        self._tmpdirs.append(tmp)
        port = free_port()
        reply = json.dumps({"prompt": NGINX_REPLY_TEXT}, separators=(",", ":"))
        directives = list(TEMP_PATH_DIRECTIVES)
        conf = Path(tmp.name) / "nginx.conf"
        for _ in range(len(TEMP_PATH_DIRECTIVES) + 1):
            temp_paths = "\n".join(f"    {d}_temp_path {tmp.name}/{d};" for d in directives)
            conf.write_text(
                NGINX_CONF.format(tmp=tmp.name, port=port, reply=reply, temp_paths=temp_paths)
            )
            cmd = [nginx, "-p", tmp.name, "-e", f"{tmp.name}/error.log", "-c", str(conf)]
            check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, check=False)
            if check.returncode == 0:
                break
            # A build without fastcgi/uwsgi/scgi rejects their temp path directives.
            unknown = [d for d in directives if f'"{d}_temp_path"' in check.stderr]
            if not unknown:
                self._note(f"nginx rejected its config: {check.stderr.strip()[-300:]}")
                return None
            directives = [d for d in directives if d not in unknown]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pin(self._cpus),
        )
        self._procs.append(proc)
        if not _wait_listening(proc, port):
            self._note("nginx did not start; falling back to the Python endpoint")
            return None
        url = f"http://127.0.0.1:{port}/"
        problem = probe_reply(url, THROUGHPUT_PROMPT)
        if problem:
            self._note(f"nginx answered badly ({problem}); falling back to the Python endpoint")
            return None
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        return Server(url, version.stderr.strip().replace("nginx version: ", "") or "nginx")

    def _spawn(self, cmd: Sequence[str], port: int) -> subprocess.Popen[bytes] | None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # A file, not a pipe: a chatty server must never block on a full pipe mid-run.
        tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
        self._tmpdirs.append(tmp)
        log = Path(tmp.name) / "stderr.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                list(cmd),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=_pin(self._cpus),
            )
        if _wait_listening(proc, port):
            self._procs.append(proc)
            return proc
        _stop(proc)
        tail = log.read_text(errors="replace").strip()[-200:]
        self._note(f"{cmd[2]} did not start: {tail}")
        return None

    def _start_latency(
        self, latency: float, pieces: int, piece_delay: float, *, need_stream: bool
    ) -> Server:
        flags = ["--latency", str(latency), "--pieces", str(pieces), "--piece-delay"]
        flags.append(str(piece_delay))
        if self._latency_choice in ("auto", "reference"):
            port = free_port()
            cmd = [sys.executable, "-m", "modal_llm.server", "--host", "127.0.0.1"]
            cmd += ["--port", str(port), *flags, "--stream-format", "sse", "--echo-prompt"]
            # The server is not under test: let it run as fast as it can.
            cmd += ["--uvloop"] if importlib.util.find_spec("uvloop") else []
            proc = self._spawn(cmd, port)
            if proc is not None:
                url = f"http://127.0.0.1:{port}/"
                problem = probe_reply(url)
                if not problem and need_stream:
                    problem = probe_stream(url, pieces)
                if not problem:
                    return Server(url, "modal_llm.server (reference)")
                self._note(f"the reference server is unusable here: {problem}")
                self._procs.remove(proc)
                _stop(proc)
            if self._latency_choice == "reference":
                raise RuntimeError("--latency-server reference was asked for but is unusable")
            self._note("latency/stream runs use benchmarks/_latency_server.py")
        port = free_port()
        cmd = [sys.executable, "-m", "benchmarks._latency_server", "--port", str(port), *flags]
        if self._spawn(cmd, port) is None:
            raise RuntimeError("the benchmark latency server did not start")
        return Server(f"http://127.0.0.1:{port}/", "benchmarks/_latency_server.py (aiohttp)")
