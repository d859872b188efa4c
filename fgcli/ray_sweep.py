"""``fgcli sweep --ray ADDRESS|auto``: each job of a sweep is a Ray task placed on a node that runs a ComfyUI server.

Every server is a custom Ray resource named ``comfyui:<its URL as seen from its node>``, declared by the Ray
worker that runs next to it, e.g. ``ray start --address HEAD:6379 --resources '{"comfyui:http://127.0.0.1:8188": 1}'``
(the amount is how many prompts it takes at once). Ray places each task where its server's resource is free,
queues the rest, retries a task whose worker or node died (``max_retries``) and a transient connection error
(``retry_exceptions``); a task whose server stays unreachable fails with ``ServerLost`` and its job goes to
another server's resource. Output files travel back to the driver inside the task's result and are written
there whole (a temporary name, then a rename), so nothing needs a shared disk.

Ray is optional (``pip install "comfyui-free-guidance[ray]"`` or ``pip install ray``); nothing else imports it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

from . import convert
from .client import ComfyClient, PromptFailed, PromptRejected, ServerUnreachable, output_files

RESOURCE_PREFIX = "comfyui:"


class ServerLost(ConnectionError):
    """The task's server stayed unreachable (or the prompt timed out there)."""


class RayMissing(ValueError):
    pass


def _job_task(url: str, prompt: dict, timeout: float, retries: int, backoff: float) -> dict:
    """Runs on the server's node: queue, wait, read the output files back. Returns the job's record."""
    client = ComfyClient(url, retries=retries, backoff=backoff)
    started = time.time()
    try:
        result = client.run(prompt, timeout=timeout)
        files = []
        for node_id, record in output_files(result.history):
            query = {
                "filename": record["filename"],
                "subfolder": record.get("subfolder", ""),
                "type": record["type"],
            }
            payload = client._request(f"/view?{urllib.parse.urlencode(query)}", raw=True)
            files.append((f"{node_id}_{record['filename']}", payload))
    except (PromptRejected, PromptFailed) as error:
        return {
            "status": "failed",
            "error": " | ".join(str(error).splitlines()),
            "seconds": time.time() - started,
        }
    except (ServerUnreachable, TimeoutError) as error:
        raise ServerLost(f"server {url} lost: {error}") from None
    counts = result.evaluations()
    telemetry = result.telemetry()
    return {
        "status": "done",
        "prompt_id": result.prompt_id,
        "history": result.history,
        "files": files,
        "seconds": time.time() - started,
        "evaluations": sum(c.get("total", 0) for c in counts) if counts else None,
        "skipped_passes": (
            sum(len(s.get("skipped", [])) for r in telemetry for s in r["steps"]) if telemetry else None
        ),
    }


def _write_whole(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def servers_of_cluster(ray) -> dict[str, float]:
    """{server URL: prompts at once} from the cluster's ``comfyui:<URL>`` resources."""
    return {
        key[len(RESOURCE_PREFIX) :]: amount
        for key, amount in ray.cluster_resources().items()
        if key.startswith(RESOURCE_PREFIX)
    }


def _object_info_task(url: str, retries: int) -> dict:
    return ComfyClient(url, retries=retries).object_info()


class Cluster:
    """``with Cluster(address, servers) as cluster:`` a connection to a Ray cluster and its ComfyUI servers."""

    def __init__(self, address: str, wanted: list[str] | None = None):
        self.address = address
        self.wanted = [w.rstrip("/") for w in wanted or []]

    def __enter__(self) -> Cluster:
        try:
            import ray
        except ImportError:
            raise RayMissing(
                "--ray needs Ray: pip install 'comfyui-free-guidance[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        host = self.address.rsplit(":", 1)[0]
        loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
        ray.init(
            address=self.address,
            **loopback,  # a cluster on loopback stays there
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]},  # fgcli, on every worker
        )
        servers = servers_of_cluster(ray)
        if self.wanted:
            servers = {url: n for url, n in servers.items() if url.rstrip("/") in self.wanted}
        if not servers:
            ray.shutdown()
            raise RayMissing(
                f"the Ray cluster at {self.address} has no ComfyUI server resource ('{RESOURCE_PREFIX}<URL>'"
                + (f" for {', '.join(self.wanted)}" if self.wanted else "")
                + "); start each Ray worker with --resources '{\"comfyui:http://127.0.0.1:8188\": 1}'"
            )
        self.servers = sorted(servers)
        return self

    def __exit__(self, *exc) -> None:
        self.ray.shutdown()

    def object_info(self, retries: int = 4) -> dict:
        """The first server's /object_info, read on its node (the driver may not reach the servers)."""
        url = self.servers[0]
        task = self.ray.remote(_object_info_task).options(num_cpus=0, resources={RESOURCE_PREFIX + url: 1})
        return self.ray.get(task.remote(url, retries))

    def run(self, sweep) -> list:
        """Run the jobs of ``sweep`` (a cli.Sweep: prompt, jobs, args, out_dir, journal, record) as Ray tasks."""
        ray = self.ray
        from ray.exceptions import RayTaskError

        args = sweep.args
        task = ray.remote(_job_task)
        fault_handling = {
            "num_cpus": 0,
            "max_retries": max(args.retries, 0),  # its worker or node died: Ray reruns the task
            "retry_exceptions": [ConnectionResetError, BrokenPipeError],  # a blip inside one request
        }
        alive = list(self.servers)
        sweep.out_dir.mkdir(parents=True, exist_ok=True)
        sweep.journal.write_text("")
        pending: dict[Any, tuple[Any, str]] = {}

        def submit(job, url: str) -> None:
            prompt = json.loads(json.dumps(sweep.prompt))
            for key, value in job.values.items():
                convert.set_input(prompt, (key, value))
            ref = task.options(resources={RESOURCE_PREFIX + url: 1}, **fault_handling).remote(
                url, prompt, args.timeout, args.retries, args.backoff
            )
            pending[ref] = (job, url)

        for index, job in enumerate(sweep.jobs):  # Ray queues what a server's resource cannot take yet
            submit(job, alive[index % len(alive)])
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, url = pending.pop(ready[0])
            job.server = url
            try:
                outcome = ray.get(ready[0])
            except RayTaskError as error:
                cause = getattr(error, "cause", None)
                lost = isinstance(cause, ServerLost) or "ServerLost" in str(error)
                if lost and url in alive:
                    alive.remove(url)
                if lost and alive:  # its job goes to a server that is still there
                    submit(job, alive[job.index % len(alive)])
                    continue
                job.status = "unfinished" if lost else "failed"
                job.error = " ".join(str(cause or error).split())[:500]
                sweep.record(job)
                continue
            job.status = outcome["status"]
            job.seconds = round(outcome["seconds"], 3)
            if outcome["status"] == "done":
                folder = sweep.out_dir / f"job{job.index:04d}"
                job.prompt_id = outcome["prompt_id"]
                job.files = []
                for name, payload in outcome["files"]:
                    _write_whole(folder / name, payload)
                    job.files.append(str(folder / name))
                job.evaluations = outcome["evaluations"]
                job.skipped_passes = outcome["skipped_passes"]
                _write_whole(folder / "history.json", json.dumps(outcome["history"], indent=1).encode())
            else:
                job.error = outcome["error"]
            sweep.record(job)
        return sweep.jobs
