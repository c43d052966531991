"""The machine: CPU/GPU description, memory bandwidth, what fits in memory, and the bandwidth decode bound."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multimodal.config import ModelConfig

from .shapes import count_params
from .timing import sync

# --- machine ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def huge_pages() -> str:
    """The kernel's transparent-huge-page mode and whether torch's allocator asks for them, in words."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    asked = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
    return f"THP {mode}, torch {'asks for them' if asked else 'does not ask'} (THP_MEM_ALLOC_ENABLE)"


def machine_info(device: torch.device) -> dict[str, Any]:
    import psutil
    import transformers

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "thp": huge_pages(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def memory_bandwidth_gbs(device: torch.device, mib: int = 1024, repeats: int = 10) -> dict[str, float]:
    """Rough sustained bandwidth of the memory that holds the weights: a large sum (read only, what a
    decode step does to its weights) and a large copy (read + write). Best of ``repeats``."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best_read, best_copy = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first pass also faults the pages in
        sync(device)
        t0 = time.perf_counter()
        src.sum().item()
        t1 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        t2 = time.perf_counter()
        best_read, best_copy = min(best_read, t1 - t0), min(best_copy, t2 - t1)
    size = n * 4
    del src, dst
    return {"read_gbs": size / best_read / 1e9, "copy_gbs": 2 * size / best_copy / 1e9}


# --- what fits -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    shape: str
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig


def check_fits(plan: Plan, force: bool) -> bool:
    """Refuse runs this machine cannot do (one model at a time must fit), and 7B on CPU unless forced:
    it is minutes per request on a few cores. True when both models fit at once."""
    import psutil

    counts = count_params(plan.cfg)
    need = (counts["llama"] + counts["clip"] + counts["adapter"]) * torch.finfo(plan.dtype).bits // 8
    if plan.device.type == "cuda":
        free = torch.cuda.mem_get_info(plan.device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.9 * free:
        raise SystemExit(f"{plan.shape} in {plan.dtype} needs ~{need / 2**30:.1f} GiB for the weights alone; "
                         f"{free / 2**30:.1f} GiB is free on {plan.device}. Try --dtype bfloat16 or a GPU.")
    if plan.shape == "7b" and plan.device.type == "cpu" and not force:
        raise SystemExit("7b on CPU loads ~13.5 GiB per model (bf16) and decodes at seconds per token on a "
                         "few cores; pass --force to run it anyway (the two models run one after the other).")
    return 2 * need < 0.8 * free


def decode_bound(cfg: ModelConfig, dtype: torch.dtype, counts: dict[str, int], read_gbs: float) -> dict[str, float]:
    """Upper bound on decode tok/s if each step only had to read the LM weights once from memory (the
    embedding table is gathered, one row, so it is left out; the KV cache is small at these lengths)."""
    size = torch.finfo(dtype).bits // 8
    weight_bytes = (counts["llama"] - counts["llama_embedding"]) * size
    return {"weight_bytes_per_token": weight_bytes, "bound_tok_s": read_gbs * 1e9 / weight_bytes}
