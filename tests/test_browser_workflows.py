"""The shipped UI workflows in the real ComfyUI frontend (comfyui-frontend-package 1.32.9) in headless Chromium.

Each ``workflows/<name>.json`` loads in the frontend, converts with ``app.graphToPrompt()`` to exactly its API twin
``workflows/api/<name>.json`` (the file the server tests run), and runs from the UI as a user's Run click would;
screenshots of the loaded and of the finished graph are kept under ``output/test-artifacts/browser/``
(``$MMI_TEST_ARTIFACTS``). Skipped, with the reason printed, only where Chromium, its driver or selenium is missing.
"""

from __future__ import annotations

import json

import pytest

from comfyui_harness import (
    WORKFLOW_NAMES,
    WORKFLOWS,
    Browser,
    ComfyUIServer,
    artifacts_dir,
    browser_unavailable,
    history_error,
    new_history_entry,
    server_with_tiny_model,
    workflow_model,
)
from helpers_checkpoint import converted_tiny_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def server(converted_tiny_checkpoint) -> ComfyUIServer:  # noqa: F811
    return server_with_tiny_model(converted_tiny_checkpoint)


@pytest.fixture(scope="module")
def browser(server):
    reason = browser_unavailable()
    if reason is not None:
        print(f"\nbrowser tests skipped: {reason}")
        pytest.skip(reason)
    browser = Browser(server)
    yield browser
    browser.close()


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_converts_to_its_api_twin_and_runs_from_the_ui(server, browser, name) -> None:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    shots = artifacts_dir() / "browser"
    browser.load_ui(ui, f"{name}.json")
    browser.fit_view()
    browser.screenshot(shots / f"{name}-loaded.png")
    assert browser.graph_to_prompt() == api

    browser.set_widget("MMI_LoadModel", "model", workflow_model())
    known = set(server.get("/history"))
    browser.queue()
    entry = new_history_entry(server, known)
    assert entry["status"]["status_str"] == "success", history_error(entry) or entry["status"]
    output_nodes = {k for k, v in api.items() if v["class_type"] in ("PreviewAny", "SaveImage", "MMI_SaveInterleaved")}
    assert set(entry["outputs"]) == output_nodes
    shown = browser.node_outputs(output_nodes)  # what the user sees on the output nodes
    assert shown == {k: {key: entry["outputs"][k][key] for key in shown.get(k, {})} for k in output_nodes}
    browser.fit_view()
    assert browser.screenshot(shots / f"{name}-done.png").stat().st_size > 0
    assert browser.console_errors() == []
