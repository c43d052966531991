"""PEFT's AdaptionPrompt adapters (``peft_type: ADAPTION_PROMPT``): ``adapter_config.json`` +
``adapter_model.safetensors``, read into and written from this model's adapter.

What PEFT computes (peft/tuners/adaption_prompt, read for this): in each of the top ``adapter_layers``
attention layers, a learned prompt [1, adapter_len, hidden] goes through that layer's k_proj and v_proj
(no norm, no RoPE); with grouped-query attention each kv head serves ``k_proj.in_features //
k_proj.out_features`` query heads, head h using kv head h // group (= n_heads / n_kv_heads here, since
this model's head size is always dim / n_heads, as the Hugging Face reader checks). The layer's RoPE'd
queries attend to it with their own softmax (scores / sqrt(head_dim), softmax in fp32, cast back to the
query dtype); the probabilities are multiplied by ``adaption_gate``, a plain scalar per layer
(zero-init, no tanh, not per head), and the result goes through o_proj and is added to the attention's
output. In fp32 this model computes the same to rounding; in bf16/fp16 its fused attention rounds the
softmax differently, within that dtype's precision.

This model adds the gated prompt attention before ``wo`` instead: o_proj(text) + o_proj(g * prompt) =
o_proj(text + g * prompt) because o_proj is linear without a bias (the Hugging Face reader refuses
``attention_bias`` bases, and a PEFT adapter tunes no bias, scale or LoRA on wo). So a PEFT adapter is
an adapter of this model with ``gate_fn="identity"``, ``gate_per_head=False``, prompts only, and nothing
else tuned. The Hugging Face reader permutes wq/wk rows into Meta's RoPE order; each head's query and
key rows move together, so q·k, and with it the prompt attention, is unchanged.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import AdapterCheckpoint, CheckpointError, StateDict, preview_names
from ..config import LlamaConfig, ModelConfig
from . import read_json_object

if TYPE_CHECKING:
    from ..model import MultimodalLlama

PEFT_TYPE = "ADAPTION_PROMPT"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
# PeftModelForCausalLM around LlamaForCausalLM names them base_model.model.model.layers.{i}.self_attn.adaption_*
_KEY = re.compile(r"^(?:.+\.)?layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$")
_PREFIX = "base_model.model.model.layers"


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(path), path
    path = folder / LEGACY_WEIGHTS_FILE
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), path
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE})")


def read_peft_adaption_prompt(folder: str | os.PathLike, model_cfg: LlamaConfig | ModelConfig | None) -> AdapterCheckpoint:
    """A PEFT AdaptionPrompt folder as this model's adapter: ``adapter_query`` rows are the prompts of
    the adapted layers in ascending order, each layer's gate a [1, 1, 1, 1] identity gate. With
    ``model_cfg`` (the base's) the layers and widths are checked against the base."""
    folder = Path(folder)
    conf_path = folder / CONFIG_FILE
    conf = _read_json(conf_path)
    if conf.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(f"{conf_path}: peft_type {conf.get('peft_type')!r}; only {PEFT_TYPE} is read")
    if conf.get("target_modules") not in (None, "self_attn"):
        raise CheckpointError(f"{conf_path}: target_modules {conf['target_modules']!r}; LLaMA's is self_attn")
    try:
        length, n_adapted = int(conf["adapter_len"]), int(conf["adapter_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{conf_path}: adapter_len and adapter_layers must be integers ({e})") from None
    tensors, path = _read_tensors(folder)
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
        else:
            (prompts if m[2] == "adaption_prompt" else gates)[int(m[1])] = value
    if unknown:
        raise CheckpointError(f"{path}: keys that are not AdaptionPrompt's: {preview_names(unknown)}")
    layers = sorted(prompts)
    if layers != sorted(gates) or len(layers) != n_adapted:
        raise CheckpointError(f"{path}: prompts in layers {layers}, gates in {sorted(gates)}; "
                              f"{CONFIG_FILE} says {n_adapted} layers")
    llama = model_cfg.llama if isinstance(model_cfg, ModelConfig) else model_cfg
    if llama is not None and layers != list(range(llama.n_layers - n_adapted, llama.n_layers)):
        raise CheckpointError(f"{path}: prompts in layers {layers}, but PEFT adapts the top {n_adapted} of the "
                              f"base's {llama.n_layers} layers")
    dim = llama.dim if llama is not None else prompts[layers[0]].shape[-1]
    for i in layers:
        if tuple(prompts[i].shape) != (1, length, dim) or gates[i].numel() != 1:
            raise CheckpointError(f"{path}: layer {i}'s prompt is {tuple(prompts[i].shape)} and gate "
                                  f"{tuple(gates[i].shape)}; expected (1, {length}, {dim}) and (1,)")
    state: dict[str, torch.Tensor] = {
        "adapter_query.weight": torch.cat([prompts[i][0] for i in layers]),  # L x [P, dim] -> [L * P, dim]
    }
    for i in layers:
        state[f"llama.layers.{i}.attention.prompt_gate.gate"] = gates[i].reshape(1, 1, 1, 1)  # one gate for all heads
    layout = {"adapter_layers": tuple(layers), "visual_layers": (), "prompt_len": length, "gate_fn": "identity",
              "gate_per_head": False, "bias": False, "scale": False, "lora_rank": 0, "new_gate": False}
    return AdapterCheckpoint(state, config=conf, layout=layout)


# --- writing ---------------------------------------------------------------------------------------------


def peft_obstacles(model: MultimodalLlama, base: StateDict | None = None) -> list[str]:
    """What about this model's adapter PEFT's AdaptionPrompt cannot express (empty: it can all be
    written). Tuned parts left at their neutral values (zero bias, unit scale, zero LoRA up-projection)
    express nothing and pass. ``base`` (the base's tensors, our names) also checks that the RMSNorm
    weights are the base's; without it a model whose adapter tuned them cannot be told apart."""
    cfg = model.config
    a, n = cfg.adapter, cfg.llama.n_layers
    problems: list[str] = []
    if model.has_vision:
        problems.append("a visual part (CLIP and resampler): PEFT has no visual tokens")
    if not a.adapter_layers:
        problems.append("no adaption prompts")
    elif tuple(a.adapter_layers) != tuple(range(n - len(a.adapter_layers), n)):
        problems.append(f"prompts in layers {list(a.adapter_layers)}: PEFT puts them in the top layers")
    for i in a.prompted_layers:
        g = model.llama.layers[i].attention.prompt_gate().detach()  # [1, H or 1, 1, 1]
        if not torch.all(g == g.flatten()[0]):
            problems.append(f"layer {i}'s gate differs between heads (PEFT has one per layer)")
    tuned = []
    with torch.no_grad():
        for name, p in model.llama.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ((leaf == "bias" and torch.any(p != 0)) or (leaf == "scale" and torch.any(p != 1))
                    or (leaf == "lora_b" and torch.any(p != 0))):
                tuned.append(f"llama.{name}")
            elif base is not None and name.endswith("norm.weight") and not torch.equal(p.cpu(), base[name].to(p.dtype).cpu()):
                tuned.append(f"llama.{name}")
    if tuned:
        problems.append(f"tuned tensors PEFT does not have: {preview_names(tuned, 6)}")
    return problems


def export_peft_adaption_prompt(model: MultimodalLlama, folder: str | os.PathLike, base: StateDict | None = None,
                                base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as a PEFT AdaptionPrompt folder that ``PeftModel.from_pretrained`` loads
    onto the same base in Hugging Face form. A tanh or per-head gate is written as its value when every
    head has the same one; anything else PEFT cannot express raises a ValueError naming it."""
    problems = peft_obstacles(model, base)
    if problems:
        raise ValueError(f"PEFT's AdaptionPrompt cannot express this adapter: {'; '.join(problems)}")
    a = model.config.adapter
    rows = model.adapter_query.weight.detach().view(len(a.adapter_layers), a.prompt_len, -1)  # [L, P, dim]
    tensors: dict[str, torch.Tensor] = {}
    for j, i in enumerate(a.adapter_layers):
        gate = model.llama.layers[i].attention.prompt_gate().detach().flatten()[:1]  # [1]: the value PEFT multiplies by
        tensors[f"{_PREFIX}.{i}.self_attn.adaption_prompt"] = rows[j][None].clone().cpu()  # [1, P, dim]
        tensors[f"{_PREFIX}.{i}.self_attn.adaption_gate"] = gate.clone().cpu()
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "adapter_len": a.prompt_len,
              "adapter_layers": len(a.adapter_layers), "target_modules": "self_attn",
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "revision": None,
              "auto_mapping": None}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
