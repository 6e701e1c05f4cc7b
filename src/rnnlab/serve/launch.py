"""A real ``rnnlab serve`` process on the loopback interface, for benchmarks and tests.

:class:`ServerProcess` runs ``python -m rnnlab serve --model DIR --port P --sessions-dir D`` in its
own process group on 127.0.0.1 (``P`` is a free port found by binding port 0), waits until
``/health`` answers, and always stops the whole group: SIGTERM, then SIGKILL if it has not exited
after a few seconds. :meth:`ServerProcess.kill` is SIGKILL at once (a crash). The server's output
goes to a temporary file whose end is quoted when it fails to start.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rnnlab serve`` of ``model_dir`` with sessions in ``sessions_dir`` (``extra``: more flags),
    as a context manager: started and healthy inside, stopped on exit whatever happened."""

    def __init__(self, model_dir: str | Path, sessions_dir: str | Path, *extra: str, start_timeout: float = 60.0):
        self.model_dir, self.sessions_dir, self.extra = str(model_dir), str(sessions_dir), extra
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> "ServerProcess":
        """Start the process and wait until ``/health`` answers; RuntimeError (with the end of the
        server's log) if it exits or does not answer within ``start_timeout`` seconds."""
        self.port = free_port()
        self._log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "rnnlab", "serve", "--model", self.model_dir, "--host", HOST,
               "--port", str(self.port), "--sessions-dir", self.sessions_dir, *self.extra]
        package_root = str(Path(__file__).resolve().parents[2])  # the child runs this very rnnlab
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)  # its own process group: stopped as a whole
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"rnnlab serve exited with status {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self._fail(f"rnnlab serve did not answer /health within {self.start_timeout:.0f} s")

    def _fail(self, why: str) -> None:
        """Stop the server that did not start, and raise RuntimeError with the end of its output."""
        self._log.seek(0)
        tail = " ".join(self._log.read().decode(errors="replace").split())[-400:]
        self.stop()
        raise RuntimeError(f"{why}: {tail}")

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass

    def kill(self) -> None:
        """SIGKILL the server's process group at once, as a crash would, and reap it."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group; SIGKILL it if the server has not exited after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # also whatever the server started in its group
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
