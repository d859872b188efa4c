"""The real ComfyUI editor (the frontend the server serves: the pinned package or the newest) in headless Chromium.

Driven by Playwright with Debian's ``chromium`` (``/usr/bin/chromium``; never ``playwright install``), launched
with the flags for a closed network. See ../../../shared/docs/frontend-browser.md for what works at 1.27.10.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("FREE_GUIDANCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Settings a fresh user needs, or the 1.27.10 editor shows the tutorial / fails to boot.
EDITOR_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
    "Comfy.Minimap.Visible": False,
}
# Console errors expected on a closed network.
EXPECTED_CONSOLE_NOISE = (
    "user.css",
    "comfy.templates.json",
    "api.comfy.org",
    "ERR_NAME_NOT_RESOLVED",
    "favicon",
    # the newest frontend asks for endpoints the pinned server does not have (job list, global subgraphs)
    "/api/jobs",
    "Jobs API",
    "Failed to fetch jobs",
    "global_subgraphs",
)
SETUP_HINT = (
    "The browser tests need Debian's chromium (apt-get install -y chromium) and the playwright Python package "
    "(pip install playwright, in tests/requirements.txt); scripts/test.sh installs both."
)


def seed_settings(base_dir: Path, extra: dict | None = None) -> None:
    """Write the editor settings (and ``extra`` ones) into a server base directory (before the server starts)."""
    path = base_dir / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**EDITOR_SETTINGS, **(extra or {})}, indent=1))
    for folder in ("workflows", "subgraphs"):  # the editor lists them on start (a 404 otherwise)
        (path.parent / folder).mkdir(exist_ok=True)


_WATCH_JS = """
() => {
  if (window.__fgWatch) return;
  window.__fgWatch = {missing: null, configured: 0};
  window.app.registerExtension({
    name: "FreeGuidanceTest.Watch",
    afterConfigureGraph(missing) {
      window.__fgWatch.missing = (missing || []).map((m) => (typeof m === "string" ? m : m?.type ?? String(m)));
      window.__fgWatch.configured += 1;
    },
  });
}
"""


# Where each frontend tells the user about missing node types.
MISSING_NODE_UI = ".p-dialog:has-text('Missing'), [data-testid='error-overlay']:has-text('Missing node')"


class Editor:
    """``with Editor(server_url) as editor: editor.load(workflow, name)``."""

    def __init__(self, url: str, artifacts: Path | None = None, timeout_ms: int = 60000, frontend=None):
        from .frontends import PINNED_VERSION, Frontend

        self.frontend = frontend or Frontend(PINNED_VERSION)  # what the server serves (checked on start)
        self.url = url
        self.artifacts = Path(artifacts or tempfile.mkdtemp(prefix="free-guidance-browser-"))
        self.timeout_ms = timeout_ms
        self.console_errors: list[str] = []

    def __enter__(self) -> Editor:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as error:
            raise RuntimeError(SETUP_HINT) from error
        if not Path(CHROMIUM).exists():
            raise RuntimeError(f"no browser at {CHROMIUM}. {SETUP_HINT}")
        self._profile = tempfile.mkdtemp(prefix="free-guidance-chromium-")
        self._playwright = sync_playwright().start()
        self.context = self._playwright.chromium.launch_persistent_context(
            self._profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.set_default_timeout(self.timeout_ms)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.console_errors.append(f"pageerror: {error}"))
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app?.graph?.nodes?.length > 0", timeout=self.timeout_ms)
        self.page.evaluate(_WATCH_JS)
        version = self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        vue = self.page.evaluate("() => !!app.extensionManager?.setting?.get('Comfy.VueNodes.Enabled')")
        if version != self.frontend.version or vue != self.frontend.vue_nodes:
            self.__exit__(None, None, None)
            raise RuntimeError(
                f"the page runs frontend {version} (Nodes 2.0: {vue}), expected {self.frontend.id}"
            )
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.context.close()
        finally:
            self._playwright.stop()
            shutil.rmtree(self._profile, ignore_errors=True)

    def _on_console(self, message) -> None:
        if message.type != "error":
            return
        text = f"{message.text} @ {message.location.get('url', '') if message.location else ''}"
        if any(noise in text for noise in EXPECTED_CONSOLE_NOISE):
            return
        self.console_errors.append(text)

    def unexpected_console_errors(self) -> list[str]:
        return list(self.console_errors)

    # -- workflows

    def load(self, workflow: dict, name: str) -> dict:
        """Load a UI workflow like a user opening a file; returns what the editor reported."""
        before = self.page.evaluate("() => window.__fgWatch.configured")
        self.page.evaluate(
            "async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
            [workflow, name],
        )
        self.page.wait_for_function(f"() => window.__fgWatch.configured > {before}")
        time.sleep(0.3)  # dialogs, cards and toasts open asynchronously
        dialogs = self.page.locator(".p-dialog").all_inner_texts()
        toasts = self.page.locator(".p-toast-message").all_inner_texts()
        # what the user is shown about missing nodes: a dialog (1.27) or "Missing node: T" cards in the
        # error overlay (the newest)
        shown = self.page.locator(MISSING_NODE_UI).all_inner_texts()
        report = {
            "missing": self.page.evaluate("() => window.__fgWatch.missing"),
            "missing_shown": [t for t in shown if t.strip()],
            "dialogs": [d for d in dialogs if d.strip()],
            "toasts": [t for t in toasts if t.strip()],
            "node_count": self.page.evaluate("() => window.app.graph.nodes.length"),
            "node_types": self.page.evaluate("() => window.app.graph.nodes.map((n) => n.type)"),
        }
        if report["dialogs"]:
            self.page.keyboard.press("Escape")
            self.page.wait_for_function("() => document.querySelectorAll('.p-dialog').length === 0")
        self._dismiss_toasts()
        return report

    def _dismiss_toasts(self) -> None:
        self.page.evaluate(
            "() => document.querySelectorAll('.p-toast-close-button').forEach((b) => b.click())"
        )

    def graph_to_prompt(self) -> dict:
        """The frontend's own conversion of the loaded graph: {workflow, output}."""
        return self.page.evaluate(
            "async () => { const r = await window.app.graphToPrompt(); return JSON.parse(JSON.stringify(r)); }"
        )

    def screenshot(self, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path
