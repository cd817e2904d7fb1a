"""Run `depn serve` as a child process and talk to it over HTTP (the demo, `depn bench soak`, the tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

SMALL_CPU_OPTIONS = ("--dtype", "float32", "--max-model-len", "256", "--gpu-memory-utilization", "0.3",
                     "--enforce-eager", "--disable-uvicorn-access-log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`depn serve` on loopback; `start` returns once /health answers 200, `stop` terminates it."""

    def __init__(self, model: Path, tenants: Path, mask_store: Path, admin_token_file: Path, log: Path,
                 vllm_options: tuple[str, ...] = SMALL_CPU_OPTIONS, max_mask_slots: int = 64,
                 allow_unverified: bool = False, depn_options: tuple[str, ...] = (), env: dict | None = None):
        """`depn_options`: more of depn serve's own options; `env`: variables set for the server's processes."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        depn = shutil.which("depn", path=str(Path(sys.executable).parent)) or "depn"
        self.command = [depn, "serve", "--model", str(model), "--tenants", str(tenants),
                        "--mask-store", str(mask_store), "--admin-token-file", str(admin_token_file),
                        "--max-mask-slots", str(max_mask_slots), "--host", "127.0.0.1", "--port", str(self.port),
                        *(["--allow-unverified"] if allow_unverified else []), *depn_options, *vllm_options]
        self.admin_token_file = Path(admin_token_file)
        self.env = dict(env or {})
        self.log_path = Path(log)
        self.proc: subprocess.Popen | None = None
        self._model_id: str | None = None

    def start(self, timeout: float = 300) -> None:
        env = {**os.environ, **self.env}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-12000:]  # vLLM's root cause is above its summary
                raise RuntimeError(f"depn serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"depn serve was not healthy after {timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        """SIGTERM, then whatever of the server is left (an engine still starting ignores it) gets SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for process in psutil.wait_procs(children, timeout=10)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    def kill(self) -> None:
        """SIGKILL to every process of the server at once, as a power cut or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            server = psutil.Process(self.proc.pid)
            for process in [*server.children(recursive=True), server]:  # the engine's processes too
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def complete(self, key: str, prompt: str, max_tokens: int) -> str:
        """Greedy text completion through the OpenAI-compatible endpoint."""
        body = json.dumps({"model": self.model_id(key), "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=body, method="POST")
        request.add_header("Authorization", f"Bearer {key}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["text"]

    def model_id(self, key: str) -> str:
        """The served model's name, as /v1/models reports it (asked once)."""
        if self._model_id is None:
            request = urllib.request.Request(self.url + "/v1/models")
            request.add_header("Authorization", f"Bearer {key}")
            with urllib.request.urlopen(request, timeout=30) as response:
                self._model_id = json.loads(response.read())["data"][0]["id"]
        return self._model_id

    def metrics(self, token: str | None = None) -> str:
        """/metrics, read with `token` (default: the admin token; strangers get 401)."""
        request = urllib.request.Request(self.url + "/metrics")
        request.add_header("Authorization", f"Bearer {token or self.admin_token_file.read_text().strip()}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()
