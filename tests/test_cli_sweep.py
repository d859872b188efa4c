"""The CLI's sweep over two real servers on loopback: every output accounted for, and a server killed in the
middle of a sweep loses no finished output while the unfinished prompts are reported.

The swept workflow is an API prompt file on the tiny test model (FGTest nodes, 8×8 latent, 2 steps) ending in
SaveLatent, so that each of the 20 prompts writes a real output file in a fraction of a second; the templates
themselves run through the same CLI in test_workflows.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fg_testing.host import link_custom_nodes
from fg_testing.prompts import Graph
from fg_testing.server import ComfyServer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = []
    try:
        for name in ("a", "b"):
            base_dir = tmp_path_factory.mktemp(f"sweep-{name}")
            link_custom_nodes(base_dir)
            started.append(ComfyServer(base_dir).start())
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """Tiny SD1.5 → Count → CFG Interval → KSampler → SaveLatent (+ report), as an API prompt file."""
    g = Graph()
    model = g.node("FGTest_TinyModel", family="sd15", seed=0)
    model = g.node("FreeGuidanceCountEvaluations", model=model)
    model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)
    positive = g.node("FGTest_TinyConditioning", family="sd15", seed=1, tokens=8)
    negative = g.node("FGTest_TinyConditioning", family="sd15", seed=2, tokens=8)
    latent = g.node("FGTest_TinyEmptyLatent", family="sd15", batch=1, height=8, width=8, frames=1)
    sampled = g.node(
        "KSampler",
        model=model,
        seed=0,
        steps=2,
        cfg=4.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    g.node("SaveLatent", samples=sampled, filename_prefix="sweep/latent")
    g.node("FreeGuidanceEvaluationReport", model=model, latent=sampled)
    for node in g.prompt.values():
        node["_meta"] = {"title": node["class_type"]}
    path = tmp_path_factory.mktemp("sweep-workflow") / "tiny_sd15.json"
    path.write_text(json.dumps(g.prompt, indent=1))
    return path


def sweep_command(workflow: Path, servers, out: Path, grid: list[str]) -> list[str]:
    command = [sys.executable, "-m", "fgcli", "sweep", str(workflow), "--out", str(out), "--retries", "1"]
    command += ["--backoff", "0.2", "--timeout", "300"]
    for server in servers:
        command += ["--server", server.url]
    for item in grid:
        command += ["--grid", item]
    return command


def read_results(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    return rows


def test_sweep_of_20_prompts_over_two_servers_accounts_for_every_output(servers, workflow, tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(str(i) for i in range(10)) + "\n")
    out = tmp_path / "sweep"
    result = subprocess.run(
        sweep_command(workflow, servers, out, [f"KSampler.seed=@{seeds}", "KSampler.cfg=3.0,6.5"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout[-2000:], result.stderr[-2000:])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_results(out)
    assert len(rows) == 20
    assert [row["job"] for row in rows] == list(range(20))
    grid = {(int(row["KSampler.seed"]), float(row["KSampler.cfg"])) for row in rows}
    assert grid == {(seed, cfg) for seed in range(10) for cfg in (3.0, 6.5)}  # the whole 10 × 2 grid
    assert all(row["status"] == "done" for row in rows), rows
    assert {row["server"] for row in rows} == {s.url for s in servers}  # both servers did work
    files = [Path(f) for row in rows for f in row["files"].split(";")]
    assert len(files) == 20 and len(set(files)) == 20
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert all(row["evaluations"] and row["skipped_passes"] is not None for row in rows)
    assert len((out / "results.jsonl").read_text().splitlines()) == 20


def test_a_server_killed_mid_sweep_loses_no_finished_output_and_the_rest_is_reported(
    servers, workflow, tmp_path
):
    out = tmp_path / "sweep"
    seeds = ",".join(str(1000 + i) for i in range(10))
    process = subprocess.Popen(
        # 6 steps: each prompt takes long enough for the kill to land while the sweep runs
        sweep_command(workflow, servers, out, [f"KSampler.seed={seeds}"]) + ["--set", "KSampler.steps=6"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = servers[1]
    journal = out / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        rows = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
        done_on_victim = [r for r in rows if r["status"] == "done" and r["server"] == victim.url]
        if len(rows) >= 2 and done_on_victim:
            break
        assert process.poll() is None, "the sweep ended before the server could be killed"
        time.sleep(0.1)
    else:
        raise AssertionError("the sweep made no progress")
    victim.process.kill()  # no goodbye: like a crash
    victim.process.wait()
    stdout, stderr = process.communicate(timeout=600)
    print(stdout[-3000:], stderr[-3000:])
    assert process.returncode == 1, "a sweep with unfinished prompts must not report success"

    rows = read_results(out)
    assert len(rows) == 10 and sorted(r["job"] for r in rows) == list(range(10))
    done = [r for r in rows if r["status"] == "done"]
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    assert len(done) + len(unfinished) == 10, [r["status"] for r in rows]
    assert unfinished, "the killed server's prompt in flight must be reported"
    assert all(r["server"] == victim.url and "lost" in r["error"] for r in unfinished), unfinished
    # every finished prompt kept its output, including those the killed server finished before it died
    for row in done:
        files = [Path(f) for f in row["files"].split(";")]
        assert files and all(f.exists() and f.stat().st_size > 0 for f in files), row
    assert any(r["server"] == victim.url for r in done)
    for row in unfinished:
        assert f"job {row['job']} unfinished" in stdout


# ----------------------------------------------------------------------------------------------------------
# The same sweep on a Ray cluster: a local head on loopback whose custom resources are two fresh servers.


def _whole_safetensors(path: Path) -> bool:
    """A .latent file (safetensors) is whole when its size is header + the data its header describes."""
    data = path.read_bytes()
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return len(data) == 8 + length + end


# A throwaway cluster on loopback: no token authentication (Ray 2.5x's default asks every client for one)
RAY_ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


@pytest.fixture
def ray_cluster(tmp_path_factory):
    """(address, [server a, server b]): ``ray start --head --block`` (1 CPU, no dashboard, loopback) with one
    ``comfyui:<URL>`` resource per server, as a real cluster's workers declare them."""
    import tempfile

    from fg_testing.server import free_port

    started = []
    head = None
    try:
        for name in ("a", "b"):
            base_dir = tmp_path_factory.mktemp(f"ray-sweep-{name}")
            link_custom_nodes(base_dir)
            started.append(ComfyServer(base_dir).start())
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="fgray", dir="/tmp")  # Ray's socket paths must stay short
        resources = {f"comfyui:{server.url}": 1 for server in started}
        log = open(Path(temp_dir) / "head.log", "w")
        head = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
                "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false",
                "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--resources={json.dumps(resources)}",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=RAY_ENV,
        )  # fmt: skip
        deadline = time.time() + float(os.environ.get("FREE_GUIDANCE_SERVER_TIMEOUT", "240"))
        while "Ray runtime started" not in (Path(temp_dir) / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (Path(temp_dir) / "head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", started
    finally:
        if head is not None and head.poll() is None:
            head.terminate()  # --block: the head stops its own processes
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
        for server in started:
            server.stop()


def test_a_ray_sweep_survives_a_killed_server_every_job_done_once_every_file_whole(
    ray_cluster, workflow, tmp_path
):
    address, servers = ray_cluster
    out = tmp_path / "sweep"
    seeds = ",".join(str(2000 + i) for i in range(10))
    command = [sys.executable, "-m", "fgcli", "sweep", str(workflow), "--ray", address, "--out", str(out)]
    command += ["--retries", "1", "--backoff", "0.2", "--timeout", "300", "--grid", f"KSampler.seed={seeds}"]
    command += ["--set", "KSampler.steps=6"]  # long enough for the kill to land mid-sweep
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV
    )
    victim = servers[1]
    journal = out / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        rows = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
        if [r for r in rows if r["status"] == "done" and r["server"] == victim.url]:
            break
        assert process.poll() is None, "the sweep ended before the server could be killed: " + str(
            process.communicate()
        )
        time.sleep(0.1)
    else:
        raise AssertionError("the Ray sweep made no progress")
    victim.process.kill()  # no goodbye: like a crash
    victim.process.wait()
    stdout, stderr = process.communicate(timeout=600)
    print(stdout[-3000:], stderr[-3000:])
    assert process.returncode == 0, stdout + stderr  # Ray moved the lost jobs: every one is done

    journal_rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(r["index"] for r in journal_rows) == list(range(10))  # each job ends exactly once
    assert all(r["status"] == "done" for r in journal_rows), journal_rows
    rows = read_results(out)
    assert len(rows) == 10 and all(r["status"] == "done" for r in rows)
    assert {r["server"] for r in rows} == {s.url for s in servers}  # both did work before the kill
    files = [Path(f) for row in rows for f in row["files"].split(";")]
    assert len(files) == 10 and len(set(files)) == 10
    assert all(f.suffix == ".latent" and _whole_safetensors(f) for f in files), files
    assert not list(out.rglob("*.part"))
