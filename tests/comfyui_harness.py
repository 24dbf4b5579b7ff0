"""A real headless ComfyUI server for the integration tests, and a small client for it.

The ComfyUI tree comes from ``scripts/setup_comfyui.sh`` (ComfyUI 0.3.75 from a registry wheel, cached outside the
repository; ``$MMI_COMFYUI_DIR`` points at another tree). Each server gets a fresh base folder::

    base/custom_nodes/comfy_mm_interleaved -> the repository root (symlink: the pack as a user would clone it)
    base/models/mm_interleaved/<model>     model folders offered by the loader node
    base/{input,output,temp,user}/         ComfyUI's own folders
    base/extra_model_paths.yaml            a second models root (a user's extra paths must be honoured too)
    base/server.log                        everything the server printed

Only this pack is loaded (``--disable-all-custom-nodes --whitelist-custom-nodes``), no API nodes, no database
file, one torch thread. Use it through ``shared_server()``: one server per test session, however many test modules
ask for it (a plain session fixture imported into two modules would start two).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = REPO_ROOT / "comfy_mm_interleaved" / "embedded"
TINY_MODEL = "tiny"
WORKFLOWS = REPO_ROOT / "workflows"
WORKFLOW_NAMES = ("captioning", "visual_question_answering", "text_to_image", "story_continuation", "interleaved_story")
PACK_NAME = "comfy_mm_interleaved"
NODE_IDS = frozenset(
    {
        "MMI_LoadModel",
        "MMI_EncodeImages",
        "MMI_StartContext",
        "MMI_LoadInterleaved",
        "MMI_AppendText",
        "MMI_AppendImage",
        "MMI_ContextToText",
        "MMI_GenerateText",
        "MMI_GenerateImage",
        "MMI_GenerateInterleaved",
        "MMI_SaveInterleaved",
        "MMI_ShapeStoriesImage",
    }
)
MODELS_FOLDER = "mm_interleaved"
START_TIMEOUT_S = 120.0


class ComfyUIError(RuntimeError):
    """The server did not start, died, or answered something unexpected (the message carries the log tail)."""


def comfyui_dir() -> Path:
    """The ComfyUI tree: ``$MMI_COMFYUI_DIR``, else whatever ``scripts/setup_comfyui.sh`` prepares (idempotent)."""
    env = os.environ.get("MMI_COMFYUI_DIR")
    if env:
        path = Path(env)
    else:
        result = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "setup_comfyui.sh")], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            raise ComfyUIError(f"scripts/setup_comfyui.sh failed:\n{result.stderr[-3000:]}")
        path = Path(result.stdout.strip().splitlines()[-1])
    if not (path / "main.py").is_file():
        raise ComfyUIError(f"{path} is not a ComfyUI tree (no main.py); unset MMI_COMFYUI_DIR or fix it")
    return path


def embedded_model_present() -> bool:
    """Whether the pack ships its embedded ShapeStories model (until then workflows run on the tiny model)."""
    return (EMBEDDED_MODEL / "config.json").is_file()


def workflow_model() -> str:
    """The model the example workflows run on in tests: the embedded one once it ships, else the tiny one."""
    return "embedded" if embedded_model_present() else TINY_MODEL


def api_workflow(name: str, model: str | None = None) -> dict[str, Any]:
    """``workflows/api/<name>.json`` with every loader pointed at ``model`` (default :func:`workflow_model`)."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    for node in prompt.values():
        if node["class_type"] == "MMI_LoadModel":
            node["inputs"]["model"] = model or workflow_model()
    return prompt


def install_tiny_model(converted: Path, models_root: Path, name: str = TINY_MODEL) -> Path:
    """Copy a converted tiny checkpoint (``helpers_checkpoint.convert_tiny_checkpoint``) into ``models_root/name``
    with a word-level ShapeStories tokenizer in ``tokenizer/``: a model folder as a user would install one."""
    from comfy_mm_interleaved.checkpoint import read_config
    from comfy_mm_interleaved.shapestories import WORDS
    from comfy_mm_interleaved.tokenizer import build_word_tokenizer

    folder = models_root / name
    if not (folder / "tokenizer").is_dir():
        shutil.copytree(converted, folder, dirs_exist_ok=True)
        config, _ = read_config(folder)
        tokenizer = build_word_tokenizer([*WORDS, ".", "?"], config.special_tokens, config.orig_vocab_size)
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder


def artifacts_dir() -> Path:
    """Where tests keep artifacts (screenshots): ``$MMI_TEST_ARTIFACTS`` or ``output/test-artifacts``."""
    return Path(os.environ.get("MMI_TEST_ARTIFACTS", REPO_ROOT / "output" / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EventListener:
    """Collects every websocket message of one client id in a background thread (aiohttp, as ComfyUI itself uses)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.binary: list[bytes] = []  # binary frames (sampler previews), in arrival order
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self._thread.start()
        if not self._connected.wait(30):
            raise ComfyUIError(f"websocket {url} did not connect")

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, heartbeat=20) as ws:
            self._connected.set()
            while not self._stop.is_set():
                try:
                    message = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    with self._lock:
                        self.events.append(json.loads(message.data))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    with self._lock:
                        self.binary.append(bytes(message.data))
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def binary_frames(self) -> list[bytes]:
        with self._lock:
            return list(self.binary)

    def of_prompt(self, prompt_id: str) -> list[dict[str, Any]]:
        """Events whose data names ``prompt_id`` (progress, executing, executed, errors ...), in arrival order."""
        with self._lock:
            events = list(self.events)
        return [e for e in events if isinstance(e.get("data"), dict) and e["data"].get("prompt_id") == prompt_id]

    def wait_for(self, prompt_id: str, event_type: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.of_prompt(prompt_id) if e["type"] == event_type]
            if found:
                return found[0]
            time.sleep(0.02)
        raise ComfyUIError(f"no {event_type!r} event for prompt {prompt_id} within {timeout:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class ComfyUIServer:
    """One ComfyUI subprocess on a free local port, with its own base folder (see the module docstring)."""

    def __init__(self, base: Path, comfyui: Path | None = None, output: Path | None = None) -> None:
        self.comfyui = comfyui or comfyui_dir()
        self.base = base
        self.models = base / "models" / MODELS_FOLDER
        self.extra_models = base / "extra_models" / MODELS_FOLDER
        self.output = (output or base / "output").resolve()
        self.input = base / "input"
        self.log_path = base / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.listener: EventListener | None = None

    # --------------------------------------------------------------------------------------------------- lifecycle

    def _prepare_base(self) -> None:
        for folder in (self.base / "custom_nodes", self.input, self.output, self.base / "temp", self.base / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        self.models.mkdir(parents=True, exist_ok=True)
        self.extra_models.mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        (self.base / "extra_model_paths.yaml").write_text(
            f"mmi_tests:\n    base_path: {self.base / 'extra_models'}\n    {MODELS_FOLDER}: {MODELS_FOLDER}\n",
            encoding="utf-8",
        )

    def start(self) -> ComfyUIServer:
        self._prepare_base()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MMI_NUM_THREADS="1")
        command = [
            sys.executable,
            str(self.comfyui / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--output-directory",
            str(self.output),
            "--input-directory",
            str(self.input),
            "--temp-directory",
            str(self.base / "temp"),
            "--user-directory",
            str(self.base / "user"),
            "--extra-model-paths-config",
            str(self.base / "extra_model_paths.yaml"),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--disable-all-custom-nodes",
            "--whitelist-custom-nodes",
            PACK_NAME,
            "--dont-print-server",
            "--log-stdout",
            "--preview-method",  # as many users run it: image steps send previews (tested, and exercised throughout)
            "auto",
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self._wait_until_serving()
        self.listener = EventListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, ComfyUIError):
                time.sleep(0.25)
        raise ComfyUIError(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> str:
        """Stop the server (SIGTERM, then SIGKILL) and return its whole log."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        return self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace", encoding="utf-8") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    # -------------------------------------------------------------------------------------------------------- HTTP

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """``(status, parsed JSON or text)``; HTTP error statuses are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyUIError(f"GET {path} answered {status}: {body}")
        return body

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info")

    def queue(self, prompt: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /prompt: ``(status, {"prompt_id", "node_errors"} or {"error", "node_errors"})``."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """The history entry of ``prompt_id`` once it completed or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
                return entry
            if not self.alive():
                raise ComfyUIError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise ComfyUIError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], timeout: float = 120.0) -> tuple[str, dict[str, Any]]:
        """Queue ``prompt``, require that it validated completely, wait: ``(prompt_id, history entry)``."""
        status, body = self.queue(prompt)
        if status != 200 or body.get("node_errors"):
            raise ComfyUIError(f"/prompt answered {status}: {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"], self.wait(body["prompt_id"], timeout)

    def interrupt(self) -> None:
        status, body = self.request("POST", "/interrupt", {})
        if status != 200:
            raise ComfyUIError(f"/interrupt answered {status}: {body}")

    def output_file(self, item: dict[str, str]) -> bytes:
        """The bytes of one image entry of a history output (``filename``, ``subfolder``, ``type``)."""
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
        return self.get_bytes(f"/view?{query}")


def history_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message data of a history entry, or None."""
    for name, data in entry["status"].get("messages", []):
        if name == "execution_error":
            return data
    return None


_SHARED: dict[str, ComfyUIServer] = {}


def shared_server() -> ComfyUIServer:
    """The one server of this test session (started on first use, stopped at interpreter exit)."""
    server = _SHARED.get("server")
    if server is not None and server.alive():
        return server
    if server is not None:
        raise ComfyUIError(f"the shared ComfyUI server died earlier:\n{server.log_tail()}")
    base = Path(tempfile.mkdtemp(prefix="mmi_comfyui_"))
    server = ComfyUIServer(base)
    _SHARED["server"] = server

    def stop_and_clean() -> None:
        server.stop()
        if not os.environ.get("MMI_KEEP_COMFYUI_BASE"):
            shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop_and_clean)
    return server.start()


def server_with_tiny_model(converted_tiny: Path) -> ComfyUIServer:
    """The shared server with the tiny model under its extra model path (``helpers_checkpoint`` conversion)."""
    server = shared_server()
    install_tiny_model(converted_tiny, server.extra_models)
    return server


def new_history_entry(server: ComfyUIServer, known: set[str], timeout: float = 120.0) -> dict[str, Any]:
    """The first finished history entry whose id is not in ``known`` (a prompt queued by someone else: the UI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [k for k in server.get("/history") if k not in known]
        if fresh:
            return server.wait(fresh[0], max(1.0, deadline - time.monotonic()))
        time.sleep(0.1)
    raise ComfyUIError(f"no new prompt appeared in /history within {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# The real frontend in headless Chromium (Debian's chromium + chromium-driver, selenium from PyPI)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
# Console errors that are no fault of a workflow: missing optional user files, and the frontend's calls to
# api.comfy.org, which --disable-api-nodes blocks by Content Security Policy.
BENIGN_CONSOLE = ("user.css", "favicon", "userdata", "404 (Not Found)", "Connecting to 'https://api.comfy.org/")


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed in this Python environment (pip install selenium)"
    return None


class Browser:
    """The ComfyUI frontend of ``server`` in headless Chromium, driven through ``window.app``."""

    def __init__(self, server: ComfyUIServer, node_type: str = "MMI_LoadModel", timeout: float = 90.0) -> None:
        os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver: use Debian's
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        server.request("POST", "/settings/Comfy.TutorialCompleted", True)  # no first-run dialog
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        self.profile = tempfile.mkdtemp(prefix="mmi_chromium_")
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        self.driver.set_script_timeout(timeout)
        self.server = server
        self.driver.get(server.url + "/")
        self.wait_js(f"return !!(window.app && window.LiteGraph && LiteGraph.registered_node_types[{node_type!r}])")
        # the frontend's own start-up errors (1.32.9 logs a TypeError in GraphView's load), kept apart from what
        # the tests do afterwards
        self.startup_console = self.console_errors()

    def wait_js(self, condition: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.driver.execute_script(condition):
                return
            time.sleep(0.25)
        raise ComfyUIError(f"the frontend never satisfied {condition!r} within {timeout:.0f} s")

    def run_async(self, body: str, *args: Any) -> Any:
        """Run ``body`` (an async JS function body using ``args``) and return its result (errors raise)."""
        script = (
            "const done = arguments[arguments.length - 1];"
            f"(async (args) => {{ {body} }})(Array.from(arguments).slice(0, -1))"
            ".then(value => done({value}), error => done({error: String(error && error.stack || error)}));"
        )
        result = self.driver.execute_async_script(script, *args)
        if "error" in result:
            raise ComfyUIError(f"frontend script failed: {result['error']}")
        return result.get("value")

    def load_ui(self, workflow: dict[str, Any], name: str) -> None:
        """Open a UI-format workflow as a tab named ``name`` (as opening the file or the template does)."""
        self.run_async("await app.loadGraphData(args[0], true, true, args[1]);", workflow, name)

    def fit_view(self) -> None:
        self.run_async("await app.extensionManager.command.execute('Comfy.Canvas.FitView');")

    def node_outputs(self, node_ids: set[str], timeout: float = 30.0) -> dict[str, Any]:
        """What the frontend received for ``node_ids`` from the last run (images, text), once all arrived."""
        script = "return JSON.parse(JSON.stringify(app.nodeOutputs || {}));"
        deadline = time.monotonic() + timeout
        while True:
            outputs = self.driver.execute_script(script)
            if node_ids <= set(outputs) or time.monotonic() > deadline:
                return {k: v for k, v in outputs.items() if k in node_ids}
            time.sleep(0.1)

    def ui_from_api(self, prompt: dict[str, Any], name: str) -> dict[str, Any]:
        """The frontend's own UI-format graph of an API prompt (seed controls set to 'fixed')."""
        return self.run_async(
            "await app.loadApiJson(args[0], args[1]);"
            "for (const node of app.graph.nodes) for (const w of node.widgets || [])"
            "  if (w.name === 'control_after_generate') w.value = 'fixed';"
            "return JSON.parse(JSON.stringify(app.graph.serialize()));",  # as a saved file: no undefined fields
            prompt,
            name,
        )

    def graph_to_prompt(self) -> dict[str, Any]:
        return self.run_async("return (await app.graphToPrompt()).output;")

    def set_widget(self, node_type: str, widget: str, value: Any) -> None:
        self.run_async(
            "for (const node of app.graph.nodes) if (node.type === args[0])"
            "  node.widgets.find(w => w.name === args[1]).value = args[2];",
            node_type,
            widget,
            value,
        )

    def queue(self) -> None:
        """Queue the loaded graph as the Run button does."""
        self.run_async("await app.queuePrompt(0, 1);")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        """SEVERE console messages since the last call, benign ones left out."""
        severe = [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        return [m for m in severe if not any(b in m for b in BENIGN_CONSOLE)]

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def write_ui_workflows() -> None:
    """Regenerate ``workflows/<name>.json`` from the API twins through the real frontend (its own layout)."""
    server = shared_server()
    browser = Browser(server)
    try:
        for name in WORKFLOW_NAMES:
            prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
            ui = browser.ui_from_api(prompt, f"{name}.json")
            ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_NAME}/workflows/{name}"))  # stable per workflow
            (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {WORKFLOWS / f'{name}.json'}")
    finally:
        browser.close()


def saved_files(server: ComfyUIServer, entry: dict[str, Any]) -> list[Path]:
    """Every file the output nodes of a finished prompt wrote into the output folder (images, HTML pages)."""
    files = []
    for output in entry["outputs"].values():
        images = [i for i in output.get("images", []) if i["type"] == "output"]
        files += [server.output / i["subfolder"] / i["filename"] for i in images]
        files += [server.output / page for page in output.get("html", [])]
    return list(dict.fromkeys(files))


def text_outputs(prompt: dict, entry: dict) -> list[str]:
    """``<node title>: <text>`` of every node that showed text (e.g. the core *Preview as Text*), in node order."""
    lines = []
    for node, result in sorted(entry["outputs"].items(), key=lambda item: int(item[0])):
        title = prompt.get(node, {}).get("_meta", {}).get("title", node)
        if (
            isinstance(result, dict)
            and "text" in result
            and node in prompt
            and prompt[node]["class_type"] == "PreviewAny"
        ):
            lines += [f"{title}: {text}" for text in result["text"]]
    return lines


def run_workflow(name: str, output: Path, tiny_from: Path | None = None) -> tuple[list[Path], list[str]]:
    """Run ``workflows/api/<name>.json`` in a fresh headless ComfyUI whose output folder is ``output``: the saved
    files and the texts its preview nodes showed.

    The embedded model by default; ``tiny_from`` (a converted tiny checkpoint folder) runs the tiny model instead.
    """
    base = Path(tempfile.mkdtemp(prefix="mmi_comfyui_"))
    server = ComfyUIServer(base, output=output)
    try:
        server.start()
        model = None
        if tiny_from is not None:
            install_tiny_model(tiny_from, server.extra_models)
            model = TINY_MODEL
        prompt = api_workflow(name, model)
        prompt_id, entry = server.run(prompt, timeout=3600)
        if entry["status"]["status_str"] != "success":
            raise ComfyUIError(f"workflow {name} failed: {history_error(entry)}\n{server.log_tail()}")
        return saved_files(server, entry), text_outputs(prompt, entry)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.comfyui_harness", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ui-workflows", help="regenerate workflows/<name>.json from the API twins in the frontend")
    run = commands.add_parser("run", help="run one example workflow in a headless ComfyUI and list its files")
    run.add_argument("workflow", choices=WORKFLOW_NAMES)
    run.add_argument("--output", type=Path, default=REPO_ROOT / "output" / "comfyui", help="ComfyUI output folder")
    run.add_argument("--tiny-from", type=Path, help="run the tiny model converted into this folder instead")
    args = parser.parse_args(argv)
    if args.command == "ui-workflows":
        write_ui_workflows()
        return
    files, texts = run_workflow(args.workflow, args.output, args.tiny_from)
    for line in [*texts, *map(str, files)]:
        print(line)


if __name__ == "__main__":  # from the repository root: .venv/bin/python -m tests.comfyui_harness --help
    main()
