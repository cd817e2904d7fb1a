"""The admin client (`depn masks push|list|drop`): torch-free, and server refusals become AdminError."""

import http.server
import json
import subprocess
import sys
import threading

import pytest

from depn_serve.core.errors import DepnError
from depn_serve.serving.client import AdminClient, AdminError


def test_client_imports_neither_torch_nor_vllm():
    code = ("import sys, depn_serve.serving.client; "
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request 403 with the server's error body; remembers what it was asked."""

    seen: list[tuple[str, str, str | None]] = []

    def _refuse(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"error": {"message": "nope", "code": 403}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = _refuse

    def log_message(self, *_args):
        pass


@pytest.fixture
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Refusing.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_error_body_becomes_admin_error_with_the_servers_message(refusing_server, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("t" * 24 + "\n")
    mask = tmp_path / "m.safetensors"
    mask.write_bytes(b"mask bytes")
    client = AdminClient(refusing_server, token)
    calls = [client.list, lambda: client.push("acme", "acme-main", mask), lambda: client.drop("acme", "acme-main")]
    for call in calls:
        with pytest.raises(AdminError) as err:
            call()
        assert err.value.status == 403 and str(err.value) == "server answered 403: nope"
        assert isinstance(err.value, DepnError)
    assert [(m, p) for m, p, _ in _Refusing.seen] == [
        ("GET", "/depn/v1/masks"),
        ("PUT", "/depn/v1/tenants/acme/masks/acme-main"),
        ("DELETE", "/depn/v1/tenants/acme/masks/acme-main"),
    ]
    assert all(auth == "Bearer " + "t" * 24 for _, _, auth in _Refusing.seen)
