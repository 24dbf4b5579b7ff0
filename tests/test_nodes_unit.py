"""The pack's V3 nodes in-process with the real ComfyUI 0.3.75 modules: schemas, ``execute``, progress, interrupt,
model management, the model folder, bad inputs.

ComfyUI's folder goes on ``sys.path`` inside the module fixture only (and ``comfy.cli_args.args.cpu`` is set before
``comfy.model_management`` is imported); ComfyUI's own top-level ``nodes`` module is never imported. The pack is
loaded from the repository root exactly as ComfyUI loads a custom-node folder. Models: the golden tiny release
converted into a model folder with a word-level tokenizer (``comfyui_harness.install_tiny_model``).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import importlib
import importlib.util
import json
import os
import re
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, TextOptions
from comfy_mm_interleaved.inference.document import ImagePart
from comfy_mm_interleaved.shapestories import Attributes, caption_sentence, read_image, render_array
from comfy_mm_interleaved.shapestories.rules import RADIUS_RANGES
from comfyui_harness import NODE_IDS, REPO_ROOT, TINY_MODEL, comfyui_dir, install_tiny_model
from helpers_checkpoint import converted_tiny_checkpoint  # noqa: F401

PACK_MODULE = "mmi_pack_under_test"


def load_pack() -> ModuleType:
    """Import the repository root as ComfyUI imports a custom-node folder (a package under a path-derived name)."""
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, converted_tiny_checkpoint):  # noqa: F811
    root = str(comfyui_dir())
    sys.path.insert(0, root)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
        import folder_paths

        pack = load_pack()
        extension = asyncio.run(pack.comfy_entrypoint())
        node_list = asyncio.run(extension.get_node_list())
        models = tmp_path_factory.mktemp("models") / "mm_interleaved"
        models.mkdir()
        folder_paths.add_model_folder_path("mm_interleaved", str(models))
        install_tiny_model(converted_tiny_checkpoint, models)
        output = tmp_path_factory.mktemp("output")
        folder_paths.set_output_directory(str(output))
        yield SimpleNamespace(
            mm=comfy.model_management,
            utils=comfy.utils,
            patcher=comfy.model_patcher,
            folder_paths=folder_paths,
            nodes={cls.GET_SCHEMA().node_id: cls for cls in node_list},
            module=lambda name: importlib.import_module(f"{PACK_MODULE}.nodes.{name}"),
            models=models,
            output=output,
        )
    finally:
        sys.path.remove(root)
        for name in [m for m in sys.modules if m == PACK_MODULE or m.startswith(PACK_MODULE + ".")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def model(comfyui):
    return comfyui.module("loader").load_model(TINY_MODEL, "auto", "auto")


@pytest.fixture
def progress_events(comfyui):
    """Every ComfyUI progress-bar update ``(value, total)`` during the test."""
    events: list[tuple[int, int]] = []
    comfyui.utils.set_progress_bar_global_hook(lambda value, total, *_, **__: events.append((value, total)))
    yield events
    comfyui.utils.set_progress_bar_global_hook(None)


def red_square(size: int = 48) -> torch.Tensor:
    image = torch.zeros(1, size, size, 3)
    image[:, size // 4 : size // 2, size // 4 : size // 2, 0] = 1.0
    return image


def run(node: type, **inputs):
    return node.execute(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# schemas


def test_every_node_has_prefixed_id_category_and_tooltips(comfyui) -> None:
    assert set(comfyui.nodes) == NODE_IDS
    for node_id, cls in comfyui.nodes.items():
        schema = cls.GET_SCHEMA()
        assert schema.category.split("/")[0] == "MM-Interleaved", node_id
        assert schema.display_name and schema.description, node_id
        for item in schema.inputs:
            assert item.tooltip, f"{node_id} input {item.id} has no tooltip"
        for item in schema.outputs:
            assert item.tooltip, f"{node_id} output {item.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == node_id and info["category"] == schema.category


def test_custom_socket_types_connect_between_nodes(comfyui) -> None:
    def types(node_id: str, direction: str) -> dict[str, str]:
        info = comfyui.nodes[node_id].GET_NODE_INFO_V1()
        if direction == "out":
            return dict(zip(info["output_name"], info["output"]))
        return {k: v[0] for k, v in {**info["input"]["required"], **info["input"].get("optional", {})}.items()}

    assert types("MMI_LoadModel", "out") == {"model": "MMI_MODEL"}
    assert types("MMI_EncodeImages", "out") == {"features": "MMI_IMAGE_FEATURES"}
    assert types("MMI_AppendImage", "in")["images"] == "IMAGE,MMI_IMAGE_FEATURES"
    assert types("MMI_GenerateText", "out") == {"text": "STRING", "context": "MMI_CONTEXT"}
    assert types("MMI_GenerateImage", "out") == {"images": "IMAGE", "context": "MMI_CONTEXT"}
    assert types("MMI_GenerateInterleaved", "out") == {"images": "IMAGE", "text": "STRING", "context": "MMI_CONTEXT"}
    assert types("MMI_GenerateImage", "in")["steps"] == "INT"
    assert comfyui.nodes["MMI_GenerateImage"].GET_NODE_INFO_V1()["input"]["required"]["steps"][1]["min"] == 1


# ----------------------------------------------------------------------------------------------------------------
# the model folder and the loader


def test_model_folder_lists_folders_with_config_and_index(comfyui, tmp_path) -> None:
    folder = comfyui.module("model_folder")
    extra = tmp_path / "extra"
    (extra / "group" / "nested").mkdir(parents=True)
    for name in ("config.json", "weights_index.json"):
        (extra / "group" / "nested" / name).write_text("{}", encoding="utf-8")
    (extra / "incomplete").mkdir()
    (extra / "incomplete" / "config.json").write_text("{}", encoding="utf-8")  # no weights index: not a model
    comfyui.folder_paths.add_model_folder_path("mm_interleaved", str(extra))
    try:
        names = folder.model_names()
        assert names[0] == "embedded"
        assert set(names[1:]) == {TINY_MODEL, "group/nested"}
        assert folder.model_path("group/nested") == extra / "group" / "nested"
        assert folder.model_path("embedded") is None
        with pytest.raises(FileNotFoundError, match="no MM-Interleaved model folder 'missing'"):
            folder.model_path("missing")
    finally:
        comfyui.folder_paths.folder_names_and_paths["mm_interleaved"][0].remove(str(extra))
        comfyui.folder_paths.filename_list_cache.pop("mm_interleaved", None)  # ComfyUI's listing cache
    assert comfyui.folder_paths.folder_names_and_paths["mm_interleaved"][1] == {".json"}
    options = comfyui.nodes["MMI_LoadModel"].GET_NODE_INFO_V1()["input"]["required"]["model"][1]["options"]
    assert options == ["embedded", TINY_MODEL]


def test_loader_shares_engines_and_hands_them_to_comfy_model_management(comfyui, model) -> None:
    loader = comfyui.module("loader")
    assert loader.load_model(TINY_MODEL, "float32", "auto") is model  # auto resolves to float32 on the CPU
    assert model.dtype == "float32"
    assert isinstance(model.patcher, comfyui.patcher.ModelPatcher)
    assert model.patcher.load_device == comfyui.mm.get_torch_device()
    assert model.patcher.model is model.engine.model
    engine = model.engine_ready()
    assert any(p is model.patcher for p in comfyui.mm.loaded_models())
    other = loader.load_model(TINY_MODEL, "bfloat16", "cpu")
    assert other is not model and other.patcher is None
    assert next(other.engine.model.mm_decoder.parameters()).dtype == torch.bfloat16
    key_count = len(loader._LOADED)
    del other
    gc.collect()
    assert len(loader._LOADED) == key_count - 1  # weak cache: freed with its last holder
    assert engine is model.engine


def test_loader_errors_are_clear(comfyui) -> None:
    loader = comfyui.module("loader")
    with pytest.raises(FileNotFoundError, match="no MM-Interleaved model folder"):
        loader.load_model("nope")
    with pytest.raises(ValueError, match="unknown device mode"):
        loader.load_model(TINY_MODEL, "auto", "gpu0")


def test_unloading_through_comfy_drops_the_engine_caches(comfyui, model) -> None:
    engine = model.engine_ready()
    doc = Interleaved([red_square()])
    engine.encode_images(doc.images)
    encoded = engine.stats.images_encoded
    engine.encode_images(doc.images)
    assert engine.stats.images_encoded == encoded  # cached
    comfyui.mm.unload_all_models()  # what /free and memory pressure do: ModelPatcher.detach
    engine = model.engine_ready()
    engine.encode_images(doc.images)
    assert engine.stats.images_encoded == encoded + 1


# ----------------------------------------------------------------------------------------------------------------
# context nodes


def test_context_nodes_build_immutable_documents(comfyui) -> None:
    nodes = comfyui.nodes
    start = run(nodes["MMI_StartContext"], text="  ")[0]
    assert len(start) == 0
    with_text = run(nodes["MMI_AppendText"], context=start, text="a small red circle at top left.")[0]
    batch = torch.cat([red_square(), torch.ones(1, 48, 48, 3)])
    with_images = run(nodes["MMI_AppendImage"], context=with_text, images=batch)[0]
    assert len(start) == 0 and len(with_text) == 1  # appending never changes the input
    readable = run(nodes["MMI_ContextToText"], context=with_images)[0]
    assert readable == "a small red circle at top left. <image 1> <image 2>"
    first = np.asarray(with_images.images[0])
    assert first.shape == (48, 48, 3) and first[20, 20].tolist() == [255, 0, 0] and first[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="the text is empty"):
        run(nodes["MMI_AppendText"], context=start, text=" ")


def test_append_image_alpha_becomes_white_and_wrong_size_is_refused(comfyui) -> None:
    append = comfyui.nodes["MMI_AppendImage"]
    mask = torch.zeros(1, 48, 48)
    mask[:, :, :24] = 1.0  # left half transparent
    doc = run(append, context=Interleaved(), images=red_square(), alpha=mask)[0]
    pixels = np.asarray(doc.images[0])
    assert pixels[30, 5].tolist() == [255, 255, 255] and pixels[30, 40].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"alpha mask has shape \(1, 32, 48\) but the image batch is 1 x 48 x 48"):
        run(append, context=Interleaved(), images=red_square(), alpha=torch.zeros(1, 32, 48))


def test_encode_images_then_append_encodes_each_image_once(comfyui, model) -> None:
    engine = model.engine_ready()
    image = red_square(40)
    before = engine.stats.images_encoded
    features = run(comfyui.nodes["MMI_EncodeImages"], model=model, images=torch.cat([image, image]))[0]
    assert len(features.images) == 2 and features.keys[0] == features.keys[1]
    doc = run(comfyui.nodes["MMI_AppendImage"], context=Interleaved(["look:"]), images=features)[0]
    doc = run(comfyui.nodes["MMI_AppendImage"], context=doc, images=image)[0]
    assert doc.to_readable_text() == "look: <image 1> <image 2> <image 3>"
    run(comfyui.nodes["MMI_GenerateText"], model=model, context=doc, **text_widgets(max_new_tokens=2))
    assert engine.stats.images_encoded == before + 1


# ----------------------------------------------------------------------------------------------------------------
# generation nodes


def text_widgets(**overrides) -> dict:
    values = dict(
        max_new_tokens=6,
        min_new_tokens=0,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        num_beams=1,
        seed=0,
        stop_on_image=True,
    )
    return values | overrides


def test_generate_text_is_the_engine_call_with_progress_per_token(comfyui, model, progress_events) -> None:
    doc = Interleaved([red_square(), "a small red"])
    widgets = text_widgets(do_sample=True, top_k=5, seed=3)
    text, extended = run(comfyui.nodes["MMI_GenerateText"], model=model, context=doc, **widgets)
    expected = model.engine_ready().generate_text(doc, TextOptions(**widgets))
    assert text == expected.text and extended.to_readable_text() == expected.document.to_readable_text()
    assert extended.segments[: len(doc)] == doc.segments
    text_steps = [e for e in progress_events if e[1] == widgets["max_new_tokens"]]
    assert len(text_steps) >= len(expected.token_ids) >= 1
    assert [v for v, _ in text_steps[: len(expected.token_ids)]] == list(range(1, len(expected.token_ids) + 1))


def test_interrupt_stops_generation_within_one_step_and_the_next_run_is_exact(comfyui, model) -> None:
    doc = Interleaved(["a small red circle at top left. it turns"])
    widgets = text_widgets(max_new_tokens=12, stop_on_image=False, min_new_tokens=12)
    steps: list[int] = []

    def hook(value, total, preview, node_id=None):
        steps.append(value)
        if len(steps) == 3:
            comfyui.mm.interrupt_current_processing(True)

    comfyui.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfyui.mm.InterruptProcessingException):
            run(comfyui.nodes["MMI_GenerateText"], model=model, context=doc, **widgets)
    finally:
        comfyui.utils.set_progress_bar_global_hook(None)
    assert steps == [1, 2, 3]  # the fourth token never ran
    assert not comfyui.mm.processing_interrupted()
    text, _ = run(comfyui.nodes["MMI_GenerateText"], model=model, context=doc, **widgets)
    assert text == model.engine_ready().generate_text(doc, TextOptions(**widgets)).text
    assert len(text.split()) == 12


def test_generate_image_outputs_comfy_images_and_extends_the_context(comfyui, model, progress_events) -> None:
    doc = Interleaved([red_square(), "it turns blue."])
    size = model.engine.config.image_decoder.image_size
    images, extended = run(
        comfyui.nodes["MMI_GenerateImage"],
        model=model,
        context=doc,
        steps=3,
        guidance=2.0,
        scheduler="ddim",
        seed=5,
        count=2,
    )
    assert images.shape == (2, size, size, 3) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    expected = model.engine_ready().generate_images(
        doc, ImageOptions(num_inference_steps=3, guidance_scale=2.0, scheduler="ddim", seed=5, num_images=2)
    )
    assert torch.equal(images, expected.tensors.permute(0, 2, 3, 1))
    assert extended.num_images == 2 and np.array_equal(np.asarray(extended.images[1]), np.asarray(expected.images[0]))
    assert [v for v, t in progress_events if t == 3] == [1, 2, 3]


def test_image_steps_send_previews_when_comfyui_shows_them(comfyui, model, monkeypatch) -> None:
    import comfy.cli_args

    received: list[tuple[int, int, object]] = []
    comfyui.utils.set_progress_bar_global_hook(
        lambda value, total, preview, **_: received.append((value, total, preview))
    )
    inputs = {"model": model, "context": Interleaved(["it turns blue."]), "steps": 4, "guidance": 2.0}
    inputs |= {"scheduler": "ddim", "seed": 3, "count": 1}
    try:
        run(comfyui.nodes["MMI_GenerateImage"], **inputs)  # ComfyUI's default: --preview-method none
        assert [p for v, t, p in received if t == 4] == [None] * 4
        received.clear()
        monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.Auto)
        monkeypatch.setattr(comfyui.module("progress"), "PREVIEW_INTERVAL_S", 0.0)  # every step
        monkeypatch.setattr(comfyui.module("progress"), "PREVIEW_COST_FACTOR", 0.0)
        images, _ = run(comfyui.nodes["MMI_GenerateImage"], **inputs)
        previews = [p for v, t, p in received if t == 4]
        assert len(previews) == 4 and all(p[0] == "JPEG" and p[2] == comfy.cli_args.args.preview_size for p in previews)
        received.clear()
        monkeypatch.setattr(comfyui.module("progress"), "PREVIEW_INTERVAL_S", 1e9)  # the first and the last only
        inputs["seed"] = 4  # not the cached result
        run(comfyui.nodes["MMI_GenerateImage"], **inputs)
        assert [v for v, t, p in received if t == 4 and p is not None] == [1, 4]
        received.clear()
        monkeypatch.setattr(comfy.cli_args.args, "preview_size", 0)  # ComfyUI's server fails on a 0-pixel preview
        inputs["seed"] = 5
        run(comfyui.nodes["MMI_GenerateImage"], **inputs)
        assert [p[2] for v, t, p in received if t == 4 and p is not None] == [None, None]
    finally:
        comfyui.utils.set_progress_bar_global_hook(None)
    last = np.asarray(previews[-1][1]).astype(np.float64) / 255
    assert last.shape == tuple(images.shape[1:]) and np.abs(last - images[0].numpy()).mean() < 0.05


def run_interleaved(comfyui, model, doc: Interleaved, max_segments: int, steps: int, widgets: dict) -> tuple:
    """*Generate interleaved (auto)* with an image asked for after every text, no guidance, seed 1: (images, text,
    context)."""
    node = comfyui.nodes["MMI_GenerateInterleaved"]
    outputs = run(
        node, model=model, context=doc, max_segments=max_segments, image_after_text=True, steps=steps, guidance=1.0,
        scheduler="ddpm", image_seed=1, **widgets,
    )  # fmt: skip
    return outputs[0], outputs[1], outputs[2]


def test_generate_interleaved_returns_new_images_text_and_context(comfyui, model) -> None:
    doc = Interleaved([red_square(), "a small red circle at top left."])
    size = model.engine.config.image_decoder.image_size
    widgets = text_widgets(max_new_tokens=4, min_new_tokens=4)  # the text can neither end nor ask for an image early
    images, text, extended = run_interleaved(comfyui, model, doc, max_segments=4, steps=2, widgets=widgets)
    new = extended.segments[len(doc) :]
    assert [type(s).__name__ for s in new] == ["TextPart", "ImagePart", "TextPart", "ImagePart"]
    assert images.shape == (2, size, size, 3)
    assert text.splitlines() == [s.text.strip() for s in new if not isinstance(s, ImagePart)]
    for k in (0, 1):  # the IMAGE output is the float image whose 8-bit rounding the context holds
        assert np.abs(images[k].numpy() * 255 - np.asarray(extended.images[k + 1])).max() <= 0.5 + 1e-4


def test_generation_nodes_refuse_an_empty_context_clearly(comfyui, model) -> None:
    with pytest.raises(ValueError, match="the document is empty"):
        run(comfyui.nodes["MMI_GenerateText"], model=model, context=Interleaved(), **text_widgets())
    with pytest.raises(ValueError, match="the document is empty"):
        run(
            comfyui.nodes["MMI_GenerateImage"],
            model=model,
            context=Interleaved(),
            steps=1,
            guidance=1.0,
            scheduler="ddpm",
            seed=0,
            count=1,
        )


# ----------------------------------------------------------------------------------------------------------------
# output and example-input nodes


def test_save_interleaved_writes_pngs_json_and_html(comfyui) -> None:
    doc = Interleaved([red_square(), "a small red circle <at> top left.", torch.ones(1, 16, 16, 3)])
    result = run(comfyui.nodes["MMI_SaveInterleaved"], context=doc, filename_prefix="stories/test")
    ui = result.ui
    folder = comfyui.output / "stories"
    assert [i["filename"] for i in ui["images"]] == ["test_00001_-00.png", "test_00001_-01.png"]
    assert {i["subfolder"] for i in ui["images"]} == {"stories"} and ui["html"] == ["stories/test_00001_.html"]
    page = (folder / "test_00001_.html").read_text(encoding="utf-8")
    assert (
        page.index('title="test_00001_-00.png"') < page.index("&lt;at&gt;") < page.index('title="test_00001_-01.png"')
    )
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)  # a standalone page: the PNGs inside it
    assert [base64.b64decode(b) for b in embedded] == [
        (folder / n).read_bytes() for n in ("test_00001_-00.png", "test_00001_-01.png")
    ]
    reloaded = Interleaved.from_json(folder / "test_00001_.json")
    assert reloaded.to_readable_text() == doc.to_readable_text()
    assert np.array_equal(np.asarray(reloaded.images[0]), np.asarray(doc.images[0]))
    assert json.loads((folder / "test_00001_.json").read_text(encoding="utf-8"))[1] == {
        "text": "a small red circle <at> top left."
    }
    second = run(comfyui.nodes["MMI_SaveInterleaved"], context=doc, filename_prefix="stories/test")
    assert second.ui["html"] == ["stories/test_00002_.html"]
    with pytest.raises(ValueError, match="the context is empty"):
        run(comfyui.nodes["MMI_SaveInterleaved"], context=Interleaved(), filename_prefix="x")


def test_load_interleaved_reads_saved_and_input_documents(comfyui, tmp_path) -> None:
    folder_paths = comfyui.folder_paths
    previous_input = folder_paths.get_input_directory()
    inputs = tmp_path / "input"
    (inputs / "pics").mkdir(parents=True)
    (inputs / "sub").mkdir()
    folder_paths.set_input_directory(str(inputs))
    try:
        node = comfyui.nodes["MMI_LoadInterleaved"]
        choices = comfyui.module("load_document").document_choices
        # a saved story that ends where the model asked for an image
        story = Interleaved([red_square(), "it grows.", torch.ones(1, 16, 16, 3)]).append_pending_image()
        run(comfyui.nodes["MMI_SaveInterleaved"], context=story, filename_prefix="loadtest/story")
        Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(inputs / "pics" / "grey.png")
        (inputs / "mine.json").write_text(
            json.dumps([{"image": "pics/grey.png"}, {"text": "a grey square."}]), encoding="utf-8"
        )
        lines = [json.dumps([{"text": "first document."}]), json.dumps({"segments": [{"text": "second."}]})]
        (inputs / "sub" / "many.jsonl").write_text("\n".join(lines), encoding="utf-8")
        (inputs / "notes.txt").write_text("not a document", encoding="utf-8")
        (comfyui.output / "loadtest" / "stray.json").write_text("[]", encoding="utf-8")  # no .html: not ours

        options = choices()  # the save node above reset the list's two-second cache
        assert options[:2] == ["mine.json", "sub/many.jsonl"]  # the input folder first, by relative path
        assert "loadtest/story_00001_.json [output]" in options and "loadtest/stray.json [output]" not in options
        assert node.GET_SCHEMA().inputs[0].options == options  # the list is read again for every /object_info

        loaded, text = run(node, document="loadtest/story_00001_.json [output]", index=0).args
        assert text == story.to_readable_text() == "<image 1> it grows. <image 2> <image 3: pending>"
        assert loaded.ends_with_pending_image
        assert np.array_equal(np.asarray(loaded.images[0]), np.asarray(story.images[0]))
        mine, text = run(node, document="mine.json", index=0).args
        assert text == "<image 1> a grey square." and np.asarray(mine.images[0]).tolist()[0][0] == [200, 200, 200]
        assert run(node, document="sub/many.jsonl", index=1).args[1] == "second."
        with pytest.raises(ValueError, match=r"holds 2 document\(s\), so index 2 does not exist; use 0 to 1"):
            run(node, document="sub/many.jsonl", index=2)

        assert node.validate_inputs(document="mine.json") is True
        assert f"'gone.json' not found in {inputs}" in node.validate_inputs(document="gone.json")
        assert f"not found in {comfyui.output}" in node.validate_inputs(document="gone.json [output]")
        assert "lies outside" in node.validate_inputs(document="../elsewhere.json")
        assert "only input-folder files and '[output]'" in node.validate_inputs(document="mine.json [temp]")
        assert "is not a .json or .jsonl file" in node.validate_inputs(document="pics/grey.png")
        for nothing in (None, ""):  # an empty dropdown (no document anywhere yet) sends nothing
            assert "no document chosen: put a .json or .jsonl" in node.validate_inputs(document=nothing)
        assert "no document chosen" in node.validate_inputs()

        # the node runs again when the file or one of its images changes
        before = node.fingerprint_inputs(document="mine.json", index=0)
        assert before == node.fingerprint_inputs(document="mine.json", index=0)
        Image.fromarray(np.full((20, 20, 3), 50, np.uint8)).save(inputs / "pics" / "grey.png")
        os.utime(inputs / "pics" / "grey.png", ns=(1, 1))
        after_image = node.fingerprint_inputs(document="mine.json", index=0)
        assert after_image != before
        (inputs / "mine.json").write_text(json.dumps([{"text": "edited."}]), encoding="utf-8")
        assert node.fingerprint_inputs(document="mine.json", index=0) not in (before, after_image)
        missing = node.fingerprint_inputs(document="gone.json", index=0)
        assert missing != missing  # NaN: a missing file always runs again, so its error shows

        # a document may only use images inside its own folder tree
        secret = tmp_path / "secret.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
        for reference in (str(secret), "../secret.png"):
            (inputs / "evil.json").write_text(json.dumps([{"image": reference}]), encoding="utf-8")
            with pytest.raises(ValueError, match=r"segment 0: image .* lies outside"):
                run(node, document="evil.json", index=0)
        (inputs / "empty.json").write_text("[]", encoding="utf-8")
        with pytest.raises(ValueError, match="'empty.json' is an empty document"):
            run(node, document="empty.json", index=0)
        (inputs / ".hidden").mkdir()
        (inputs / ".hidden" / "h.json").write_text("[]", encoding="utf-8")
        comfyui.module("load_document").forget_document_choices()
        assert not any(".hidden" in name for name in choices())
    finally:
        folder_paths.set_input_directory(previous_input)


def test_shapestories_image_follows_the_corpus_rules(comfyui) -> None:
    image, caption = run(
        comfyui.nodes["MMI_ShapeStoriesImage"],
        shape="triangle",
        colour="cyan",
        size="large",
        row="bottom",
        column="right",
        image_size=64,
    )
    low, high = RADIUS_RANGES["large"]
    attributes = Attributes("triangle", "cyan", "large", "bottom", "right", (low + high) / 2, (0.0, 0.0))
    assert caption == caption_sentence(attributes) == "a large cyan triangle at bottom right."
    assert image.shape == (1, 64, 64, 3)
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), render_array(attributes, 64))
    reading = read_image(Image.fromarray(render_array(attributes, 64)))
    assert reading.labels() == attributes.labels()


# ----------------------------------------------------------------------------------------------------------------
# checks at queue time and edge cases of the graph


def test_dropdown_values_are_checked_when_the_prompt_is_queued(comfyui) -> None:
    # ComfyUI 0.3.75 checks only classic combos; the pack's validate_inputs refuses what its dropdowns lack. Each
    # names one input (ComfyUI files the message under every input the function names, prefixed with its name).
    nodes = comfyui.nodes
    assert nodes["MMI_LoadModel"].validate_inputs(model=TINY_MODEL) is True
    assert nodes["MMI_LoadModel"].validate_inputs(model=None) is True  # linked: checked when it runs
    assert nodes["MMI_LoadModel"].validate_inputs(model="gone").startswith("no MM-Interleaved model 'gone' here")
    for node in ("MMI_GenerateImage", "MMI_GenerateInterleaved"):
        assert nodes[node].validate_inputs(scheduler="ddim") is True
        message = nodes[node].validate_inputs(scheduler="Euler a")
        assert message.startswith("'Euler a' is not one of ['ddpm', 'ddim',") and "'dpmpp_2m'" in message
    # the loader's dtype and device are checked when it runs, with the input's name
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        comfyui.module("loader").load_model(TINY_MODEL, "fp8", "auto")


def test_an_unconverted_model_folder_is_named_with_the_converter(comfyui, tmp_path) -> None:
    folder, loader = comfyui.module("model_folder"), comfyui.nodes["MMI_LoadModel"]
    extra = tmp_path / "extra"
    release = extra / "mm_interleaved_pretrain"  # the official release: .bin shards and their index
    release.mkdir(parents=True)
    (release / "pytorch_model.bin.index.json").write_text("{}", encoding="utf-8")
    converted = extra / "converted"
    (converted / "tokenizer").mkdir(parents=True)
    for name in ("config.json", "weights_index.json", "tokenizer/tokenizer_config.json"):
        (converted / name).write_text("{}", encoding="utf-8")
    comfyui.folder_paths.add_model_folder_path("mm_interleaved", str(extra))
    try:
        assert "converted" in folder.model_names()
        assert folder.unconverted_folders() == ["mm_interleaved_pretrain"]  # not the converted model's tokenizer/
        message = loader.validate_inputs(model="mm_interleaved_pretrain")
        assert "The folder 'mm_interleaved_pretrain' exists but is not a model in this pack's format" in message
        assert "comfy_mm_interleaved convert-official SRC_FOLDER models/mm_interleaved/<name>" in message
        message = loader.validate_inputs(model="typo")
        assert message.endswith("Not converted (see convert-official in the README): ['mm_interleaved_pretrain']")
    finally:
        comfyui.folder_paths.folder_names_and_paths["mm_interleaved"][0].remove(str(extra))
        comfyui.folder_paths.filename_list_cache.pop("mm_interleaved", None)
    assert folder.unconverted_folders() == []


def test_generate_text_after_a_pending_image_says_which_node_to_connect(comfyui, model) -> None:
    doc = Interleaved([red_square(), "a small red circle at top left.", None])  # None: the model asked for an image
    with pytest.raises(ValueError, match="Connect 'Generate image' \\(or 'Append image\\(s\\)'\\) before this node"):
        run(comfyui.nodes["MMI_GenerateText"], model=model, context=doc, **text_widgets())


def test_interleaved_without_a_new_image_blocks_only_its_images_output(comfyui, model) -> None:
    from comfy_execution.graph_utils import ExecutionBlocker

    doc = Interleaved([red_square(), "a small red circle at top left."])
    widgets = text_widgets(max_new_tokens=3, min_new_tokens=3)
    # one text segment, no room for an image
    images, text, extended = run_interleaved(comfyui, model, doc, max_segments=1, steps=1, widgets=widgets)
    # ComfyUI skips the nodes fed by a blocked output silently (message None) instead of passing an empty batch
    assert isinstance(images, ExecutionBlocker) and images.message is None
    assert len(extended) == len(doc) + 1 and text == extended.segments[-1].text.strip()
    with pytest.raises(ValueError, match=r"empty IMAGE batch \(0, 8, 8, 3\): pass at least one image"):
        run(comfyui.nodes["MMI_AppendImage"], context=doc, images=torch.zeros(0, 8, 8, 3))


def test_saved_pngs_carry_the_workflow_unless_metadata_is_disabled(comfyui) -> None:
    import comfy.cli_args

    doc = Interleaved([red_square(), "a small red circle at top left."])
    workflow = {"nodes": [{"id": 9, "type": "MMI_SaveInterleaved"}]}
    hidden = {"PROMPT": {"9": {"class_type": "MMI_SaveInterleaved"}}, "EXTRA_PNGINFO": {"workflow": workflow}}
    node = comfyui.nodes["MMI_SaveInterleaved"].PREPARE_CLASS_CLONE(hidden)  # as ComfyUI's executor runs it
    result = node.execute(context=doc, filename_prefix="meta/story")
    (saved,) = result.ui["images"]
    info = Image.open(comfyui.output / "meta" / saved["filename"]).info
    assert json.loads(info["prompt"]) == hidden["PROMPT"] and json.loads(info["workflow"]) == workflow
    comfy.cli_args.args.disable_metadata = True
    try:
        (saved,) = node.execute(context=doc, filename_prefix="meta/story").ui["images"]
    finally:
        comfy.cli_args.args.disable_metadata = False
    assert "prompt" not in Image.open(comfyui.output / "meta" / saved["filename"]).info
