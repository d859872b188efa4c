"""The real ComfyUI host, in process: import sequence, pack loading and prompt execution.

The host is the pinned checkout made by ``scripts/setup_host.sh`` (found through ``FREE_GUIDANCE_COMFYUI`` or
the default cache). There is no mock anywhere: prompts go through ComfyUI's own ``validate_prompt`` and
``PromptExecutor``; models through its loaders.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-free-guidance"
SETUP_HINT = (
    "Run scripts/setup_host.sh first (or scripts/test.sh, which does). Without internet, give it the ComfyUI "
    "source: COMFYUI_SOURCE=/path/to/a/git/directory/of/ComfyUI scripts/setup_host.sh"
)


TEST_PACK_NAME = "free_guidance_test_nodes"


def link_custom_nodes(base_dir: Path) -> None:
    """Put the pack and the test-only nodes into ``base_dir/custom_nodes`` (as links, the way users install)."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_NAME, PACK_DIR), (TEST_PACK_NAME, PACK_DIR / "tests" / "test_pack")):
        link = custom_nodes / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


class HostMissing(RuntimeError):
    pass


def comfyui_dir() -> Path:
    """The pinned ComfyUI checkout; a clear error (never a skip) if it is not there."""
    explicit = os.environ.get("FREE_GUIDANCE_COMFYUI")
    if explicit:
        path = Path(explicit)
    else:
        cache = os.environ.get("FREE_GUIDANCE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-free-guidance"
        )
        path = Path(cache) / "comfyui"
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise HostMissing(f"No ComfyUI checkout at {path}. {SETUP_HINT}")
    return path


@dataclass
class Host:
    """The initialised in-process host."""

    root: Path
    base_dir: Path
    pack: object  # the pack's package module, as ComfyUI loaded it
    failed_builtin_imports: list

    @property
    def nodes(self):
        import nodes

        return nodes

    def models_dir(self, kind: str) -> Path:
        path = self.base_dir / "models" / kind
        path.mkdir(parents=True, exist_ok=True)
        return path


_HOST: Host | None = None


class _StubServer:
    """What PromptExecutor and the progress handlers touch when there is no HTTP server."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, *args, **kwargs):
        pass


def ensure_host() -> None:
    """Make ComfyUI importable: inside a running ComfyUI (the server's test pack) there is nothing to do."""
    if "comfy.model_management" not in sys.modules:
        init_host()


def init_host() -> Host:
    """Import ComfyUI the way main.py does (CPU, a private base directory) and load the pack into it."""
    global _HOST
    if _HOST is not None:
        return _HOST
    root = comfyui_dir()
    base_dir = Path(tempfile.mkdtemp(prefix="free-guidance-host-"))
    link_custom_nodes(base_dir)

    sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (argument parsing stays off: cli_args parses an empty list)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base_dir)
    args.disable_api_nodes = True
    if os.environ.get("FREE_GUIDANCE_SDPA"):
        args.use_pytorch_cross_attention = True
    # Before `nodes`: nodes.py puts comfy/ first on sys.path, after which `utils` means comfy/utils.py.
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401

    import nodes

    failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
    module_path = str(base_dir / "custom_nodes" / PACK_NAME)
    builtin_names = set(nodes.NODE_CLASS_MAPPINGS)
    loaded = asyncio.run(nodes.load_custom_node(module_path, builtin_names))
    if not loaded:
        raise RuntimeError(f"ComfyUI failed to import the pack from {PACK_DIR}; see the log above")
    pack = sys.modules[module_path.replace(".", "_x_")]
    test_pack_path = str(base_dir / "custom_nodes" / TEST_PACK_NAME)
    if not asyncio.run(nodes.load_custom_node(test_pack_path, builtin_names)):
        raise RuntimeError("ComfyUI failed to import the test nodes (tests/test_pack)")
    _HOST = Host(root=root, base_dir=base_dir, pack=pack, failed_builtin_imports=list(failed))
    return _HOST


@dataclass
class PromptResult:
    prompt_id: str
    success: bool
    outputs: dict  # node id -> ui dict
    messages: list
    executor: object


def validate(prompt: dict):
    """ComfyUI's own validation: (ok, error, outputs, node_errors)."""
    import execution

    init_host()
    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run_prompt(prompt: dict, *, expect_success: bool = True) -> PromptResult:
    """Validate and execute an API-format prompt in process, with a fresh executor (no cache between calls)."""
    import execution

    init_host()
    prompt_id = str(uuid.uuid4())
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok:
        raise AssertionError(f"prompt failed validation: {error} {node_errors}")
    server = _StubServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, prompt_id, {"client_id": None}, outputs)
    result = PromptResult(
        prompt_id=prompt_id,
        success=executor.success,
        outputs=executor.history_result.get("outputs", {}),
        messages=executor.status_messages,
        executor=executor,
    )
    if expect_success and not result.success:
        raise AssertionError(f"prompt failed: {executor.status_messages}")
    return result
