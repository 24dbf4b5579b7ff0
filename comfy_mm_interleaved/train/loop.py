"""The training loop (pretraining and SFT alike), built on accelerate.

One process per device; ``accelerate launch`` (with an accelerate config choosing DDP, FSDP or DeepSpeed) runs it
on several devices and machines. Per optimiser step every process runs ``grad_accum`` micro-batches inside
``accelerator.accumulate`` (so each backend handles gradient sync and loss scaling its own way), then clips the
gradient norm, steps AdamW and the warm-up + cosine schedule. Periodic logging (CSV, TensorBoard, progress bar),
evaluation and checkpoints; SIGTERM makes every process finish its step, save a checkpoint and exit.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import MMInterleavedConfig
from ..tokenizer import build_word_tokenizer, check_tokenizer, load_tokenizer
from .checkpointing import (
    TRAINER_STATE,
    finalize_checkpoint,
    latest_valid_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    write_json_atomic,
)
from .config import ModelSection, TrainConfig
from .metrics import MetricsLogger
from .params import apply_freezing, build_param_groups
from .stream import StreamConfig, TrainStream, move_batch

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    stopped_by_signal: bool
    output_dir: Path
    last_checkpoint: Path | None


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


CONSOLE_SCALARS = ("loss", "loss_txt", "loss_img", "loss_probe", "probe_acc/column", "grad_norm", "samples_per_s")


def import_object(path: str) -> Any:
    """``package.module:attribute`` -> the attribute."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"{path!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def model_config_from(spec: str) -> MMInterleavedConfig:
    if spec == "official_13b":
        return MMInterleavedConfig.official_13b()
    if spec.startswith("tiny:"):
        return MMInterleavedConfig.from_official_tiny(spec[5:])
    return MMInterleavedConfig.load(spec)


def enable_gradient_checkpointing(config: MMInterleavedConfig) -> None:
    config.visual_tokenizer.encoder.gradient_checkpointing = True
    config.visual_tokenizer.resampler.gradient_checkpointing = True
    config.llm.gradient_checkpointing = True
    config.image_decoder.resampler.gradient_checkpointing = True


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model to train: a custom factory, a checkpoint in our format, or a fresh model from a config."""
    section = cfg.model
    if section.factory:
        return import_object(section.factory)(cfg)
    if section.init_from:
        from ..checkpoint import from_pretrained

        model = from_pretrained(section.init_from)
        if section.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        return model
    if not section.config:
        raise ValueError("set model.config (a config.json, 'official_13b' or 'tiny:<path>') or model.init_from")
    from ..models.mm_interleaved import MMInterleaved

    config = model_config_from(section.config)
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(config)
    return MMInterleaved(config)


def run_loss_weights(section: ModelSection, forward_params: dict[str, inspect.Parameter]) -> dict[str, float]:
    """``model.loss_txt_weight`` / ``model.loss_img_weight`` of the run, as forward arguments (the model's config
    is left as it is)."""
    weights = {}
    for name in ("loss_txt_weight", "loss_img_weight"):
        value = getattr(section, name)
        if value is None:
            continue
        if value < 0:
            raise ValueError(f"model.{name} must be >= 0, got {value}")
        weights[name] = float(value)
    if weights and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params.values()):
        missing = sorted(set(weights) - set(forward_params))
        if missing:
            raise ValueError(f"model.{missing[0]} is set but the model's forward takes no {missing[0]} argument")
    return weights


def build_tokenizer(cfg: TrainConfig, model_config: MMInterleavedConfig):
    special = model_config.special_tokens
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer, special)
    if cfg.model.tokenizer_words:
        tokenizer = build_word_tokenizer(cfg.model.tokenizer_words, special, model_config.orig_vocab_size)
        check_tokenizer(tokenizer, special)
        return tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer").is_dir():  # a model folder's own tokenizer
        return load_tokenizer(Path(cfg.model.init_from) / "tokenizer", special)
    raise ValueError(
        "set model.tokenizer (a local tokenizer folder) or model.tokenizer_words, or start from a model folder that "
        "holds tokenizer/ (model.init_from)"
    )


def unfilled_placeholders(cfg: TrainConfig) -> list[str]:
    """``key = value`` of every string still of the form ``[...]`` (the shipped configs' placeholders)."""
    found = []

    def walk(value: Any, where: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, str) and re.fullmatch(r"\[[^\]]+\]", value.strip()):
            found.append(f"{where} = {value}")

    walk(cfg, "")
    return found


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine (or constant) decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sync_stream_with_model(data: StreamConfig, model_config: MMInterleavedConfig) -> None:
    """Image-token count and image sizes always come from the model."""
    data.num_img_token = model_config.num_img_token
    data.encoder_image_size = model_config.encoder_image_size
    data.decoder_image_size = model_config.image_decoder.image_size


def loss_terms(output: Any) -> dict[str, torch.Tensor]:
    """``loss`` plus whichever of ``loss_txt`` / ``loss_img`` / ``loss_probe`` the model output has (object or
    mapping), and the scalar tensors of its optional ``scalars`` mapping (logged as they are)."""
    get = output.get if isinstance(output, dict) else lambda k, d=None: getattr(output, k, d)
    terms = {k: get(k) for k in ("loss", "loss_txt", "loss_img", "loss_probe")}
    if terms["loss"] is None:
        raise ValueError("the model's forward returned no 'loss'")
    terms.update(get("scalars") or {})
    return {k: v.detach().float() for k, v in terms.items() if isinstance(v, torch.Tensor)}


def check_forward_takes(kwargs: dict[str, Any], forward_params: dict[str, inspect.Parameter]) -> None:
    """A custom model must take every batch key its data produces (e.g. ``text_loss_mask`` for SFT data)."""
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params.values()):
        return
    missing = sorted(set(kwargs) - set(forward_params))
    if missing:
        raise ValueError(f"the model's forward does not take the batch keys {missing}; add them to its signature")


# SIGUSR1 (sent by cluster schedulers before a time limit) does not exist on Windows.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignal:
    """Remembers a SIGTERM (or SIGUSR1, used by schedulers before a time limit) until the step ends.

    Handlers can only be installed from the main thread; a training run started from another thread (a notebook
    helper, a server) goes without them, and is told so.
    """

    def __init__(self) -> None:
        self.received = False
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: SIGTERM will stop it without a final checkpoint")
            return
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        log.warning("received signal %d: saving a checkpoint after the current step, then stopping", signum)
        self.received = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM / SIGUSR1 / SIGINT to the main process.

    ``kill -TERM -<pgid>``, ``timeout`` and cluster schedulers signal the whole process group; a worker killed by it
    makes the main process raise in its next ``next()`` instead of finishing the step and saving a checkpoint. The
    workers still end when the loader shuts down or when the main process dies.
    """
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

        self.cfg = cfg
        unfilled = unfilled_placeholders(cfg)
        if unfilled:
            raise ValueError(
                "the config still has placeholders to fill in (in the file or as key=value overrides): "
                + "; ".join(unfilled)
            )
        t = cfg.train
        if t.stop_at is not None and not 1 <= t.stop_at <= t.max_steps:
            raise ValueError(
                f"train.stop_at must be between 1 and train.max_steps ({t.max_steps}), got {t.stop_at}; leave it unset "
                "to train the whole schedule"
            )
        self.accelerator = Accelerator(
            mixed_precision=None if t.mixed_precision == "no" else t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            step_scheduler_with_optimizer=False,
            cpu=t.cpu or None,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
        )
        acc = self.accelerator
        self.output_dir = Path(t.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        set_seed(t.seed)
        model = model if model is not None else build_model(cfg)
        self.model_config: MMInterleavedConfig = model.config
        self.forward_params = dict(inspect.signature(model.forward).parameters)
        self.loss_weights = run_loss_weights(cfg.model, self.forward_params)
        apply_freezing(model, cfg.model.freeze, cfg.model.freeze_extra, cfg.model.unfreeze)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg, self.model_config)
        sync_stream_with_model(cfg.data, self.model_config)
        if cfg.eval.data is not None:
            sync_stream_with_model(cfg.eval.data, self.model_config)

        o = cfg.optim

        def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
            groups = build_param_groups(m, o.lr, o.weight_decay, o.rules)
            self.group_names = [g.pop("name") for g in groups]
            for g in groups:
                g.pop("param_names")
            return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

        def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_multiplier(s, o.warmup_steps, t.max_steps, o.schedule, o.min_lr_ratio)
            )

        if acc.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed wants model and optimiser together
            optimizer = make_optimizer(model)
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, make_scheduler(optimizer))
        else:  # FSDP needs the optimiser built on the wrapped model's parameters
            self.model = acc.prepare(model)
            self.optimizer = acc.prepare(make_optimizer(self.model))
            self.scheduler = acc.prepare(make_scheduler(self.optimizer))

        self.step = 0
        self.data_state = None
        self.last_checkpoint = self.resume()
        self.metrics = MetricsLogger(self.output_dir, self.step, t.tensorboard) if acc.is_main_process else None

    # -----------------------------------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        t = self.cfg.train
        if t.resume == "none":
            existing = sorted(p.name for p in self.checkpoint_root.glob("step_*") if not p.name.endswith(".tmp"))
            if existing:  # a fresh run here would mix its checkpoints with these, and prune them
                raise ValueError(
                    f"train.resume=none, but {self.checkpoint_root} already holds checkpoints {existing}: choose "
                    "another train.output_dir for a fresh run, resume them (train.resume=auto), or move them away"
                )
            return None
        if t.resume == "auto":
            folder = latest_valid_checkpoint(self.checkpoint_root, t.verify_checksums)
            if folder is None:
                return None
        else:
            folder = Path(t.resume)
            if not folder.is_dir():
                raise ValueError(
                    f"train.resume: no checkpoint folder {folder}; use auto (the newest valid checkpoint in "
                    f"{self.checkpoint_root}), none, or the path of a step_<N> folder"
                )
        try:
            self.accelerator.load_state(str(folder))
        except RuntimeError as err:  # e.g. "size mismatch for ...": a checkpoint of another model configuration
            lines = str(err).strip().splitlines() or [type(err).__name__]
            detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing key" in line), "")
            raise ValueError(
                f"cannot resume from {folder}: its state does not fit this model and optimiser ({detail or lines[0]}). "
                "It was written by a run with another model configuration; point train.output_dir at a new folder, "
                "or train.resume at a checkpoint of this configuration"
            ) from None
        state = read_trainer_state(folder)
        self.step, self.data_state = state["step"], state["data_state"]
        log.info("resumed from %s at step %d", folder, self.step)
        return folder

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.checkpoint_root / f"step_{self.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(
                tmp / TRAINER_STATE,
                {"step": self.step, "data_state": self.data_state, "num_processes": acc.num_processes},
            )
            finalize_checkpoint(tmp, final)
            prune_checkpoints(self.checkpoint_root, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def batches(self) -> Iterator[dict[str, Any]]:
        acc = self.accelerator
        stream = TrainStream(
            self.cfg.data,
            self.tokenizer,
            self.model_config.special_tokens,
            rank=acc.process_index,
            world_size=acc.num_processes,
            state=self.data_state,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.cfg.train.num_workers,
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # never touches the global RNG
        )
        return iter(loader)

    # -----------------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        acc, t = self.accelerator, self.cfg.train
        last_step = t.last_step
        stop = StopSignal()
        batches = self.batches()
        progress = None
        if t.progress_bar and acc.is_local_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=last_step, initial=self.step, desc="train", dynamic_ncols=True)
        skipped: dict[str, int] = {}
        window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
        stopped = False
        self.model.train()
        try:
            while self.step < last_step:
                terms = []
                for _ in range(t.grad_accum):
                    kwargs, extra = move_batch(next(batches), acc.device)
                    check_forward_takes(kwargs, self.forward_params)
                    if t.seed_per_batch:
                        torch.manual_seed(t.seed * 1_000_003 + extra["_index"])
                    with acc.accumulate(self.model):
                        output = self.model(**kwargs, **self.loss_weights)
                        acc.backward(output.loss if not isinstance(output, dict) else output["loss"])
                        grad_norm = None
                        if acc.sync_gradients and self.cfg.optim.max_grad_norm is not None:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    terms.append(loss_terms(output))
                    self.data_state = extra["_state"]
                    for k, v in extra["_skipped"].items():
                        skipped[k] = skipped.get(k, 0) + v
                    window_samples += kwargs["text_ids"].shape[0]
                    window_tokens += int(kwargs["attention_mask"].sum())
                self.step += 1
                scalars = self.step_scalars(terms, grad_norm)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{scalars['loss']:.4f}")
                if self.step % t.log_every == 0 or self.step == last_step:
                    elapsed = time.perf_counter() - window_start
                    scalars.update(self.throughput(window_samples, window_tokens, elapsed))
                    scalars.update(self.skip_scalars(skipped))
                    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                    self.log(scalars)
                if t.eval_every > 0 and self.step % t.eval_every == 0:
                    self.log(self.evaluate())
                if self.any_process(stop.received):
                    self.save_checkpoint()
                    stopped = True
                    break
                if t.save_every > 0 and (self.step % t.save_every == 0 or self.step == last_step):
                    self.save_checkpoint()
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return TrainResult(self.step, stopped, self.output_dir, self.last_checkpoint)

    # -----------------------------------------------------------------------------------------------------------
    def any_process(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def step_scalars(self, terms: list[dict[str, torch.Tensor]], grad_norm: Any) -> dict[str, float]:
        """Losses averaged over micro-batches and processes; the learning rate of every parameter group."""
        acc = self.accelerator
        out: dict[str, float] = {}
        for key in terms[0]:
            local = torch.stack([t[key] for t in terms]).mean().reshape(1).to(acc.device)
            out[key] = float(acc.gather(local).mean())
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        for name, group in zip(self.group_names, self.optimizer.param_groups):
            out[f"lr/{name}"] = float(group["lr"])
        return out

    def throughput(self, samples: int, tokens: int, elapsed: float) -> dict[str, float]:
        acc = self.accelerator
        counts = acc.reduce(torch.tensor([float(samples), float(tokens)], device=acc.device), reduction="sum")
        return {"samples_per_s": float(counts[0]) / elapsed, "tokens_per_s": float(counts[1]) / elapsed}

    def skip_scalars(self, skipped: dict[str, int]) -> dict[str, float]:
        from accelerate.utils import gather_object

        total: dict[str, float] = {}
        for part in gather_object([skipped]):
            for k, v in part.items():
                total[f"skipped/{k}"] = total.get(f"skipped/{k}", 0) + v
        return total

    def log(self, scalars: dict[str, float]) -> None:
        if self.metrics is not None and scalars:
            self.metrics.log(self.step, scalars)
            shown = [f"{k} {scalars[k]:.4g}" for k in CONSOLE_SCALARS if k in scalars]
            if shown and "samples_per_s" in scalars:  # the periodic (log_every) rows, not every step's
                log.info("step %d: %s", self.step, ", ".join(shown))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss on ``eval.data`` (fixed random draws) plus the results of every ``eval.hooks`` function."""
        acc, e = self.accelerator, self.cfg.eval
        out: dict[str, float] = {}
        self.model.eval()
        try:
            if e.data is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(e.seed + acc.process_index)
                    stream = TrainStream(
                        e.data, self.tokenizer, self.model_config.special_tokens, acc.process_index, acc.num_processes
                    )
                    losses = []
                    for i, batch in enumerate(stream):
                        if i >= e.max_batches:
                            break
                        kwargs = move_batch(batch, acc.device)[0]
                        with acc.autocast():
                            losses.append(loss_terms(self.model(**kwargs, **self.loss_weights)))
                    for key in losses[0]:
                        local = torch.stack([t[key] for t in losses]).mean().reshape(1)
                        out[f"eval/{key}"] = float(acc.gather(local).mean())
            for hook_path in e.hooks:
                hook: Callable[..., dict[str, float]] = import_object(hook_path)
                result = hook(model=acc.unwrap_model(self.model), step=self.step, accelerator=acc, trainer=self)
                out.update({f"eval/{k}": float(v) for k, v in (result or {}).items()})
        finally:
            self.model.train()
        return out


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Train ``model`` (default: built from ``cfg.model``) with ``cfg``; resumes automatically."""
    return Trainer(cfg, model=model, tokenizer=tokenizer).train()
