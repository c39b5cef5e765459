"""A `streamvox serve` subprocess for benchmarks: started on a free 127.0.0.1 port, stopped on exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=os.environ.copy())
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}: {self.command}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).json().get("ready"):
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready in 300 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
