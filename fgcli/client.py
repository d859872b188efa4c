"""A small ComfyUI client: /object_info, /prompt, /ws progress, /history, /view. No ComfyUI import.

Connection errors are retried with a short backoff; a prompt's completion is read from ``/history`` (the
websocket only drives the progress display), so a dropped websocket loses nothing: the client reconnects,
and if the socket stays down it polls the history until the prompt is there.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # optional: progress events; without it the client polls /history
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - the test environment has it
    websocket = None


class ServerUnreachable(ConnectionError):
    """The server did not answer after the retries."""


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: validation failed. ``node_errors`` says which node and input."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error or {}
        self.node_errors = node_errors or {}
        super().__init__(format_rejection(self.error, self.node_errors))


class PromptFailed(RuntimeError):
    """The prompt ran and failed (execution_error in its history)."""

    def __init__(self, prompt_id: str, messages: list):
        self.prompt_id = prompt_id
        self.messages = messages
        detail = ""
        for kind, data in messages:
            if kind == "execution_error":
                detail = (
                    f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}"
                )
        super().__init__(f"prompt {prompt_id} failed: {detail or 'see the server log'}")


def format_rejection(error: dict, node_errors: dict) -> str:
    lines = [f"server rejected the prompt: {error.get('message', '')} {error.get('details', '')}".rstrip()]
    for node_id, info in (node_errors or {}).items():
        lines.append(f"  node {node_id} ({info.get('class_type')}):")
        for item in info.get("errors", []):
            extra = item.get("extra_info") or {}
            name = extra.get("input_name")
            where = f" input '{name}'" if name else ""
            lines.append(f"    -{where} {item.get('message')}: {item.get('details')}")
    return "\n".join(lines)


@dataclass
class PromptResult:
    prompt_id: str
    history: dict
    files: list[Path] = field(default_factory=list)

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    @property
    def status(self) -> str:
        return (self.history.get("status") or {}).get("status_str", "unknown")

    def telemetry(self) -> list[dict]:
        """Guidance telemetry records kept in the history (Network Evaluation Report outputs)."""
        records = []
        for output in self.outputs.values():
            records.extend(output.get("free_guidance_telemetry", []))
        return records

    def evaluations(self) -> list[dict]:
        counts = []
        for output in self.outputs.values():
            counts.extend(output.get("free_guidance_evaluations", []))
        return counts


def output_files(history: dict, types: tuple[str, ...] = ("output",)) -> list[tuple[str, dict]]:
    """(node id, file record) of every file the prompt's output nodes wrote."""
    found = []
    for node_id, output in (history.get("outputs") or {}).items():
        for value in output.values():
            if not isinstance(value, list):
                continue
            for item in value:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") in types:
                    found.append((node_id, item))
    return found


class ComfyClient:
    def __init__(self, url: str, *, retries: int = 5, backoff: float = 0.5, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.client_id = str(uuid.uuid4())
        self._object_info: dict | None = None

    def __repr__(self) -> str:
        return f"ComfyClient({self.url})"

    # -- HTTP with retries
    def _request(self, path: str, body: dict | None = None, *, raw: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                    return payload if raw else json.loads(payload or b"null")
            except urllib.error.HTTPError as error:
                if error.code == 400 and path == "/prompt":
                    answer = json.loads(error.read() or b"{}")
                    raise PromptRejected(answer.get("error"), answer.get("node_errors")) from None
                if error.code < 500:
                    raise
                last_error = error
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                last_error = error
            if attempt < self.retries:
                time.sleep(self.backoff * (2**attempt))
        raise ServerUnreachable(f"{self.url}{path}: {last_error}")

    def get(self, path: str) -> Any:
        return self._request(path)

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get("/object_info")
        return self._object_info

    def submit(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        answer = self._request("/prompt", body)
        if answer.get("node_errors"):
            # Accepted, but some outputs did not validate and were dropped: say so.
            raise PromptRejected({"message": "some outputs failed validation"}, answer["node_errors"])
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def download(self, record: dict, directory: Path, prefix: str = "") -> Path:
        query = urllib.parse.urlencode(
            {
                "filename": record["filename"],
                "subfolder": record.get("subfolder", ""),
                "type": record.get("type"),
            }
        )
        payload = self._request(f"/view?{query}", raw=True)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{prefix}{record['filename']}"
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(payload)
        os.replace(tmp, path)  # a file is either complete or absent
        return path

    # -- websocket
    def _connect_ws(self):
        if websocket is None:
            return None
        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://")
        try:
            return websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=2)
        except (OSError, websocket.WebSocketException):
            return None

    def wait(
        self,
        prompt_id: str,
        *,
        timeout: float = 3600,
        on_event: Callable[[str, dict], None] | None = None,
        ws=None,
    ) -> dict:
        """Wait for the prompt to finish (its history entry), showing progress events; returns the entry."""
        deadline = time.time() + timeout
        last_poll = 0.0
        failures = 0
        finished_kinds = {"execution_success", "execution_error", "execution_interrupted"}
        while time.time() < deadline:
            if ws is None:
                ws = self._connect_ws()
            if ws is not None:
                try:
                    message = ws.recv()
                    if isinstance(message, str):
                        event = json.loads(message)
                        data = event.get("data") or {}
                        kind = event.get("type")
                        if on_event is not None and data.get("prompt_id") in (None, prompt_id):
                            on_event(kind, data)
                        if data.get("prompt_id") == prompt_id and (
                            kind in finished_kinds or (kind == "executing" and data.get("node") is None)
                        ):
                            last_poll = 0.0  # it says it is done: read the history now
                except websocket.WebSocketTimeoutException:
                    pass
                except (OSError, websocket.WebSocketException):
                    ws.close()
                    ws = None  # dropped: reconnect on the next turn, poll meanwhile
            else:
                time.sleep(0.5)
            if time.time() - last_poll >= (1.0 if ws is not None else 0.5):
                last_poll = time.time()
                try:
                    entry = self.history(prompt_id)
                    failures = 0
                except ServerUnreachable:
                    failures += 1
                    if failures >= 2:
                        raise
                    entry = None
                if entry and (entry.get("status") or {}).get("completed") is not None:
                    status = entry.get("status") or {}
                    if status.get("status_str") == "error":
                        if ws is not None:
                            ws.close()
                        raise PromptFailed(prompt_id, status.get("messages", []))
                    if status.get("completed") or status.get("status_str") == "success":
                        if ws is not None:
                            ws.close()
                        return entry
        if ws is not None:
            ws.close()
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(
        self,
        prompt: dict,
        *,
        out_dir: Path | None = None,
        prefix: str = "",
        extra_data: dict | None = None,
        timeout: float = 3600,
        on_event: Callable[[str, dict], None] | None = None,
        types: tuple[str, ...] = ("output",),
    ) -> PromptResult:
        """Queue, wait, download the outputs. The websocket opens before queueing so no event is missed."""
        ws = self._connect_ws()
        prompt_id = self.submit(prompt, extra_data)
        entry = self.wait(prompt_id, timeout=timeout, on_event=on_event, ws=ws)
        result = PromptResult(prompt_id, entry)
        if out_dir is not None:
            for node_id, record in output_files(entry, types):
                result.files.append(self.download(record, out_dir, prefix=f"{prefix}{node_id}_"))
        return result
