"""Command line: ``python -m fgcli {convert,queue,sweep} ...`` (run from the pack's folder).

  convert WORKFLOW --server URL [-o api.json]       UI workflow → API prompt (with the server's /object_info)
  queue   WORKFLOW --server URL [--set node.input=value ...] [--out DIR]
          queue it, show progress, download the outputs, print the guidance telemetry
  sweep   WORKFLOW --server URL [--server URL ...] --grid node.input=v1,v2 [--grid ...] [--out DIR]
          run the grid over one or more servers with bounded concurrency; write results.csv/json
  sweep   WORKFLOW --ray ADDRESS|auto --grid ...   the same, each job a Ray task on the cluster's servers

WORKFLOW may be a UI-format workflow (what the editor saves) or an API prompt. ``node`` is a node id (inside a
subgraph ``15:8``), a node's unique title or class type, or ``15:TITLE`` inside subgraph node 15; values are JSON where they parse (numbers, true/false, lists), else strings.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import queue as queue_module
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import convert
from .client import ComfyClient, PromptFailed, PromptRejected, ServerUnreachable
from .ray_sweep import RayMissing


class UsageError(ValueError):
    """A misuse of the command line (bad file, bad folder, bad value): one line on stderr, exit status 2."""


def read_json(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file" if not file.exists() else f"{path}: not a file")
    try:
        return json.loads(file.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None


def writable_file(path: str) -> Path:
    """``path`` as an output file, refused before any work when its folder is missing."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path}: is a folder, not a file")
    if not target.parent.is_dir():
        raise UsageError(f"{path}: the folder {target.parent} does not exist")
    return target


def load_prompt(path: str, client: ComfyClient) -> tuple[dict, dict | None]:
    """(API prompt, UI workflow or None) from a file of either format."""
    data = read_json(path)
    return prompt_from(data, path, client.object_info), (data if convert.is_ui_workflow(data) else None)


def prompt_from(data: Any, path: str, object_info) -> dict:
    """The API prompt of a file's content; ``object_info()`` is asked only for a UI workflow."""
    if convert.is_ui_workflow(data):
        return convert.ui_to_api(data, object_info())
    if isinstance(data, dict) and "prompt" in data and convert.is_api_prompt(data["prompt"]):
        return data["prompt"]
    if convert.is_api_prompt(data):
        return data
    raise UsageError(f"{path}: neither a UI workflow nor an API prompt")


# ----------------------------------------------------------------------------------------------------------
# Display


class ProgressBar:
    """One line on stderr from /ws events: node being executed, sampler step bar."""

    def __init__(self, prompt: dict, stream=sys.stderr, enabled: bool = True):
        self.prompt = prompt
        self.stream = stream
        self.enabled = enabled
        self.node: str | None = None

    def title(self, node_id: str | None) -> str:
        if node_id is None:
            return ""
        node = self.prompt.get(str(node_id), {})
        return f"{node_id} {(node.get('_meta') or {}).get('title') or node.get('class_type', '')}"

    def __call__(self, kind: str, data: dict) -> None:
        if not self.enabled:
            return
        if kind == "executing" and data.get("node") is not None:
            self.node = data["node"]
            self._line(f"running {self.title(self.node)}")
        elif kind == "progress":
            value, maximum = int(data.get("value", 0)), max(int(data.get("max", 1)), 1)
            filled = int(30 * value / maximum)
            self._line(
                f"[{'#' * filled}{'.' * (30 - filled)}] {value}/{maximum} {self.title(data.get('node'))}"
            )
        elif kind == "execution_cached" and data.get("nodes"):
            self._line(f"cached: {', '.join(map(str, data['nodes']))}")

    def _line(self, text: str) -> None:
        self.stream.write("\r\033[K" + text[:120])
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def format_telemetry(records: list[dict]) -> str:
    """A per-node table of the guidance telemetry kept in the history."""
    lines = []
    for record in records:
        steps = record.get("steps", [])
        skipped = sum(1 for s in steps if s.get("skipped"))
        lines.append(
            f"telemetry: node {record.get('node')} ({record.get('title', '')}): {len(steps)} evaluations of the "
            f"guided model, {skipped} with a skipped pass"
        )
        lines.append("   #      sigma  ran                 skipped       scale  cos_x0  evals")
        for index, step in enumerate(steps):
            cosine = step.get("cosine_x0")
            scale = step.get("scale")
            lines.append(
                f"  {index:2d} {step.get('sigma', 0.0):10.4f}  {','.join(step.get('ran', [])):18s}  "
                f"{','.join(step.get('skipped', [])):12s} {'' if scale is None else f'{scale:6.2f}':>6s}  "
                f"{'' if cosine is None else f'{cosine:6.3f}':>6s}  {step.get('evaluations', '')}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Commands


def cmd_convert(args) -> int:
    output = writable_file(args.output) if args.output else None
    client = ComfyClient(args.server, retries=args.retries)
    prompt, _ = load_prompt(args.workflow, client)
    for assignment in args.set or []:
        convert.set_input(prompt, assignment)
    text = json.dumps(prompt, indent=2)
    if output is not None:
        output.write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_queue(args) -> int:
    client = ComfyClient(args.server, retries=args.retries)
    prompt, workflow = load_prompt(args.workflow, client)
    rng = random.Random(args.seed_rng)
    out_dir = Path(args.out)
    status = 0
    for run in range(args.count):
        current = copy.deepcopy(prompt)
        for assignment in args.set or []:
            convert.set_input(current, assignment)
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow is not None else None
        bar = ProgressBar(current, enabled=not args.quiet)
        started = time.time()
        try:
            result = client.run(
                current, out_dir=out_dir, extra_data=extra, on_event=bar, timeout=args.timeout
            )
        except PromptRejected as error:
            bar.done()
            print(str(error), file=sys.stderr)
            return 2
        except PromptFailed as error:
            bar.done()
            print(str(error), file=sys.stderr)
            return 3
        finally:
            bar.done()
        summary = {
            "prompt_id": result.prompt_id,
            "status": result.status,
            "seconds": round(time.time() - started, 3),
            "files": [str(p) for p in result.files],
            "evaluations": result.evaluations(),
            "telemetry": result.telemetry(),
        }
        (out_dir / f"{result.prompt_id}.json").write_text(json.dumps(result.history, indent=1))
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"prompt {result.prompt_id}: {result.status} in {summary['seconds']}s")
            for path in result.files:
                print(f"  wrote {path}")
            for counts in summary["evaluations"]:
                print(
                    f"  evaluations: {counts.get('total')} ({counts.get('cond')} cond, {counts.get('uncond')} uncond)"
                )
            if summary["telemetry"]:
                print(format_telemetry(summary["telemetry"]))
        if workflow is not None and run + 1 < args.count:
            # Like the editor after each queue: apply "control after generate" and convert again.
            convert.apply_seed_controls(workflow, client.object_info(), rng)
            prompt = convert.ui_to_api(workflow, client.object_info())
    return status


# -- sweep


def parse_grid(spec: str) -> tuple[str, list[Any]]:
    """``node.input=v1,v2`` | ``node.input=@file`` (one value per line) | ``node.input=[json list]``."""
    if "=" not in spec:
        raise convert.ConversionError(f"expected node.input=values, got '{spec}'")
    key, text = spec.split("=", 1)
    if text.startswith("@"):
        source = Path(text[1:])
        if not source.is_file():
            raise UsageError(f"--grid {key}: no such file {source}")
        values: list[Any] = [line for line in source.read_text().splitlines() if line.strip()]
    elif text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--grid {key}: not a JSON list ({error.msg})") from None
        if not isinstance(values, list):
            raise UsageError(f"--grid {key}: not a JSON list")
    else:
        values = [convert.parse_value(v) for v in text.split(",")]
    if not values:
        raise convert.ConversionError(f"no values for {key}")
    return key, values


@dataclass
class Job:
    index: int
    values: dict[str, Any]
    status: str = "pending"  # done | failed | unfinished
    server: str = ""
    prompt_id: str = ""
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    evaluations: int | None = None
    skipped_passes: int | None = None


class Sweep:
    def __init__(self, prompt: dict, jobs: list[Job], servers: list[str], args):
        self.prompt = prompt
        self.jobs = jobs
        self.args = args
        self.out_dir = Path(args.out)
        self.clients = [ComfyClient(url, retries=args.retries, backoff=args.backoff) for url in servers]
        self.pending: queue_module.Queue[Job] = queue_module.Queue()
        for job in jobs:
            self.pending.put(job)
        self.lock = threading.Lock()
        self.dead: set[str] = set()
        self.journal = self.out_dir / "results.jsonl"

    def record(self, job: Job) -> None:
        with self.lock:
            with open(self.journal, "a") as handle:  # a row per finished job, as it finishes
                handle.write(json.dumps(asdict(job)) + "\n")
            done = sum(1 for j in self.jobs if j.status in ("done", "failed", "unfinished"))
            if not self.args.quiet:
                print(
                    f"[{done}/{len(self.jobs)}] job {job.index} {job.status} on {job.server}"
                    + (f": {job.error}" if job.error else ""),
                    file=sys.stderr,
                )

    def worker(self, client: ComfyClient) -> None:
        while True:
            if client.url in self.dead:
                return
            try:
                job = self.pending.get_nowait()
            except queue_module.Empty:
                return
            prompt = copy.deepcopy(self.prompt)
            for key, value in job.values.items():
                convert.set_input(prompt, (key, value))
            job.server = client.url
            started = time.time()
            try:
                result = client.run(
                    prompt, out_dir=self.out_dir / f"job{job.index:04d}", timeout=self.args.timeout
                )
                job.status = "done"
                job.prompt_id = result.prompt_id
                job.files = [str(p) for p in result.files]
                counts = result.evaluations()
                job.evaluations = sum(c.get("total", 0) for c in counts) if counts else None
                telemetry = result.telemetry()
                if telemetry:
                    job.skipped_passes = sum(len(s.get("skipped", [])) for r in telemetry for s in r["steps"])
                (self.out_dir / f"job{job.index:04d}" / "history.json").write_text(
                    json.dumps(result.history, indent=1)
                )
            except (PromptRejected, PromptFailed) as error:
                job.status = "failed"
                job.error = str(error).replace("\n", " | ")
            except (ServerUnreachable, TimeoutError) as error:
                job.status = "unfinished"
                job.error = f"server {client.url} lost: {error}"
                with self.lock:
                    self.dead.add(client.url)
            job.seconds = round(time.time() - started, 3)
            self.record(job)
            if job.status == "unfinished":
                if self.args.reassign:
                    job.status, job.error = "pending", ""
                    self.pending.put(job)
                return

    def run(self) -> list[Job]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.journal.write_text("")
        threads = [
            threading.Thread(target=self.worker, args=(client,), daemon=True)
            for client in self.clients
            for _ in range(self.args.per_server)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        while True:  # every server lost: what is left was never started
            try:
                job = self.pending.get_nowait()
            except queue_module.Empty:
                break
            job.status = "unfinished"
            job.error = "no server left"
            self.record(job)
        return self.jobs


def write_results(jobs: list[Job], keys: list[str], out_dir: Path) -> tuple[Path, Path]:
    rows = []
    for job in jobs:
        row = {"job": job.index, "status": job.status, "server": job.server, "prompt_id": job.prompt_id}
        row.update({key: job.values.get(key) for key in keys})
        row.update(
            {
                "files": ";".join(job.files),
                "seconds": job.seconds,
                "evaluations": job.evaluations,
                "skipped_passes": job.skipped_passes,
                "error": job.error,
            }
        )
        rows.append(row)
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))
    return csv_path, json_path


def cmd_sweep(args) -> int:
    servers = args.server or []
    if not servers and not args.ray:
        raise UsageError("sweep needs --server URL (repeatable) or --ray ADDRESS")
    grid = [parse_grid(spec) for spec in args.grid or []]  # misuse first, before any server is asked
    if args.ray:
        from . import ray_sweep

        with ray_sweep.Cluster(args.ray, servers) as cluster:
            base = prompt_from(
                read_json(args.workflow), args.workflow, lambda: cluster.object_info(args.retries)
            )
            jobs = _sweep_jobs(base, grid, args)
            cluster.run(Sweep(base, jobs, [], args))
        return _sweep_report(jobs, [key for key, _ in grid], args)
    client = ComfyClient(servers[0], retries=args.retries, backoff=args.backoff)
    base, _ = load_prompt(args.workflow, client)
    jobs = _sweep_jobs(base, grid, args)
    Sweep(base, jobs, servers, args).run()
    return _sweep_report(jobs, [key for key, _ in grid], args)


def _sweep_jobs(base: dict, grid: list[tuple[str, list]], args) -> list[Job]:
    for assignment in args.set or []:
        convert.set_input(base, assignment)
    keys = [key for key, _ in grid]
    for key in keys:  # fail early on a bad node reference
        convert.find_node(base, key.rsplit(".", 1)[0])
    combos = list(itertools.product(*[values for _, values in grid])) if grid else [()]
    return [Job(index, dict(zip(keys, combo, strict=True))) for index, combo in enumerate(combos)]


def _sweep_report(jobs: list[Job], keys: list[str], args) -> int:
    csv_path, json_path = write_results(jobs, keys, Path(args.out))
    counts = {s: sum(1 for j in jobs if j.status == s) for s in ("done", "failed", "unfinished")}
    print(
        f"sweep: {len(jobs)} jobs, {counts['done']} done, {counts['failed']} failed, "
        f"{counts['unfinished']} unfinished; results in {csv_path} and {json_path}"
    )
    for job in jobs:
        if job.status != "done":
            print(f"  job {job.index} {job.status}: {job.values} {job.error}")
    return 0 if counts["done"] == len(jobs) else 1


# ----------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse adds a usage block)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fgcli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, multi_server=False):
        p.add_argument("workflow", help="UI-format workflow or API prompt (JSON file)")
        if multi_server:
            p.add_argument("--server", action="append", help="server URL (repeatable)")
        else:
            p.add_argument("--server", default="http://127.0.0.1:8188", help="server URL")
        p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input")
        p.add_argument("--retries", type=int, default=4, help="retries of a failed connection")

    p = sub.add_parser("convert", help="convert a UI workflow to an API prompt")
    common(p)
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("queue", help="queue a workflow, follow it, download its outputs")
    common(p)
    p.add_argument("--out", default="fg-output", help="folder for the outputs (default fg-output)")
    p.add_argument("--count", type=int, default=1, help="queue N times, applying 'control after generate'")
    p.add_argument("--seed-rng", type=int, default=None, help="seed for 'randomize' seed controls")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", action="store_true", help="print one JSON summary line per prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("sweep", help="run a grid over inputs across servers")
    common(p, multi_server=True)
    p.add_argument("--grid", action="append", metavar="NODE.INPUT=V1,V2|@FILE|[JSON]", help="a grid axis")
    p.add_argument("--out", default="fg-sweep", help="folder for outputs and results (default fg-sweep)")
    p.add_argument("--per-server", type=int, default=1, help="prompts in flight per server (default 1)")
    p.add_argument("--reassign", action="store_true", help="rerun the jobs of a lost server elsewhere")
    p.add_argument(
        "--ray",
        metavar="ADDRESS|auto",
        help="run each job as a Ray task on the cluster's ComfyUI servers (resources 'comfyui:<URL>'); "
        "--server then picks among them",
    )
    p.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    p.add_argument("--timeout", type=float, default=3600, help="per prompt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (convert.ConversionError, UsageError, RayMissing) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except ServerUnreachable as error:
        print(f"error: server unreachable: {_one_line(error)}", file=sys.stderr)
        return 4
    except OSError as error:  # a file or folder the command was told to use
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
