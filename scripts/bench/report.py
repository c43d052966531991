"""The markdown report the benchmark prints, and its number formatting."""
from __future__ import annotations

import argparse
from typing import Any

from .machine import Plan
from .workers import CHECK_TOKENS


def ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:,.1f}"


def spread(variant: dict[str, Any], steps: int) -> str:
    """Range of decode tok/s over the repeats: shows how noisy the machine was."""
    rates = [steps / r["decode"] for r in variant["all_runs"]]
    return f"{min(rates):.2f} – {max(rates):.2f}"


def mib(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def report(plan: Plan, a: argparse.Namespace, info: dict[str, Any], bw: dict[str, float],
           ours: dict[str, Any], hf: dict[str, Any], check: dict[str, Any], bound: dict[str, float]) -> str:
    """The markdown the script prints (and writes with --markdown)."""
    ad, pl, lm = ours["adapter"], ours["plain"], hf["lm"]
    steps = a.new_tokens - 1
    image_s = ad["clip"] + ad["resampler"] + ad["prompt_kv"]
    hf_ttft = image_s + lm["prefill"] + lm["sample"]
    tps = {k: steps / v["decode"] for k, v in (("ad", ad), ("pl", pl), ("hf", lm))}
    gpu = f", {info['gpu']} ({info['gpu_mem_gib']} GiB)" if "gpu" in info else ""
    busy = info["load_avg_start"] > info["cores"]  # at the start nothing of the run is counted yet
    lines = [
        f"### {plan.shape} · {plan.device.type} · {a.dtype} · {a.prompt_tokens} prompt tokens · "
        f"{a.new_tokens} new tokens · median of {a.repeats}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
        f"{info['ram_gib']} GiB RAM{gpu}; {info.get('thp', 'huge pages not recorded')}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']} (attention: {hf['attn_implementation']}); "
        f"the two implementations ran {info['schedule']}. 1-minute load average at start / end: "
        f"{info['load_avg_start']:.2f} / {info['load_avg_end']:.2f}"
        f"{' (above the core count: other jobs shared the CPU)' if busy else ' (the run itself uses the cores)'}.",
        f"Memory bandwidth ({plan.device.type}, 1 GiB fp32, best of 10, measured before / after the run): "
        f"read {bw['read_gbs_before']:.1f} / {bw['read_gbs_after']:.1f} GB/s, copy (read+write) "
        f"{bw['copy_gbs_before']:.1f} / {bw['copy_gbs_after']:.1f} GB/s.",
        f"Model: {plan.cfg.name} layout; LLaMA dim {plan.cfg.llama.dim}, {plan.cfg.llama.n_layers} layers, "
        f"{plan.cfg.llama.n_heads} heads / {plan.cfg.llama.kv_heads} KV heads, FFN {plan.cfg.llama.ffn_hidden_dim}, "
        f"vocab {plan.cfg.llama.vocab_size}; CLIP width {plan.cfg.clip.width} x {plan.cfg.clip.layers} layers, "
        f"patch {plan.cfg.clip.patch_size} at {plan.cfg.clip.image_size} px; prompted layers "
        f"{len(plan.cfg.adapter.prompted_layers)} (gates opened: {ours['gates_opened']}).",
        f"Parameters: LLaMA {bound['llama_params'] / 1e6:,.1f} M, CLIP {bound['clip_params'] / 1e6:,.1f} M, "
        f"adapter + resampler {bound['adapter_params'] / 1e6:,.1f} M.",
        "",
        "| ms unless stated | ours: image + question | ours: LLaMA only (no prompts) | transformers LlamaForCausalLM | ratio ours/HF |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| CLIP encode | {ms(ad['clip'])} | — | — | |",
        f"| resampler | {ms(ad['resampler'])} | — | — | |",
        f"| prompt K/V (all layers) | {ms(ad['prompt_kv'])} | — | — | |",
        f"| prefill {a.prompt_tokens} tokens (LM only) | {ms(ad['prefill'])} | {ms(pl['prefill'])} | "
        f"{ms(lm['prefill'])} | {ad['prefill'] / lm['prefill']:.2f} (LLaMA only: {pl['prefill'] / lm['prefill']:.2f}) |",
        f"| first greedy sample | {ms(ad['sample'])} | {ms(pl['sample'])} | {ms(lm['sample'])} | |",
        f"| **time to first token** | {ms(ad['ttft'])} | {ms(pl['ttft'])} | {ms(hf_ttft)} ¹ | "
        f"{ad['ttft'] / hf_ttft:.2f} |",
        f"| **decode tok/s** ({steps} steps) | {tps['ad']:.2f} | {tps['pl']:.2f} | {tps['hf']:.2f} | "
        f"{tps['ad'] / tps['hf']:.2f} (LLaMA only: {tps['pl'] / tps['hf']:.2f}) |",
        f"| ms per decode step | {ms(ad['decode'] / steps)} | {ms(pl['decode'] / steps)} | "
        f"{ms(lm['decode'] / steps)} | |",
        f"| decode tok/s, slowest – fastest repeat | {spread(ad, steps)} | {spread(pl, steps)} | "
        f"{spread(lm, steps)} | |",
    ]
    if plan.device.type == "cuda":
        lines += [
            f"| CUDA weights allocated (MiB) | {mib(ours['cuda_weights_mib'])} | (same process) | "
            f"{mib(hf['cuda_weights_mib'])} | |",
            f"| CUDA peak allocated while timing (MiB) | {mib(ad['cuda_peak_mib'])} | {mib(pl['cuda_peak_mib'])} | "
            f"{mib(lm['cuda_peak_mib'])} | |",
        ]
    lines += [
        f"| RSS after build (MiB) | {mib(ours['rss_built_mib'])} | (same process) | {mib(hf['rss_built_mib'])} | |",
        f"| peak RSS of the process (MiB) | {mib(ours['peak_rss_mib'])} | (same process) | "
        f"{mib(hf['peak_rss_mib'])} | |",
    ]
    if "generate" in hf:
        ours_total = pl["prefill"] + pl["sample"] + pl["decode"]
        gen = hf["generate"]["generate"]
        lines.append(f"| {a.new_tokens} tokens, LM only: our loop vs HF generate() | | {ms(ours_total)} | "
                     f"{ms(gen)} | {ours_total / gen:.2f} |")
    lines += [
        "",
        "¹ transformers has no image path: its time to first token is its LM prefill + first sample plus "
        "our measured image cost (CLIP + resampler + prompt K/V). Prefill rows are the language model "
        "alone on both sides (ours also attends to the 10-token prompts in every prompted layer). "
        "Ratios of times: < 1 means ours is faster; ratio of tok/s: > 1 means ours is faster.",
        "",
        f"Decode bound from bandwidth: {bound['weight_bytes_per_token'] / 1e9:.2f} GB of LM weights read per "
        f"token / {bw['read_gbs']:.1f} GB/s = **{bound['bound_tok_s']:.1f} tok/s** at most "
        f"(ours reaches {tps['ad'] / bound['bound_tok_s']:.0%}, transformers {tps['hf'] / bound['bound_tok_s']:.0%}).",
        f"Correctness (gates closed): first {CHECK_TOKENS} greedy tokens "
        f"{'match' if check['tokens_match'] else 'DIFFER'} ({check['ours_tokens']}); max |logit diff| of the first "
        f"step {check['max_abs_logit_diff']:.3g} (logits up to {check['logit_scale']:.3g}). "
        f"Opening the gates moves those logits by up to {ours['gate_effect_max_abs']:.3g}.",
        f"Build (random fill) time: ours {ours['build_s']:.1f} s, transformers {hf['build_s']:.1f} s.",
        weights_line(ours, a),
    ]
    if ours["lora_merged"]:
        lines.append(f"LoRA (rank {plan.cfg.adapter.lora_rank}, up-projection at its zero init, so the check above "
                     f"still holds) merged into {ours['lora_merged']} of our linear weights as the app loads it; "
                     "wk/wv keep theirs apart (the prompts use their bare weights).")
    if ours["compiled"]:
        warm = ", ".join(f"{k} {v:.1f} s" for k, v in ours["warmup_s"].items())  # 'plain' compiles anew (no prompts)
        lines.append(f"Our decode steps: **torch.compile**d (`--compile`, fixed-shape `Transformer.step`"
                     f"{', CUDA graphs' if plan.device.type == 'cuda' else ''}); its greedy tokens "
                     f"{'match' if ours['compiled_tokens_match'] else 'DIFFER FROM'} the eager path's (gates open). Compiling: "
                     f"{ours['compile_s']:.1f} s in the check (image prompts), then warm-up runs: {warm}.")
    return "\n".join(lines)


def weights_line(ours: dict[str, Any], a: argparse.Namespace) -> str:
    """How our LM's weights were held: packed for oneDNN, int8, or as built (transformers: as built)."""
    if "int8" in ours:
        q = ours["int8"]
        return (f"Our LM weights: **int8 weight-only** (torchao), transformers' in {a.dtype}; the bound above is "
                f"for {a.dtype} weights. Against the same model unquantised (gates open, first step): max |logit "
                f"diff| {q['max_abs_logit_diff']:.3g} (logits up to {q['logit_scale']:.3g}), relative L2 "
                f"{q['rel_l2']:.3g}, greedy tokens the same at {q['greedy_same']} of {CHECK_TOKENS}; RSS after "
                f"quantising {mib(q['rss_quantized_mib'])} MiB" +
                (f", CUDA weights {mib(q['cuda_weights_mib'])} MiB." if q["cuda_weights_mib"] is not None else "."))
    n = ours["packed_linears"]
    if n:
        return (f"Our LM weights: {a.dtype}, **prepacked for oneDNN** ({n} linear layers, multimodal/packing.py, "
                f"as load_model does here); transformers' as built (`--pack off` to compare without).")
    why = "`--pack off`" if a.pack == "off" else "packing pays only for bfloat16 on a CPU with native oneDNN bf16"
    return f"Our LM weights: {a.dtype}, as built (not packed: {why}); transformers' the same."
