"""python -m multimodal.train {adapter,demo} ...

  adapter  train a V2 adapter on a frozen LLaMA + CLIP from caption data (CSV/JSONL) and instruction
           data (Alpaca/LLaVA JSON); works under torchrun (DDP) and with mixed precision on GPUs.
  demo     build the project's demo model end to end from one seed (weights/demo).
  findings bias-tune SmolLM2-135M-Instruct to answer from the experts' findings
           (weights/smollm2-findings/adapter.pth, the app's default adapter for it).

Examples:
  python -m multimodal.train demo --out weights/demo --seed 0
  python -m multimodal.train adapter --preset v2-early --llama-dir weights/llama-7b/7B \\
      --tokenizer weights/llama-7b/tokenizer.model --clip weights/clip/ViT-L-14.pt \\
      --captions cc3m.csv --instructions alpaca_gpt4_data.json llava_instruct_150k.json --image-root data/ \\
      --out runs/v2 --steps 20000 --batch-size 4 --grad-accum 8
  torchrun --nproc_per_node 8 -m multimodal.train adapter --preset official-7b --phase pretrain ...
  torchrun --nproc_per_node 8 -m multimodal.train adapter --preset official-7b --phase finetune \\
      --init runs/pretrain/adapter.pth --instructions llava_instruct_150k.json ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..config import PRESETS
from .data import read_captions, read_instructions
from .distributed import finish, init_world
from .groups import PHASES
from .trainer import TrainConfig


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="v2-early", choices=PRESETS, help="model layout (default v2-early)")
    p.add_argument("--phase", default="joint", choices=PHASES,
                   help="joint: the paper's recipe (captions -> visual group, instructions -> instruction group); "
                        "pretrain / finetune: the released code's two phases")
    p.add_argument("--llama-dir", required=True, help="Meta LLaMA folder (params.json, consolidated.*.pth)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model")
    p.add_argument("--clip", required=True, help="OpenAI-format CLIP file")
    p.add_argument("--init", help="adapter checkpoint to start from (e.g. the pretrain phase's adapter.pth)")
    p.add_argument("--captions", nargs="*", default=[], help="image-caption files: .csv/.tsv (header) or .jsonl")
    p.add_argument("--instructions", nargs="*", default=[], help="Alpaca and/or LLaVA JSON files")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: each data file's folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder (adapter.pth, train_state.pt, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--lora-rank", type=int, help="add LoRA of this rank (trained in finetune/joint)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="dtype of the frozen base: float32, bfloat16, float16 (default: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "phase":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(getattr(defaults, f.name), bool):  # on by default: --no-X; off by default: --X
            on = getattr(defaults, f.name)
            p.add_argument("--no-" + f.name.replace("_", "-") if on else flag, dest=f.name,
                           action="store_false" if on else "store_true", default=on)
        else:
            kind = type(getattr(defaults, f.name))
            p.add_argument(flag, type=kind, default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}")


def run_adapter(args: argparse.Namespace) -> int:
    from .build import load_for_training
    from .trainer import train_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    world, device = init_world(args.device)
    torch.manual_seed(args.seed + world.rank)
    try:
        captions = [s for f in args.captions for s in read_captions(f, args.image_root)]
        instructions = [s for f in args.instructions for s in read_instructions(f, args.image_root)]
        if world.main:
            print(f"{len(captions)} caption samples, {len(instructions)} instruction samples; world size {world.size}, "
                  f"device {device}", file=sys.stderr)
        loaded = load_for_training(args.llama_dir, args.tokenizer, args.clip, args.preset, args.init, device,
                                   args.dtype, args.lora_rank)
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        result = train_adapter(loaded, captions, instructions, cfg, args.out, world, device, resume=args.resume)
        if world.main and result.history:
            last = {k: round(v, 4) for k, v in result.history[-1].items()}
            print(f"wrote {result.adapter_path}; last step: {json.dumps(last)}", file=sys.stderr)
    finally:
        finish(world)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoPlan, build_demo

    start = time.perf_counter()
    plan = replace(DemoPlan.smoke() if args.smoke else DemoPlan(), threads=args.threads)
    summary = build_demo(args.out, args.seed, plan, args.work, progress=not args.no_progress)
    print(summary["evaluation_report"])
    sizes = {p.name: p.stat().st_size for p in sorted(Path(args.out).iterdir()) if p.is_file()}
    print("files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + f"; total {sum(sizes.values()) / 1e6:.2f} MB")
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["times_s"].items()))
    print(f"demo model written to {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _adapter_args(sub.add_parser("adapter", help="train an adapter on your data"))
    demo = sub.add_parser("demo", help="build the demo model end to end")
    demo.add_argument("--out", type=Path, default=Path("weights/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--work", type=Path, help="keep the generated world and training logs here")
    demo.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, what the README's time is for)")
    demo.add_argument("--smoke", action="store_true", help="a seconds-long miniature of the recipe (tests the command)")
    demo.add_argument("--no-progress", action="store_true")
    findings = sub.add_parser("findings", help="bias-tune SmolLM2 to answer from the experts' findings")
    findings.add_argument("--out", type=Path, default=Path("weights/smollm2-findings/adapter.pth"))
    findings.add_argument("--base", type=Path, help="a chat base (GGUF or Hugging Face folder); default: SmolLM2 "
                                                   "from its registry package")
    findings.add_argument("--seed", type=int, default=0)
    findings.add_argument("--examples", type=int, help="made-up exchanges (default: the recipe's)")
    findings.add_argument("--threads", type=int, default=2)
    findings.add_argument("--smoke", action="store_true", help="a seconds-long miniature (tests the command)")
    args = parser.parse_args(argv)
    if args.command == "findings":
        return run_findings(args)
    return run_adapter(args) if args.command == "adapter" else run_demo(args)


def run_findings(args: argparse.Namespace) -> int:
    from weights.packaged import require_packaged

    from ..loading import load_model
    from .findings import FindingsPlan, tune

    plan = FindingsPlan.smoke() if args.smoke else FindingsPlan()
    plan = replace(plan, seed=args.seed, threads=args.threads,
                   **({"examples": args.examples} if args.examples else {}))
    base = args.base or require_packaged("smollm2-135m-instruct")
    loaded = load_model(base, device="cpu", dtype="float32", pack=False)
    summary = tune(loaded, plan, args.out)
    print(f"adapter written to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {summary['seconds']} s: "
          f"{summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
