"""Benchmarks on real bases: our decoding next to transformers' on the same file, and loading memory.

    python scripts/bench_base.py --base PATH.gguf --new-tokens 64 --repeats 3
    python scripts/bench_base.py --memory --shape 1b --gguf PATH.gguf
    python scripts/bench_base.py --base PATH.gguf --llama-cpp --prompt long --new-tokens 64

``--llama-cpp`` adds llama.cpp (llama-cpp-python, a benchmark-only extra: bench-requirements.txt) on the
same GGUF file as a third peer: the same prompt ids, greedy tokens and threads, its own process,
interleaved; a three-way table with ours / llama.cpp speed ratios follows the report.

``--base`` (a .gguf file or a Hugging Face folder): our model loaded by ``load_model`` (no adapter, no
CLIP: a text-only model) in float32 (dequantized weights) and, where the CPU runs bf16 natively, in
bfloat16 (packed, as load_model does by default) and, for a GGUF file, bfloat16 decoding from the
file's 4-bit codes (``ours-bfloat16-int4``: load_model(int4=True), what the app runs); transformers' ``AutoModelForCausalLM`` from the same
file in float32. The same chat prompt (the base's chat template), the same number of greedy tokens
(EOS ignored), the same threads; each model in its own process (peak RSS is per process), their
timed runs interleaved; medians reported. The greedy tokens of our float32 model must equal
transformers' for the first ``--check-tokens``.

``--memory``: a random Hugging Face folder of ``--shape`` (1b: TinyLlama's shape) written by
transformers' ``save_pretrained`` in bf16 safetensors, then loaded by ``load_model(dtype=bfloat16)`` in a
fresh process: peak RSS over the baseline after the imports, against the weights' size. ``--gguf``
also times loading that GGUF file the same way.

This is a separate script rather than a mode of scripts/benchmark.py: that one builds random models
of named shapes with the image path and fills both sides with seeded weights; this one reads files,
tokenizes a real chat, and has a loading-memory mode with nothing to compare against.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.base_report import report
from bench import llamacpp_worker
from bench.base_workers import Spec, Worker, run_once, serve_spec
from bench.machine import machine_info

MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue during the day and "
                                        "why sunsets look red."}]
# --prompt long: about 256 prompt tokens with SmolLM2's template, the prefill length the CPU work targets
PASSAGE = ("Sunlight looks white, but it is a mixture of every colour of the visible spectrum, from violet "
           "and blue at the short wavelengths to orange and red at the long ones. On its way down through the "
           "atmosphere the light meets nitrogen and oxygen molecules that are far smaller than its wavelength. "
           "Such small particles scatter light with a strength that grows as the inverse fourth power of the "
           "wavelength, so blue light is scattered roughly five times as strongly as red light. Wherever we look "
           "in the daytime sky we see this scattered light, and it is dominated by "
           "blue. Violet is scattered even more, yet the sky does not look violet: the sun emits less of it, part "
           "of it is absorbed high in the atmosphere, and our eyes are less sensitive to it. At sunrise and "
           "sunset the light crosses a much longer path through the air before it reaches us, so most of the "
           "blue is scattered out of the direct beam long before it arrives. What remains is the orange and red "
           "light that colours the sun and the clouds near the horizon.")
LONG_MESSAGES = [{"role": "user", "content": PASSAGE + " Summarise this passage in three sentences, then say "
                                                       "which single fact in it you find the most surprising."}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="a .gguf file or a Hugging Face folder: time ours vs transformers")
    p.add_argument("--dtypes", default="auto",
                   help="our precisions, comma-separated (auto: float32, and bfloat16 where the CPU runs it natively)")
    p.add_argument("--hf-dtypes", default="float32",
                   help="transformers' precisions, comma-separated; its float32 is the reference of the token check")
    p.add_argument("--prompt", choices=("short", "long"), default="short",
                   help="the chat: short (about 50 tokens with SmolLM2's template) or long (about 256)")
    p.add_argument("--compile", action="store_true",
                   help="also ours in float32 with the compiled decoding step (Engine(compile=True)), which reads a "
                        "GGUF file's Q4_0/Q4_1/Q8_0 codes instead of dequantized weights (multimodal/coded.py)")
    p.add_argument("--llama-cpp", action="store_true",
                   help=f"with --base FILE.gguf: also llama.cpp on the same file ({llamacpp_worker.INSTALL})")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per run, the first included; EOS ignored")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model after a warm-up; median reported")
    p.add_argument("--check-tokens", type=int, default=16,
                   help="our float32 greedy tokens must equal transformers' for this many")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every worker")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing, profile this many decode steps of each model with torch.profiler")
    p.add_argument("--memory", action="store_true", help="measure loading memory on a random Hugging Face folder")
    p.add_argument("--shape", choices=("tiny", "1b"), default="1b", help="the random folder's shape (--memory)")
    p.add_argument("--shard-size", default="2GB", help="save_pretrained's max_shard_size for the folder (--memory)")
    p.add_argument("--folder-dir", type=Path, default=None, help="where the temporary folder goes (default: /tmp)")
    p.add_argument("--gguf", type=Path, help="with --memory: also time loading this GGUF file, float32 and bfloat16")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--markdown", type=Path, help="write the printed report here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is None and a.base is None and not a.memory:
        p.error("give --base PATH, --memory, or both")
    if a.new_tokens < 2 or a.repeats < 1 or a.check_tokens < 1:
        p.error("need --new-tokens >= 2, --repeats >= 1, --check-tokens >= 1")
    if a.llama_cpp:
        if a.base is None or a.base.suffix != ".gguf":
            p.error("--llama-cpp needs --base FILE.gguf: llama.cpp reads GGUF files only")
        if not llamacpp_worker.available():
            p.error(f"--llama-cpp: llama_cpp is not installed; install the benchmark extra with "
                    f"`{llamacpp_worker.INSTALL}` (builds llama.cpp from source)")
    return a


def our_dtypes(choice: str) -> list[str]:
    from multimodal.packing import packing_pays

    if choice != "auto":
        return [d.strip() for d in choice.split(",") if d.strip()]
    return ["float32"] + (["bfloat16"] if packing_pays("cpu", torch.bfloat16) else [])


def log(message: str) -> None:
    print(f"[bench_base] {message}", file=sys.stderr, flush=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- --base: ours vs transformers -------------------------------------------------------------------------


def prompt(base: Path, chat: list[dict[str, str]] = MESSAGES) -> tuple[list[int], list[dict[str, str]], dict[str, Any]]:
    """The chat prompt's ids from our tokenizer (the base's chat template), and what the base is."""
    from multimodal.formats import read_base

    files = read_base(base)
    tok, c = files.tokenizer, files.config
    if tok.chat_template:
        ids, messages = tok.encode_chat(chat), chat
    else:  # a base without a chat template: the plain question
        ids, messages = tok.encode(chat[0]["content"], bos=tok.add_bos), []
    described = {"path": str(base), "format": files.format, "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                 "n_kv_heads": c.kv_heads, "ffn": c.ffn_hidden_dim, "vocab": c.vocab_size, "tied": c.tie_embeddings,
                 "file_mib": sum(f.stat().st_size for f in ([base] if base.is_file() else base.iterdir())) / 2**20,
                 "chat_template": bool(tok.chat_template)}
    return ids, messages, described


def compare_decoding(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from multimodal.int4 import int4_available

    ids, messages, described = prompt(a.base, LONG_MESSAGES if a.prompt == "long" else MESSAGES)
    common = {"base": str(a.base), "threads": a.threads, "ids": ids, "new_tokens": a.new_tokens,
              "max_seq_len": len(ids) + a.new_tokens + 8, "profile_steps": a.profile_steps}
    specs = {f"ours-{d}": Spec(kind="ours", dtype=d, **common) for d in our_dtypes(a.dtypes)}
    if "ours-bfloat16" in specs and a.base.suffix == ".gguf" and int4_available("cpu", torch.bfloat16):
        # the app's default for a GGUF base in bfloat16 on the CPU: decoding reads the 4-bit codes (int4.py)
        specs["ours-bfloat16-int4"] = Spec(kind="ours", dtype="bfloat16", int4=True, **common)
    if a.compile:
        specs["ours-float32-compiled"] = Spec(kind="ours", dtype="float32", compile=True, **common)
    for d in dict.fromkeys(["float32", *our_dtypes(a.hf_dtypes)]):  # float32 always: the token check's reference
        specs[f"transformers-{d}"] = Spec(kind="hf", dtype=d, messages=messages if d == "float32" else [], **common)
    if a.llama_cpp:  # the same ids: all three prefill the same tokens
        specs[llamacpp_worker.NAME] = Spec(kind="llamacpp", **common)
    log(f"{a.base}: {len(ids)} prompt tokens, {a.new_tokens} new tokens, {a.threads} threads; loading "
        f"{', '.join(specs)} side by side")
    workers = {name: Worker(name, spec, tmp) for name, spec in specs.items()}
    for w in workers.values():
        w.ready()
    for r in range(a.repeats):  # interleaved: a slow patch of a shared machine hits every model
        log(f"repeat {r + 1}/{a.repeats}")
        for w in workers.values():
            w.run()
    results = {name: w.close() for name, w in workers.items()}
    steps = a.new_tokens - 1
    for res in results.values():
        res["tok_s"] = steps / res["median"]["decode"]
        res["tok_s_range"] = [steps / r["decode"] for r in res["all_runs"]]
        res["tok_s_best"] = max(res["tok_s_range"])  # on a shared machine: the repeat least disturbed
    hf = results["transformers-float32"]
    check = {"check_tokens": min(a.check_tokens, a.new_tokens), "hf_tokens": hf["tokens"],
             "prompt_ids_match": hf.get("prompt_ids_match")}
    for name, res in results.items():
        if name.startswith("ours-"):
            dtype = name.removeprefix("ours-")
            check[f"common_prefix_{dtype}"] = common_prefix(res["tokens"], hf["tokens"])
            res["ratio_vs_transformers"] = res["tok_s"] / hf["tok_s"]
            res["best_ratio_vs_transformers"] = res["tok_s_best"] / hf["tok_s_best"]
            same = results.get(f"transformers-{dtype}")
            if same is not None and same is not hf:  # the same precision on both sides
                res["ratio_vs_transformers_same_dtype"] = res["tok_s"] / same["tok_s"]
    if llamacpp_worker.NAME in results:  # reported, not gated: llama.cpp computes on the quantized weights
        check[f"common_prefix_{llamacpp_worker.NAME}"] = common_prefix(results[llamacpp_worker.NAME]["tokens"],
                                                                       hf["tokens"])
    check["tokens_match"] = check.get("common_prefix_float32", 0) >= check["check_tokens"]
    return {"base": described, "prompt_tokens": len(ids), "new_tokens": a.new_tokens, "repeats": a.repeats,
            "models": results, "check": check}


# --- --memory: loading a 1B-shaped folder ------------------------------------------------------------------


def measure_memory(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.base_memory import write_random_hf_folder
    from bench.shapes import LLAMA_1B
    from multimodal.config import TINY_LLAMA

    cfg = LLAMA_1B if a.shape == "1b" else TINY_LLAMA
    out: dict[str, Any] = {"shape": a.shape, "shard_size": a.shard_size}
    with tempfile.TemporaryDirectory(dir=a.folder_dir, prefix="bench_base_hf_") as folder_name:
        folder = Path(folder_name)
        log(f"writing a random {a.shape} Hugging Face folder (bf16 safetensors, shards up to {a.shard_size}) in {folder}")
        written = write_random_hf_folder(folder, cfg, torch.bfloat16, a.shard_size)
        shards = sorted(folder.glob("*.safetensors"))
        out |= {"written_mib": written / 2**20, "shards": len(shards),
                "disk_mib": sum(f.stat().st_size for f in shards) / 2**20}
        log("loading it with load_model(dtype=bfloat16) in a fresh process")
        spec = Spec(kind="load", base=str(folder), dtype="bfloat16", threads=a.threads, max_seq_len=256)
        out["load"] = run_once("load-hf", spec, tmp)
    if a.gguf is not None:
        out["gguf"] = {}
        for dtype in our_dtypes("auto"):
            log(f"timing the load of {a.gguf} in {dtype}")
            out["gguf"][dtype] = run_once(f"load-gguf-{dtype}", Spec(kind="load", base=str(a.gguf), dtype=dtype,
                                                                    threads=a.threads, max_seq_len=256), tmp)
        out["gguf_path"] = str(a.gguf)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        spec = Spec.read(a.worker)
        if spec.kind == "llamacpp":  # its own module: llama_cpp is imported only in that worker
            from bench.workers import serve

            serve(llamacpp_worker.LlamaCppWorker(spec))  # type: ignore[arg-type]
        else:
            serve_spec(a.worker)
        return 0
    info = machine_info(torch.device("cpu")) | {"threads": a.threads, "load_avg_start": os.getloadavg()}
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "machine": info}
    with tempfile.TemporaryDirectory(prefix="bench_base_") as tmp_name:
        tmp = Path(tmp_name)
        if a.memory:
            result["memory"] = measure_memory(a, tmp)
        if a.base is not None:
            result["decode"] = compare_decoding(a, tmp)
    info["load_avg_end"] = os.getloadavg()
    text = report(result)
    if "decode" in result and llamacpp_worker.NAME in result["decode"]["models"]:
        text += "\n\n" + "\n".join(llamacpp_worker.three_way_lines(result["decode"]))
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if "decode" in result and not result["decode"]["check"]["tokens_match"]:
        print("correctness check failed: our float32 greedy tokens differ from transformers' within the first "
              f"{result['decode']['check']['check_tokens']}; the speed figures compare different work", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
