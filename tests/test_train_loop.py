"""The training loop on the real MMInterleaved (tiny configuration): exact resume after SIGKILL, SIGTERM checkpoints,
corrupt-checkpoint fallback, a 2-process CPU run (accelerate launch, gloo) equal to 1 process, training from a model
folder, bf16 autocast, parameter groups, schedule, logs."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from comfy_mm_interleaved.checkpoint import save_pretrained
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.train.checkpointing import list_checkpoints, verify_checkpoint
from comfy_mm_interleaved.train.config import TrainConfig
from comfy_mm_interleaved.train.loop import Trainer, build_tokenizer, check_forward_takes, lr_multiplier, train
from comfy_mm_interleaved.train.metrics import crc32c, read_metrics
from comfy_mm_interleaved.train.params import OFFICIAL_RULES, apply_freezing, build_param_groups
from test_train_helpers import WORDS, FaultInjector, build, story_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return story_corpus(tmp_path_factory.mktemp("corpus"), n_docs=16)


def config_dict(out: Path, corpus: Path, **train_over) -> dict:
    return {
        "model": {"factory": "test_train_helpers:build", "tokenizer_words": WORDS},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "grad_accum": 2,
            "save_every": 2,
            "log_every": 1,
            "eval_every": 0,
            "keep_last": 2,
            "seed": 5,
            "progress_bar": False,
            "cpu": True,
            **train_over,
        },
        "data": {
            "seq_len": 48,
            "batch_size": 1,
            "sources": [{"format": "interleaved", "shards": str(corpus), "image_root": str(corpus.parent)}],
        },
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(
    config: Path,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
    timeout: int = 240,
    new_session: bool = False,
):
    cmd = (launcher or [sys.executable]) + ["-m", "comfy_mm_interleaved", "train", "--config", str(config)]
    paths = [str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]  # the factory's module
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, start_new_session=new_session
    )


def losses(out: Path) -> dict[int, float]:
    return read_metrics(out / "metrics.csv", "loss")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run, in-process."""
    out = tmp_path_factory.mktemp("reference")
    result = train(TrainConfig.load(write_config(out / "c.yaml", config_dict(out, corpus))), model=build())
    assert result.step == 6 and not result.stopped_by_signal
    ref = losses(out)
    text = read_metrics(out / "metrics.csv", "loss_txt")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and text[6] < text[1]  # (the image loss is noisy: random timesteps)
    assert all(v > 0 for v in read_metrics(out / "metrics.csv", "loss_img").values())  # diffusion draws in play
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [6, 4]  # keep_last 2
    return ref


def test_sigkill_between_checkpoints_resumes_and_reproduces_the_losses_exactly(
    corpus, reference, tmp_path, caplog
) -> None:
    config = write_config(tmp_path / "c.yaml", config_dict(tmp_path / "out", corpus))
    killed = run_cli(config, {"TRAIN_TEST_KILL_AT_CALL": "9"})  # first micro-batch of step 5
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "out" / "checkpoints")] == [4, 2]
    caplog.set_level(logging.INFO, logger="comfy_mm_interleaved.train.loop")
    result = train(TrainConfig.load(config), model=build())  # the restart, here in the test process
    assert result.step == 6 and "step_00000004 at step 4" in caplog.text
    assert losses(tmp_path / "out") == reference  # bit-exact, steps 1-4 before the kill and 5-6 after


def test_sigterm_to_the_process_group_with_dataloader_workers_still_saves(corpus, tmp_path) -> None:
    """``timeout`` / ``kill -TERM -pgid`` / schedulers signal the workers too: the step still ends with a checkpoint."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", config_dict(out, corpus, num_workers=2, save_every=100, max_steps=50))
    # own session: the signal reaches the run's process group only, not pytest's
    stopped = run_cli(config, {"TRAIN_TEST_TERM_GROUP_AT_CALL": "5"}, new_session=True)  # during step 3
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by signal at step 3" in stopped.stderr, stopped.stderr[-3000:]
    step3 = out / "checkpoints" / "step_00000003"
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert verify_checkpoint(step3) is None
    assert sorted(losses(out)) == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_and_a_corrupt_one_falls_back(corpus, reference, tmp_path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", config_dict(out, corpus))
    model = build()
    model.register_forward_pre_hook(FaultInjector(5, signal.SIGTERM))  # SIGTERM during step 3
    stopped = train(TrainConfig.load(config), model=model)
    assert stopped.stopped_by_signal and stopped.step == 3  # the step was finished, saved, and the run ended
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 2]
    step3 = out / "checkpoints" / "step_00000003"
    assert stopped.last_checkpoint == step3 and verify_checkpoint(step3) is None
    # corrupt the newest checkpoint (one flipped byte) and leave a half-written one: resume uses step 2
    weights = next(step3.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(step3)
    half = out / "checkpoints" / "step_00000005"
    shutil.copytree(out / "checkpoints" / "step_00000002", half)
    (half / "manifest.json").unlink()
    cfg = TrainConfig.load(config, ["train.max_steps=4", "train.save_every=100"])
    result = train(cfg, model=build())
    assert result.step == 4
    got = losses(out)
    assert got == {s: reference[s] for s in (1, 2, 3, 4)}  # steps 3-4 redone from step 2, same values


def accelerate_config(path: Path, processes: int) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # accelerate's MULTI_CPU launcher needs MPI; its torchrun launcher works on CPU when the training config says
    # train.cpu: true (each process then joins a gloo process group)
    data = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": processes,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "mixed_precision": "no",
        "use_cpu": False,
        "dynamo_config": {"dynamo_backend": "NO"},
        "rdzv_backend": "static",
        "same_network": True,
    }
    return write_config(path, data)


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(corpus, reference, tmp_path) -> None:
    out = tmp_path / "out2"
    two = config_dict(out, corpus, grad_accum=1, max_steps=4, save_every=100)
    launcher = [str(REPO / ".venv" / "bin" / "accelerate"), "launch", "--config_file"]
    launcher.append(str(accelerate_config(tmp_path / "accelerate.yaml", 2)))
    proc = run_cli(write_config(tmp_path / "c2.yaml", two), launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step, value in got.items():  # 2 processes x 1 row == 1 process x 2 accumulated rows
        assert value == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_training_starts_from_a_model_folder_in_our_format(corpus, reference, tmp_path) -> None:
    folder = save_pretrained(build(), tmp_path / "model")
    data = config_dict(tmp_path / "out", corpus, max_steps=2, save_every=0)
    data["model"] = {"init_from": str(folder), "tokenizer_words": WORDS}
    result = train(TrainConfig.load(write_config(tmp_path / "c.yaml", data)))
    assert result.step == 2
    assert losses(tmp_path / "out") == {s: reference[s] for s in (1, 2)}  # the same weights as the factory's


def test_stop_at_cuts_the_schedule_and_a_resume_finishes_it(corpus, reference, tmp_path) -> None:
    out = tmp_path / "out"
    cut = TrainConfig.load(write_config(tmp_path / "c.yaml", config_dict(out, corpus, stop_at=3)))
    result = train(cut, model=build())
    assert result.step == 3 and not result.stopped_by_signal
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 2]  # the stop step is saved
    assert losses(out) == {s: reference[s] for s in (1, 2, 3)}  # the 6-step schedule's learning rates
    whole = TrainConfig.load(write_config(tmp_path / "c.yaml", config_dict(out, corpus)))
    assert train(whole, model=build()).step == 6
    assert losses(out) == reference
    with pytest.raises(ValueError, match="train.stop_at must be between 1 and train.max_steps"):
        Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", config_dict(out, corpus, stop_at=7))), model=build())


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change: start and leave this test clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_bf16_autocast_training_step_on_cpu(corpus, tmp_path, fresh_accelerate_state) -> None:
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = config_dict(tmp_path / "out", corpus, max_steps=1, grad_accum=1, save_every=0, mixed_precision="bf16")
    data["optim"]["warmup_steps"] = 0
    trainer = Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), model=model)
    assert trainer.accelerator.mixed_precision == "bf16"
    dtypes = []
    model.mm_decoder.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    assert trainer.train().step == 1
    assert dtypes == [torch.bfloat16]  # the forward ran under bf16 autocast
    logged = read_metrics(tmp_path / "out" / "metrics.csv", "loss")
    assert math.isfinite(logged[1])
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert "mm_decoder.layers.0.llama_cross_attn.gate" in changed
    assert "image_decoder.perceiver_resampler.queries" in changed  # reached through the bf16 image loss
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: float32 master weights


def test_official_parameter_groups_and_frozen_parts() -> None:
    model = build()
    apply_freezing(model, "official")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "visual_tokenizer.encoder.vision_model.embeddings.patch_embedding.weight" in frozen
    assert "visual_tokenizer.encoder.vision_model.adapter_spm.fc1.weight" not in frozen
    assert {
        "mm_decoder.embed_tokens.weight",
        "text_decoder.head.weight",
        "image_decoder.decoder.vae.encoder.conv_in.weight",
    } < frozen
    groups = {g["name"]: g for g in build_param_groups(model, 1e-4, 0.05, OFFICIAL_RULES)}
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups.values() for n in g["param_names"]}
    layer = "mm_decoder.layers.0.llama_cross_attn"
    assert by_name[f"{layer}.gate"] == (1e-4, 0.0)
    assert by_name[f"{layer}.attn.sampling_offsets.weight"] == (1e-5, 0.0)
    assert by_name[f"{layer}.attn.value_proj.weight"] == (1e-4, 0.05)
    assert by_name[f"{layer}.attn.value_proj.bias"] == (1e-4, 0.0)
    assert by_name[f"{layer}.norm1.weight"] == (1e-4, 0.05)  # RMSNorm-style weights are decayed, as officially
    assert by_name["image_decoder.decoder.unet.conv_in.weight"] == (1e-5, 0.05)
    assert by_name["visual_tokenizer.pos_ln.weight"] == (1e-4, 0.0)  # nn.LayerNorm: no decay
    assert by_name["soi_token"] == (1e-4, 0.05)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    scratch = build()  # a model trained from scratch: its text head is no frozen pretrained copy
    apply_freezing(scratch, "none", extra=["image_decoder.decoder.unet."], unfreeze=["text_decoder.head."])
    trainable = {n for n, p in scratch.named_parameters() if p.requires_grad}
    assert "text_decoder.head.weight" in trainable and "mm_decoder.embed_tokens.weight" in trainable
    assert not any(n.startswith(("image_decoder.decoder.unet.", "image_decoder.decoder.vae.")) for n in trainable)


def test_a_custom_model_must_take_every_batch_key() -> None:
    def forward(text_ids, attention_mask, **kwargs): ...  # noqa: ANN001, ANN003, ANN202

    def text_only(text_ids, attention_mask): ...  # noqa: ANN001, ANN202

    batch = {"text_ids": None, "attention_mask": None, "text_loss_mask": None}
    check_forward_takes(batch, dict(inspect.signature(forward).parameters))
    with pytest.raises(ValueError, match="text_loss_mask"):
        check_forward_takes(batch, dict(inspect.signature(text_only).parameters))


def test_warmup_cosine_schedule_values() -> None:
    assert lr_multiplier(0, 4, 14, "cosine", 0.0) == pytest.approx(1 / 5)
    assert lr_multiplier(3, 4, 14, "cosine", 0.0) == pytest.approx(4 / 5)
    assert lr_multiplier(4, 4, 14, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_multiplier(9, 4, 14, "cosine", 0.0) == pytest.approx(0.5)  # half-way: (1 + cos(pi/2)) / 2
    assert lr_multiplier(14, 4, 14, "cosine", 0.1) == pytest.approx(0.1)


def test_tensorboard_events_are_valid_tfrecords(tmp_path) -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    from comfy_mm_interleaved.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(7, {"loss": 0.5})
    logger.close()
    (events,) = (tmp_path / "tensorboard").iterdir()
    data = events.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        (length,) = torch.tensor(list(data[pos : pos + 8]), dtype=torch.uint8).numpy().view("<u8")
        records.append(data[pos + 12 : pos + 12 + int(length)])
        pos += 12 + int(length) + 4
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and torch.tensor(0.5).numpy().astype("<f4").tobytes() in records[1]
    assert (tmp_path / "metrics.csv").read_text(encoding="utf-8").splitlines()[1].split(",")[::2] == ["7", "loss"]


def test_config_rejects_unknown_keys_and_applies_overrides(tmp_path) -> None:
    path = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 3}, "data": {"sources": []}})
    cfg = TrainConfig.load(path, ["train.grad_accum=4", "optim.betas=[0.9, 0.95]", "optim.lr=2e-3"])
    assert (cfg.train.max_steps, cfg.train.grad_accum, cfg.optim.betas) == (3, 4, [0.9, 0.95])
    assert cfg.optim.lr == 0.002  # YAML 1.1 reads 2e-3 as a string: float fields convert it
    with pytest.raises(ValueError, match="expected a number"):
        TrainConfig.load(path, ["optim.max_grad_norm=big"])
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.load(path, ["train.max_step=3"])
    json.dumps(cfg.to_dict())  # serialisable


def test_config_values_are_checked_for_type_and_range(tmp_path) -> None:
    path = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 3}, "data": {"sources": []}})
    bad = {
        "train.max_steps=abc": "train.max_steps: expected an integer, got 'abc'",
        "train.seed=1.5": "train.seed: expected an integer, got 1.5",
        "train.cpu=maybe": "train.cpu: expected true or false, got 'maybe'",
        "train.max_steps=null": "train.max_steps: must be set",
        "train.grad_accum=0": "train.grad_accum must be >= 1, got 0",
        "train.log_every=0": "train.log_every must be >= 1, got 0",
        "train.max_steps=-1": "train.max_steps must be >= 1, got -1",
        "train.mixed_precision=fp8": "train.mixed_precision must be 'no', 'bf16' or 'fp16', got 'fp8'",
        "data.batch_size=0": "data.batch_size must be >= 1, got 0",
        "optim.betas=[0.9]": r"optim.betas must be two numbers in \[0, 1\)",
        "optim.betas=[0.9, x]": r"optim.betas\[1\]: expected a number, got 'x'",
        "optim.lr=0": "optim.lr and optim.eps must be > 0",
        "model.freeze_extra=vision": "model.freeze_extra: expected a list, got 'vision'",
    }
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            TrainConfig.load(path, [override])
    cfg = TrainConfig.load(path, ["train.output_dir=2024", "optim.lr=1", "model.tokenizer=null"])
    assert (cfg.train.output_dir, cfg.optim.lr, cfg.model.tokenizer) == ("2024", 1.0, None)
    # YAML 1.1 reads an unquoted no as false: the documented mixed_precision=no still means "no"
    assert TrainConfig.load(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_placeholders_a_missing_resume_folder_and_the_model_folders_tokenizer(corpus, tmp_path) -> None:
    shipped = TrainConfig.load(REPO / "configs" / "train" / "sft_vqa.yaml")
    with pytest.raises(ValueError, match=r"placeholders to fill in.*model.init_from = \[MODEL FOLDER\]"):
        Trainer(shipped, model=build())
    data = config_dict(tmp_path / "out", corpus, resume=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="train.resume: no checkpoint folder .*nowhere; use auto"):
        Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), model=build())
    # without model.tokenizer / tokenizer_words, a model folder's own tokenizer/ is used
    base = save_pretrained(build(), tmp_path / "base")
    words = build_tokenizer(
        TrainConfig.load(write_config(tmp_path / "c.yaml", config_dict(tmp_path, corpus))), build().config
    )
    words.save_pretrained(str(base / "tokenizer"))
    data = config_dict(tmp_path / "out2", corpus)
    data["model"] = {"init_from": str(base)}
    tokenizer = build_tokenizer(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), build().config)
    assert tokenizer.get_vocab() == words.get_vocab()


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_a_resume_of_another_shape_is_explained(
    corpus, reference, tmp_path
) -> None:
    out = tmp_path / "out"
    data = config_dict(out, corpus, max_steps=2, grad_accum=1, save_every=2)
    assert train(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), model=build()).step == 2
    fresh = config_dict(out, corpus, max_steps=2, grad_accum=1, save_every=2, resume="none")
    with pytest.raises(ValueError, match=r"train.resume=none, but .* already holds checkpoints \['step_00000002'\]"):
        Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", fresh)), model=build())
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]  # untouched
    other = MMInterleaved(tiny_config(llm_width=32))  # the LLM of another width
    with pytest.raises(ValueError, match="cannot resume from .*step_00000002: its state does not fit this model"):
        Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), model=other)


def test_shipped_configs_load() -> None:
    configs = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"pretrain_official", "sft_llava", "sft_vqa", "sft_caption", "sft_story"}
    for path in configs:
        cfg = TrainConfig.load(path)
        assert cfg.data.sources, path
    official = TrainConfig.load(REPO / "configs" / "train" / "pretrain_official.yaml")
    assert [(r.match, r.lr, r.weight_decay) for r in official.optim.rules] == [
        (r.match, r.lr, r.weight_decay) for r in OFFICIAL_RULES
    ]
    assert (official.optim.betas, official.optim.eps, official.train.max_steps) == ([0.9, 0.995], 1e-6, 15000)
    assert [s.weight for s in official.data.sources] == [1, 1, 1, 2]
    accel = {
        p.stem: yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in (REPO / "configs" / "train" / "accelerate").glob("*.yaml")
    }
    assert {a["distributed_type"] for a in accel.values()} == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    ds = json.loads((REPO / "configs" / "train" / "accelerate" / "deepspeed_zero1.json").read_text(encoding="utf-8"))
    assert ds["zero_optimization"]["stage"] == 1 and ds["fp16"]["loss_scale_window"] == 250


def test_loss_weights_of_the_run_override_the_model_config(corpus, reference, tmp_path) -> None:
    data = config_dict(tmp_path / "out", corpus, max_steps=1, grad_accum=1, save_every=0)
    data["optim"]["warmup_steps"] = 0
    data["model"]["loss_txt_weight"] = 0.0
    data["model"]["loss_img_weight"] = 25
    model = build()
    assert (model.config.loss_txt_weight, model.config.loss_img_weight) == (1.0, 10.0)
    trainer = Trainer(TrainConfig.load(write_config(tmp_path / "c.yaml", data)), model=model)
    assert trainer.loss_weights == {"loss_txt_weight": 0.0, "loss_img_weight": 25.0}
    logged = {}
    trainer.train()
    for tag in ("loss", "loss_txt", "loss_img"):
        logged[tag] = read_metrics(tmp_path / "out" / "metrics.csv", tag)[1]
    assert logged["loss"] == pytest.approx(25.0 * logged["loss_img"], rel=1e-5)  # no text term, image x 25
    assert (model.config.loss_txt_weight, model.config.loss_img_weight) == (1.0, 10.0)  # a saved model keeps them

    data["model"]["loss_img_weight"] = -1.0
    with pytest.raises(ValueError, match=r"model.loss_img_weight must be >= 0"):
        Trainer(TrainConfig.load(write_config(tmp_path / "c2.yaml", data)), model=build())
