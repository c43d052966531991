"""The markdown that scripts/bench_base.py prints: decoding ours vs transformers, loading memory."""
from __future__ import annotations

from typing import Any

from .report import mib

TARGET_RATIO, TARGET_LOAD_S, TARGET_MEMORY = 1.3, 10.0, 1.15  # the figures the real-bases work aims at


def machine_line(m: dict[str, Any]) -> str:
    start, end = m["load_avg_start"], m.get("load_avg_end", m["load_avg_start"])
    busy = start[0] > m["cores"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; torch threads per worker "
            f"{m['threads']}; {m.get('thp', 'huge pages not recorded')}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. "
            f"Load average (1/5/15 min) at start {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, at end "
            f"{end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}"
            f"{' (above the core count: other jobs shared the CPU)' if busy else ''}.")


def decode_section(d: dict[str, Any]) -> list[str]:
    b, models, check = d["base"], d["models"], d["check"]
    steps = d["new_tokens"] - 1
    names = list(models)
    lines = [
        f"### {b['path']} ({b['format']}) · {d['prompt_tokens']} prompt tokens (chat template: "
        f"{'yes' if b['chat_template'] else 'none, plain text'}) · {d['new_tokens']} greedy tokens · median of {d['repeats']}",
        "",
        f"Base: dim {b['dim']}, {b['n_layers']} layers, {b['n_heads']} heads / {b['n_kv_heads']} KV heads, "
        f"FFN {b['ffn']}, vocab {b['vocab']}{', tied embeddings' if b['tied'] else ''}; "
        f"{b['file_mib']:,.1f} MiB on disk.",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        "| load (s) | " + " | ".join(f"{m['load_s']:.2f}" for m in models.values()) + " |",
        "| of which reading the files' header and tokenizer (s) | "
        + " | ".join(f"{m['read_s']:.2f}" if "read_s" in m else "—" for m in models.values()) + " |",
        "| prefill (ms) | " + " | ".join(f"{m['median']['prefill'] * 1e3:,.1f}" for m in models.values()) + " |",
        f"| **decode tok/s** ({steps} steps) | " + " | ".join(f"**{m['tok_s']:.2f}**" for m in models.values()) + " |",
        "| decode tok/s, best repeat | " + " | ".join(f"{m['tok_s_best']:.2f}" for m in models.values()) + " |",
        "| decode tok/s, slowest – fastest repeat | "
        + " | ".join(f"{min(m['tok_s_range']):.2f} – {max(m['tok_s_range']):.2f}" for m in models.values()) + " |",
        "| ratio to transformers float32 | "
        + " | ".join(f"{m['ratio_vs_transformers']:.2f}" if "ratio_vs_transformers" in m else "—" for m in models.values())
        + " |",
        "| ratio to transformers float32, best repeats | "
        + " | ".join(f"{m['best_ratio_vs_transformers']:.2f}" if "best_ratio_vs_transformers" in m else "—"
                     for m in models.values()) + " |",
        "| ratio to transformers in the same dtype | "
        + " | ".join(f"{m['ratio_vs_transformers_same_dtype']:.2f}" if "ratio_vs_transformers_same_dtype" in m
                     else f"{m['ratio_vs_transformers']:.2f}" if name.startswith("ours-float32") else "—"
                     for name, m in models.items()) + " |",
        "| RSS after imports (MiB) | " + " | ".join(mib(m["rss_start_mib"]) for m in models.values()) + " |",
        "| RSS after loading (MiB) | " + " | ".join(mib(m["rss_loaded_mib"]) for m in models.values()) + " |",
        "| peak RSS while loading (MiB) | " + " | ".join(mib(m["peak_rss_load_mib"]) for m in models.values()) + " |",
        "| peak RSS of the process (MiB) | " + " | ".join(mib(m["peak_rss_mib"]) for m in models.values()) + " |",
        "",
    ]
    first = check["check_tokens"]
    agree = ", ".join(f"{k.removeprefix('common_prefix_')} {v}" for k, v in check.items() if k.startswith("common_prefix_"))
    lines.append(f"Greedy tokens: our float32 {'**equals**' if check['tokens_match'] else '**DIFFERS FROM**'} "
                 f"transformers' for the first {first} (tokens equal from the start, of {d['new_tokens']}: {agree}).")
    pim = check.get("prompt_ids_match")
    lines.append("Prompt ids: " + ("ours equal transformers' `apply_chat_template`." if pim else
                                   "transformers' tokenizer has no chat template here; both took ours." if pim is None
                                   else "ours DIFFER from transformers' `apply_chat_template`; both took ours."))
    for name, m in models.items():
        if name.startswith("ours-") and m.get("packed_linears"):
            lines.append(f"{name}: {m['packed_linears']} linear weights prepacked for oneDNN (load_model's default).")
        if m.get("int4_linears"):
            lines.append(f"{name}: {m['int4_linears']} linear layers decode from the file's 4-bit codes "
                         "(int4 kernel; prefill reads the packed weights).")
    for name, m in models.items():
        if "ratio_vs_transformers" in m:
            ratio, best = m["ratio_vs_transformers"], m["best_ratio_vs_transformers"]
            lines.append(f"Target ≥ {TARGET_RATIO}x transformers float32, {name}: medians {ratio:.3f}x "
                         f"({'met' if ratio >= TARGET_RATIO else 'not met'}), best repeats {best:.3f}x.")
    for name, m in models.items():
        if "profile" in m:
            lines += ["", *profile_lines(name, m["profile"])]
    return lines


def profile_lines(name: str, p: dict[str, Any]) -> list[str]:
    share = p["ops_self_ms_per_step"] / p["wall_ms_per_step"]
    lines = [f"Profile of {name}, {p['steps']} decode steps (torch.profiler, CPU): {p['wall_ms_per_step']:.1f} ms "
             f"per step, of which ops {p['ops_self_ms_per_step']:.1f} ms ({share:.0%}; the rest is Python between "
             f"them), {p['op_calls_per_step']:.0f} op calls per step.", "",
             "| op | calls per step | self ms per step |", "| --- | ---: | ---: |"]
    lines += [f"| `{r['op']}` | {r['calls_per_step']:.0f} | {r['self_ms_per_step']:.2f} |" for r in p["top"]]
    return lines


def memory_section(mem: dict[str, Any]) -> list[str]:
    ld = mem["load"]
    over = ld["peak_rss_mib"] - ld["baseline_rss_mib"]
    lines = [
        f"### Loading a random {mem['shape']} Hugging Face folder (bf16 safetensors, {mem['shards']} shard(s) "
        f"of at most {mem['shard_size']}, {mem['disk_mib']:,.0f} MiB on disk) with load_model(dtype=bfloat16)",
        "",
        "| | MiB |",
        "| --- | ---: |",
        f"| weights in the model ({ld['params'] / 1e6:,.1f} M parameters) | {mib(ld['weights_mib'])} |",
        f"| RSS after the imports (baseline) | {mib(ld['baseline_rss_mib'])} |",
        f"| peak RSS (VmHWM) | {mib(ld['peak_rss_mib'])} |",
        f"| ru_maxrss | {mib(ld['ru_maxrss_mib'])} |",
        f"| **peak over the baseline** | **{mib(over)}** ({ld['load_over_weights']:.2f}x the weights) |",
        f"| sampled peak, anonymous memory | {mib(ld['peak_anon_mib'])} |",
        f"| sampled peak, file-backed pages | {mib(ld['peak_file_mib'])} |",
        f"| RSS after loading: anonymous / file-backed | {mib(ld['anon_after_mib'])} / {mib(ld['file_after_mib'])} |",
        "",
        f"Load time {ld['load_s']:.1f} s ({ld['packed_linears']} linear weights packed). Target ≤ {TARGET_MEMORY}x: "
        f"{'met' if ld['load_over_weights'] <= TARGET_MEMORY else 'NOT met'}.",
    ]
    if "gguf" in mem:
        lines += ["", f"### Loading {mem['gguf_path']} (fresh process each)", "",
                  "| dtype | header + tokenizer (s) | load_model (s) | peak RSS over baseline (MiB) | weights (MiB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for dtype, g in mem["gguf"].items():
            lines.append(f"| {dtype} | {g['read_s']:.2f} | {g['load_s']:.2f} | "
                         f"{mib(g['peak_rss_mib'] - g['baseline_rss_mib'])} | {mib(g['weights_mib'])} |")
        worst = max(g["load_s"] for g in mem["gguf"].values())
        lines += ["", f"load_model includes reading the header again. Target < {TARGET_LOAD_S:.0f} s: "
                      f"{'met' if worst < TARGET_LOAD_S else 'NOT met'} (slowest {worst:.1f} s)."]
    return lines


def report(result: dict[str, Any]) -> str:
    lines = [machine_line(result["machine"]), ""]
    if "memory" in result:
        lines += memory_section(result["memory"]) + [""]
    if "decode" in result:
        lines += decode_section(result["decode"])
    return "\n".join(lines).rstrip()
