"""A real ComfyUI server in a subprocess on loopback, and a small HTTP/websocket client for it.

The server runs the pinned checkout's ``main.py --cpu`` with a private base directory (models, custom nodes,
input, output) and an in-memory database, so nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .host import comfyui_dir, link_custom_nodes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: Path | None = None) -> Path:
    """A base directory with the pack and test nodes linked and the tiny model files written."""
    from . import tiny_models, tiny_vae_clip

    base_dir = Path(base_dir or tempfile.mkdtemp(prefix="free-guidance-server-"))
    link_custom_nodes(base_dir)
    models = base_dir / "models"
    for kind in ("diffusion_models", "vae", "text_encoders"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    tiny_models.save_model_file("sd15", models / "diffusion_models")
    tiny_vae_clip.save(tiny_vae_clip.taesd_state_dict(4), models / "vae" / "tiny_taesd.safetensors")
    tiny_vae_clip.save(
        tiny_vae_clip.clip_l_state_dict(), models / "text_encoders" / "tiny_clip_l.safetensors"
    )
    return base_dir


class ComfyServer:
    """``with ComfyServer(base_dir) as server: server.queue(prompt)``."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / f"server-{self.port}.log"

    def start(self, timeout: float | None = None) -> ComfyServer:
        # FREE_GUIDANCE_SERVER_TIMEOUT: a longer start-up wait on a loaded machine (default 120 s)
        timeout = timeout or float(os.environ.get("FREE_GUIDANCE_SERVER_TIMEOUT", "120"))
        root = comfyui_dir()
        command = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited early; log:\n{self.log()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()  # never leave a half-started server behind
        raise TimeoutError(f"ComfyUI server did not answer within {timeout}s; log:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    # -- HTTP

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def queue(self, prompt: dict, timeout: float = 300) -> dict:
        """POST /prompt, follow /ws until the prompt finishes, return its /history entry."""
        import websocket

        client_id = str(uuid.uuid4())
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout
        )
        try:
            status, answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
            if status != 200:
                raise RuntimeError(f"ComfyUI rejected the prompt ({status}): {json.dumps(answer, indent=1)}")
            prompt_id = answer["prompt_id"]
            deadline = time.time() + timeout
            while time.time() < deadline:
                message = ws.recv()
                if not isinstance(message, str):
                    continue  # binary previews
                event = json.loads(message)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "execution_error":
                    raise RuntimeError(f"prompt failed: {data.get('exception_message')}")
                if event["type"] == "executing" and data.get("node") is None:
                    break
                if event["type"] == "execution_success":
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")
        finally:
            ws.close()
        # execution_success is sent before the worker stores the history entry: wait for the entry.
        while True:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if time.time() > deadline:
                raise TimeoutError(f"prompt {prompt_id} finished but has no history entry after {timeout}s")
            time.sleep(0.1)
