"""The adapter training loop: joint caption + instruction steps with disjoint parameter groups, mixed
precision, gradient accumulation, checkpoints of the trainable parameters only, resume, DDP.

How the two losses stay in their groups (the paper's "disjoint parameter groups"): every optimizer step
draws a caption batch and an instruction batch. The caption loss is backpropagated and only the visual
group's gradients are kept; then the instruction loss is backpropagated and only the instruction group's
gradients are kept; the optimizer then steps once on both. Dropping the other group's gradients after
each backward (rather than ``backward(inputs=...)``) keeps this correct under DDP, whose all-reduce
expects every parameter it tracks to receive a gradient in each backward.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import read_adapter, save_adapter
from ..loading import LoadedModel, apply_adapter
from .data import IGNORE, Sample, SampleDataset, endless
from .distributed import World, all_mean, wrap
from .groups import Groups, param_groups, set_trainable


_STREAM_SEED = {"caption": 0, "instruction": 1}  # each kind's shuffle depends on the seed and its kind only


@dataclass
class TrainConfig:
    phase: str = "joint"  # joint | pretrain | finetune (see groups.py)
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # samples of each data kind per micro-step and process
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 50  # linear warmup, then half-cycle cosine to min_lr
    weight_decay: float = 0.02  # on matrices only (not on gates, norms, biases, scales)
    max_len: int = 512  # tokens per sample (prompt + answer)
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16, else fp16, on CUDA; fp32 elsewhere)
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    stop_at: int = 0  # stop (with a checkpoint) after this step, e.g. before a job's time runs out; 0: run to the end
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    cache_images: bool = False  # keep decoded images in memory (small data sets only, e.g. the demo's)
    progress: bool = True


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per step: step, lr, caption, instruction
    adapter_path: Path | None = None


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16, fp16 or auto")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in params.items() if p.ndim >= 2 and not n.endswith("gate")]
    rest = [p for n, p in params.items() if not (p.ndim >= 2 and not n.endswith("gate"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
               amp: torch.dtype | None) -> torch.Tensor:
    """Next-token cross-entropy on the answer positions."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with ctx:
        logits = model(tokens, batch["pixels"].to(device))  # [B, S, V], float
    # position t predicts token t + 1; a batch whose answers were all truncated away gives 0, not NaN
    target = labels[:, 1:].flatten()
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def _save_state(out: Path, step: int, loaded: LoadedModel, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                cfg: TrainConfig, meta: dict[str, Any]) -> Path:
    """adapter.pth (official format, trainable keys only) + train_state.pt (optimizer, scaler, step)."""
    model = loaded.model
    a = model.config.adapter
    adapter_path = out / "adapter.pth"
    save_adapter(model.trainable_state_dict(), adapter_path,
                 {"w_bias": a.bias, "w_lora": bool(a.lora_rank), "lora_rank": a.lora_rank, "preset": model.config.name,
                  "phase": cfg.phase, "step": step, **meta})
    state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "config": asdict(cfg)}
    tmp = out / "train_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "train_state.pt")
    return adapter_path


def _resume(out: Path, loaded: LoadedModel, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    apply_adapter(loaded.model, read_adapter(out / "adapter.pth"), f"checkpoint {out / 'adapter.pth'}")
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def train_adapter(loaded: LoadedModel, captions: list[Sample], instructions: list[Sample], cfg: TrainConfig,
                  out: str | Path, world: World = World(), device: torch.device | None = None,
                  resume: bool = False, meta: dict[str, Any] | None = None) -> TrainResult:
    """Train ``loaded.model`` in place; write ``out/adapter.pth`` (+ ``train_state.pt``, ``log.jsonl``).

    ``resume`` continues from ``out``'s checkpoint (weights, optimizer, scaler, step)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    device = device or model.device
    groups: Groups = param_groups(model, model.config, cfg.phase)
    set_trainable(model, groups)
    if cfg.phase == "pretrain" and not captions:
        raise ValueError("phase 'pretrain' trains on image-caption data; none given")
    if cfg.phase == "finetune" and not instructions:
        raise ValueError("phase 'finetune' trains on instruction data; none given")
    if not captions and not instructions:
        raise ValueError("no training data given")
    own = dict(model.named_parameters())
    params = {n: own[n] for n in groups.all}
    kinds = [(name, [own[n] for n in names], data) for name, names, data in
             (("caption", groups.caption, captions), ("instruction", groups.instruction, instructions)) if names and data]
    amp = amp_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    opt = make_optimizer(params, cfg)
    start = _resume(out, loaded, opt, scaler) if resume else 0
    net = wrap(model, world, device)
    size = model.config.clip.image_size
    streams: dict[str, Iterator[dict[str, torch.Tensor]]] = {
        name: endless(SampleDataset(data, loaded.tokenizer, loaded.preprocess, size, cfg.max_len, cfg.cache_images), cfg.batch_size,
                      cfg.seed + _STREAM_SEED[name], world.distributed, cfg.workers, skip=start * cfg.grad_accum)
        for name, _, data in kinds}
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    result = TrainResult()
    log = open(out / "log.jsonl", "a", buffering=1) if world.main else None  # line-buffered: readable while training
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not (world.main and cfg.progress),
               desc=f"train {cfg.phase}", dynamic_ncols=True)
    try:
        for step in bar:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            acc: dict[torch.nn.Parameter, torch.Tensor] = {}
            losses = {name: 0.0 for name, _, _ in kinds}
            for _ in range(cfg.grad_accum):
                for name, keep, _ in kinds:
                    loss = batch_loss(net, next(streams[name]), device, amp)
                    scaler.scale(loss / cfg.grad_accum).backward()
                    for p in keep:  # this loss's gradient reaches only its own group
                        if p.grad is not None:
                            acc[p] = acc[p] + p.grad if p in acc else p.grad
                    for p in params.values():
                        p.grad = None
                    losses[name] += loss.item() / cfg.grad_accum
            for p, g in acc.items():
                p.grad = g
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            row = {"step": step + 1, "lr": lr, **{k: all_mean(v, world, device) for k, v in losses.items()}}
            result.history.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in losses})
            if log:
                log.write(json.dumps(row) + "\n")
            if world.main and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
                _save_state(out, step + 1, loaded, opt, scaler, cfg, meta or {})
        if world.main:
            result.adapter_path = _save_state(out, end, loaded, opt, scaler, cfg, meta or {})
    finally:
        bar.close()
        if log:
            log.close()
    model.requires_grad_(False)
    return result
