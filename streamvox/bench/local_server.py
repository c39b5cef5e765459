"""A `streamvox serve` subprocess for benchmarks: started on a free 127.0.0.1 port, stopped on exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


class LocalServer:
    """A `streamvox serve` subprocess on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self, model: str, flags: list[str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.command = [sys.executable, "-m", "streamvox.cli", "serve", "--model", model,
                        "--host", "127.0.0.1", "--port", str(self.port), *flags]

    def __enter__(self) -> str:
        self.log = tempfile.NamedTemporaryFile(prefix="streamvox-bench-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            return self._wait_ready(f"http://127.0.0.1:{self.port}")
        except BaseException:
            self._stop()  # the log stays, for the error to point at
            raise

    def _wait_ready(self, url: str) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}; its log: {self.log.name}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).json().get("ready"):
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not become ready in 300 s; its log: {self.log.name}")

    def __exit__(self, *exc) -> None:
        self._stop()
        os.unlink(self.log.name)

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
