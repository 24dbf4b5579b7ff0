"""Engine behaviour: stop on <BOI>, auto alternation, progress and cancellation, schedulers and several images,
bad input, memory placement / offload / size estimates."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.checkpoint import COMPONENTS, component_of
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import (
    CancelFlag,
    GenerationCancelled,
    ImageOptions,
    ImagePart,
    Interleaved,
    InterleavedEngine,
    TextOptions,
)
from comfy_mm_interleaved.inference.memory import (
    GROUPS,
    Offloader,
    Placement,
    component_bytes,
    estimate_peaks,
    resolve_placement,
)
from comfy_mm_interleaved.models.visual_tokenizer import center_crop_resize
from conftest import REPO_ROOT, assert_close
from test_inference_support import (
    model_dir,  # noqa: F401
    new_engine,
    noise_image,
    ordinary_ids,
    solid_image,
    tiny_config,
    words,
)

FAST_IMAGE = ImageOptions(num_inference_steps=2, seed=1)


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def engine(model_dir):  # noqa: F811
    return new_engine(model_dir)


def boosted_engine(model_dir: Path, token_id: int) -> InterleavedEngine:  # noqa: F811
    """An engine whose text head always prefers ``token_id`` (allowed after ``min_new_tokens``)."""
    engine = new_engine(model_dir)
    head = engine.model.text_decoder
    with torch.no_grad():
        if token_id >= head.orig_vocab_size:
            head.head_new.bias[token_id - head.orig_vocab_size] += 1e4
        else:
            head.head.bias[token_id] += 1e4
    return engine


def text_of(config, count: int, offset: int = 0) -> str:
    return words(ordinary_ids(config, count, offset))


def long_text(config, count: int) -> str:
    """``count`` tokens (one word repeated)."""
    return words(ordinary_ids(config, 1) * count)


def kinds(doc: Interleaved) -> list[str]:
    return ["pending" if isinstance(s, ImagePart) and s.pending else type(s).__name__ for s in doc]


# ------------------------------------------------------------------------------------------------------------
def test_stop_on_image_asks_for_an_image(model_dir, config) -> None:  # noqa: F811
    engine = boosted_engine(model_dir, config.special_tokens.boi_token_id)
    doc = Interleaved([text_of(config, 3), noise_image(1)])
    result = engine.generate_text(doc, TextOptions(max_new_tokens=8, min_new_tokens=3))
    assert len(result.token_ids) == 3 and result.ends_with_image and not result.finished
    assert kinds(result.document) == ["TextPart", "ImagePart", "TextPart", "pending"]
    assert result.document.to_readable_text().endswith("<image 2: pending>")
    with pytest.raises(ValueError, match="pending image"):
        engine.generate_text(result.document)
    text_only = engine.generate_text(doc, TextOptions(max_new_tokens=5, stop_on_image=False))
    assert len(text_only.token_ids) == 5 and not text_only.ends_with_image
    assert config.special_tokens.boi_token_id not in text_only.token_ids
    drawn = engine.generate_images(result.document, FAST_IMAGE)
    assert kinds(drawn.document) == ["TextPart", "ImagePart", "TextPart", "ImagePart"]


def test_auto_mode_alternates_text_and_images(model_dir, config) -> None:  # noqa: F811
    engine = boosted_engine(model_dir, config.special_tokens.boi_token_id)
    doc = Interleaved([text_of(config, 3), noise_image(2)])
    events = []
    story = engine.generate(doc, "auto", TextOptions(max_new_tokens=4, min_new_tokens=2), FAST_IMAGE, 4, events.append)
    assert kinds(story) == ["TextPart", "ImagePart", "TextPart", "ImagePart", "TextPart", "ImagePart"]
    assert engine.stats.images_generated == 2 and engine.stats.tokens_generated == 4
    assert engine.stats.images_encoded == 2  # the input image and the first drawn one (read by the next step)
    phases = [e.phase for e in events if e.step == 1]
    assert phases == ["encode", "text", "image", "encode", "text", "image"]
    one_text = engine.generate(doc, "text", TextOptions(max_new_tokens=4, min_new_tokens=2))
    assert kinds(one_text) == ["TextPart", "ImagePart", "TextPart", "pending"]
    assert kinds(engine.generate(one_text, "image", image_options=FAST_IMAGE))[-1] == "ImagePart"


def test_auto_mode_stops_at_the_end_of_the_document(model_dir, config) -> None:  # noqa: F811
    engine = boosted_engine(model_dir, config.special_tokens.eos_token_id)
    doc = Interleaved([noise_image(3), text_of(config, 2)])
    story = engine.generate(doc, "auto", TextOptions(max_new_tokens=6, min_new_tokens=2), FAST_IMAGE, 5)
    assert kinds(story) == ["ImagePart", "TextPart", "TextPart"]
    assert engine.stats.tokens_generated == 2 and engine.stats.images_generated == 0


def test_progress_events_and_cancellation(model_dir, config) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    doc = Interleaved([noise_image(4), text_of(config, 2), noise_image(5)])
    events = []
    engine.generate_text(doc, TextOptions(max_new_tokens=5, min_new_tokens=5), events.append)
    assert [(e.phase, e.step, e.total) for e in events] == [("encode", 1, 2), ("encode", 2, 2)] + [
        ("text", k, 5) for k in range(1, 6)
    ]
    events.clear()
    engine.generate_images(doc, ImageOptions(num_inference_steps=3, seed=2), events.append)
    assert [(e.phase, e.step, e.total) for e in events] == [("image", k, 3) for k in range(1, 4)]

    flag = CancelFlag(forward=events.append)
    events.clear()

    def cancel_at_second_step(event) -> None:
        if event.phase == "image" and event.step == 2:
            flag.cancel()
        flag(event)

    with pytest.raises(GenerationCancelled, match="image step 2/3"):
        engine.generate_images(doc, ImageOptions(num_inference_steps=3, seed=2), cancel_at_second_step)
    assert [e.step for e in events] == [1]
    again = engine.generate_images(doc, ImageOptions(num_inference_steps=2, seed=2))
    fresh = new_engine(model_dir).generate_images(doc, ImageOptions(num_inference_steps=2, seed=2))
    assert_close(again.tensors, fresh.tensors, 1e-4, "after a cancelled image")


def test_schedulers_and_several_images_per_call(engine, config) -> None:
    doc = Interleaved([text_of(config, 4), noise_image(6)])
    single = engine.generate_images(doc, ImageOptions(num_inference_steps=2, seed=9))
    several = engine.generate_images(doc, ImageOptions(num_inference_steps=2, seed=9, num_images=2))
    assert len(several.images) == 2 and several.tensors.shape[0] == 2
    assert_close(several.tensors[:1], single.tensors, 1e-4, "image k uses seed + k")
    assert float((several.tensors[1] - several.tensors[0]).abs().max()) > 0.01
    assert several.document.num_images == doc.num_images + 1
    size = engine.model.image_decoder.config.image_size
    for scheduler in ("ddim", "euler", "euler_ancestral", "dpmpp_2m"):
        options = ImageOptions(num_inference_steps=2, seed=4, scheduler=scheduler)
        first, second = engine.generate_images(doc, options), engine.generate_images(doc, options)
        assert first.images[0].size == (size, size)
        assert torch.equal(first.tensors, second.tensors), scheduler


def test_images_of_any_size_are_center_cropped_like_the_official_transform(engine) -> None:
    big = noise_image(12, (500, 260))
    size = engine.config.visual_tokenizer.encoder.image_size
    cropped = center_crop_resize(big, size)
    assert cropped.size == (size, size)
    ours, reference = engine.encode_images([big, cropped])
    assert ours.key != reference.key
    assert torch.equal(ours.vis_embed, reference.vis_embed)


def test_bfloat16_weights_generate_text_and_images(model_dir, config) -> None:  # noqa: F811
    engine = InterleavedEngine.from_pretrained(model_dir, dtype="bfloat16", device="cpu")
    assert engine.model.mm_decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.model.image_decoder.decoder.unet.dtype == torch.bfloat16
    assert engine.model.image_decoder.decoder.vae.dtype == torch.float32  # the official VAE runs in float32
    doc = Interleaved([noise_image(13), text_of(config, 2)])
    assert len(engine.generate_text(doc, TextOptions(max_new_tokens=3, min_new_tokens=3)).token_ids) == 3
    drawn = engine.generate_images(doc, ImageOptions(num_inference_steps=1))
    assert torch.isfinite(drawn.tensors).all() and drawn.tensors.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# bad input
def test_empty_documents_are_refused(engine) -> None:
    for doc in (Interleaved([]), Interleaved(["  ", ""])):
        for call in (engine.generate_text, engine.generate_images, engine.generate):
            with pytest.raises(ValueError, match="empty"):
                call(doc)
    with pytest.raises(TypeError, match="Interleaved"):
        engine.generate_text(["a list"])


def test_documents_longer_than_the_context_window_are_refused(engine, config) -> None:
    window = config.llm.max_position_embeddings
    too_long = Interleaved([long_text(config, window)])  # <s> + window tokens
    with pytest.raises(ValueError, match="context window"):
        engine.generate_text(too_long)
    no_room_for_image = Interleaved([long_text(config, window - config.num_img_token - 1)])
    with pytest.raises(ValueError, match="context window"):
        engine.generate_images(no_room_for_image, FAST_IMAGE)
    # text generation stops when the window is full
    almost = Interleaved([long_text(config, window - 3)])
    assert len(engine.generate_text(almost, TextOptions(max_new_tokens=10, min_new_tokens=10)).token_ids) == 2


def test_more_images_than_the_model_reads_are_refused(model_dir, config) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    limit = config.llm.mmfs.max_num_images - 1
    image = solid_image((9, 9, 9), (8, 8))
    too_many = Interleaved([text_of(config, 1)] + [image] * (limit + 1))
    with pytest.raises(ValueError, match=f"at most {limit} images"):
        engine.generate_text(too_many)
    full = Interleaved([text_of(config, 1)] + [image] * limit)
    with pytest.raises(ValueError, match="plus the one to draw"):
        engine.generate_images(full, FAST_IMAGE)
    assert engine.stats.images_encoded == 0  # refused before any work


def test_other_bad_inputs_have_clear_errors(engine, config, tmp_path: Path) -> None:
    doc = Interleaved([text_of(config, 2)])
    for text in ("w5 <|image|> w6", "<s> w5", "w5 </s>", "w5 <|beginofimage|>"):
        with pytest.raises(ValueError, match="special token"):
            engine.generate_text(Interleaved([text]))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        Interleaved(["x", tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="pending"):
        engine.encode_images(ImagePart(None))
    size = engine.model.image_decoder.config.image_size
    for options in (ImageOptions(height=size + 8), ImageOptions(scheduler="magic"), ImageOptions(num_images=0)):
        with pytest.raises(ValueError):
            engine.generate_images(doc, options)
    with pytest.raises(ValueError, match="mode"):
        engine.generate(doc, "video")
    with pytest.raises(ValueError, match="max_segments"):
        engine.generate(doc, "auto", max_segments=0)
    with pytest.raises(ValueError, match="beam search with sampling"):
        engine.generate_text(doc, TextOptions(num_beams=2, do_sample=True))


def test_sampling_through_the_engine_is_reproducible(engine, config) -> None:
    doc = Interleaved([noise_image(7), text_of(config, 3)])

    def sample(seed: int) -> list[int]:
        options = TextOptions(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.5, seed=seed)
        return engine.generate_text(doc, options).token_ids

    assert sample(1) == sample(1) != sample(2)


def test_model_folder_errors(tmp_path: Path, model_dir, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from comfy_mm_interleaved.inference import engine as engine_module

    assert engine_module.resolve_model_dir(None) == engine_module.EMBEDDED_MODEL_DIR  # the shipped default
    monkeypatch.setattr(engine_module, "EMBEDDED_MODEL_DIR", tmp_path / "not-shipped")
    with pytest.raises(ValueError, match="embedded default model is not shipped"):
        InterleavedEngine.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InterleavedEngine.from_pretrained(tmp_path / "nothing")
    (tmp_path / "no_tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        InterleavedEngine.from_pretrained(tmp_path / "no_tokenizer")


# ------------------------------------------------------------------------------------------------------------
# memory
def test_placement_resolution() -> None:
    placement = resolve_placement("bfloat16", {"language": "cpu", "vae": "meta", "unet": "meta"})
    assert placement.dtype == torch.bfloat16
    assert placement.devices["language"] == torch.device("cpu")
    assert placement.devices["diffusion"] == torch.device("meta")
    assert placement.component_devices()["text_decoder"] == torch.device("cpu")
    with pytest.raises(ValueError, match="share one device"):
        resolve_placement("float32", {"unet": "cpu", "vae": "meta"})
    with pytest.raises(ValueError, match="unknown device-map key"):
        resolve_placement("float32", {"gpu": "cpu"})
    with pytest.raises(ValueError, match="offload"):
        resolve_placement("float32", "cpu", offload="always")
    with pytest.raises(ValueError, match="dtype"):
        resolve_placement("int8")
    cpu = resolve_placement("float32", "cpu", offload=True)
    assert cpu.offload == "none" and "offload ignored" in cpu.notes[0]
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        resolve_placement("float32", "banana")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = "cuda" if gpus == 0 else f"cuda:{gpus}"  # a device this machine does not have, whatever it has
    with pytest.raises(ValueError, match=f"device '{absent}': "):
        resolve_placement("float32", {"language": "cpu", "diffusion": absent})


def test_sequential_offload_streams_layers_and_gives_the_same_tokens(model_dir, engine, config) -> None:  # noqa: F811
    """The offload machinery on the CPU (copies instead of transfers): streamed layers, group swapping."""
    loaded = new_engine(model_dir)
    placement = Placement(
        torch.float32, dict.fromkeys(GROUPS, torch.device("cpu")), "sequential", torch.device("cpu"), 1
    )
    offloaded = InterleavedEngine(loaded.model, loaded.tokenizer, placement=placement)
    layers = config.llm.num_hidden_layers
    assert len(offloaded.offloader.streamed) == layers - 1
    doc = Interleaved([noise_image(8), text_of(config, 3)])
    options = TextOptions(max_new_tokens=6, min_new_tokens=6)
    assert offloaded.generate_text(doc, options).token_ids == engine.generate_text(doc, options).token_ids
    assert not any(s.loaded for s in offloaded.offloader.streamed)  # dropped after every forward
    assert offloaded.offloader.order == ["vision", "language"]
    offloaded.generate_images(doc, FAST_IMAGE)
    assert offloaded.offloader.order == ["vision", "language", "diffusion"]

    budget = Offloader(loaded.model, Placement(torch.float32, placement.devices, "model", torch.device("cpu")), 1)
    with budget.phase("text"):
        pass
    with budget.phase("image"):
        pass
    assert budget.order == ["diffusion"] and not budget.groups["language"].loaded


def test_component_bytes_match_the_loaded_model(engine) -> None:
    actual = dict.fromkeys(COMPONENTS, 0)
    for key, tensor in engine.model.state_dict().items():
        actual[component_of(key)] += tensor.numel() * tensor.element_size()
    assert component_bytes(engine.config, "float32") == actual


def test_13b_memory_estimate_from_the_meta_build() -> None:
    """bf16 sizes of the 13B components equal the official key list's shapes (VAE and fixed tables in float32),
    and the sequential plan fits a 24 GB card."""
    budget = 22 * 2**30  # a 24 GB card less CUDA context and fragmentation
    estimate = estimate_peaks(MMInterleavedConfig.official_13b(), "bfloat16", budget)
    official = json.loads(
        (REPO_ROOT.parent / "shared" / "reference" / "official_state_dict_keys.json").read_text(encoding="utf-8")
    )
    expected = dict.fromkeys(COMPONENTS, 0)
    for key, (shape, dtype) in official.items():
        component = component_of(key)
        if dtype != "torch.float32":  # integer buffers keep their dtype
            itemsize = getattr(torch, dtype.removeprefix("torch.")).itemsize
        elif component == "vae" or key.rsplit(".", 1)[-1] in ("pos_embed", "clip_mean", "clip_std"):
            itemsize = 4
        else:
            itemsize = 2
        expected[component] += math.prod(shape) * itemsize
    assert estimate["component_bytes"] == expected
    assert estimate["peak_bytes"]["sequential"] <= budget < estimate["peak_bytes"]["model"]
    assert 0 < estimate["sequential_resident_layers"] < estimate["llm_layers"]


def test_a_diverged_sampler_is_named_with_what_to_change() -> None:
    """euler_ancestral at 3 steps diverges on the embedded model's schedule (its largest noise level is about 2e4:
    a rounding in the ancestral step's square root gives NaN); the error says so instead of a bare NaN message."""
    engine = InterleavedEngine.from_pretrained()
    options = ImageOptions(num_inference_steps=3, scheduler="euler_ancestral", seed=1)
    with pytest.raises(ValueError, match=r"the sampler diverged: .*\(euler_ancestral, 3 steps, torch.float32\); try"):
        engine.generate_images(Interleaved(["a small red circle at top left."]), options)
    drawn = engine.generate_images(Interleaved(["a small red circle at top left."]), replace(options, scheduler="ddpm"))
    assert torch.isfinite(drawn.tensors).all()  # the engine is still usable
