"""How far bfloat16 decoding moves SmolLM2's logits from float32, with dense weights and with the file's
4-bit codes (multimodal/int4.py).

    python scripts/int4_logits.py                  # 32 greedy steps after a real chat prompt
    python scripts/int4_logits.py --steps 64 --base PATH.gguf

Three models from the same GGUF file: float32 (the reference: its greedy tokens equal transformers',
tests/test_coded.py), bfloat16 with dense packed weights (--no-int4) and bfloat16 decoding from the codes
(the app's default). All three are fed the float32 model's greedy tokens, so every step compares the
same position; the prompt is read by each model's own prefill. Prints per model the largest and the
mean absolute logit change over the steps, and at how many steps the top token differs.
Not a test: it prints what it measured.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CHAT = [{"role": "user", "content": "Objects detected: 4 people (2 left, 1 centre, 1 right), 1 bus (centre).\n"
                                    "Text written in the image: \"cero emisiones\".\n\nDescribe the photo."}]


def main(argv: list[str] | None = None) -> int:
    from multimodal.loading import load_model
    from weights.packaged import require_packaged

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct's)")
    p.add_argument("--steps", type=int, default=32, help="decoding steps compared")
    a = p.parse_args(argv)
    base = a.base or require_packaged("smollm2-135m-instruct")
    kinds = {"float32": {"dtype": "float32"}, "bfloat16 dense": {"dtype": "bfloat16"},
             "bfloat16 int4": {"dtype": "bfloat16", "int4": True}}
    models = {k: load_model(base, device="cpu", max_seq_len=512, **kw) for k, kw in kinds.items()}
    tokenizer = models["float32"].tokenizer
    ids = tokenizer.encode_chat(CHAT)
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    with torch.inference_mode():
        for loaded in models.values():
            loaded.model.llama.setup_cache(batch=1)
        last = {k: m.model.llama(torch.tensor([ids]), 0, None, last_only=True) for k, m in models.items()}
        for step in range(a.steps):
            token = last["float32"].argmax(-1).view(1, 1)  # the reference's greedy token, fed to all
            for k, m in models.items():
                logits[k].append(last[k][0])
                last[k] = m.model.llama(token, len(ids) + step, None, last_only=True)
    ref = torch.stack(logits["float32"])  # [steps, vocab]
    print(f"{base.name}: {len(ids)} prompt tokens, {a.steps} decoding steps; logits against float32 "
          f"(largest |logit| {ref.abs().max():.1f})\n")
    print("| model | max abs change | mean abs change | steps whose top token differs |")
    print("|---|---:|---:|---:|")
    for k in ("bfloat16 dense", "bfloat16 int4"):
        got = torch.stack(logits[k])
        diff = (got - ref).abs()
        flips = int((got.argmax(-1) != ref.argmax(-1)).sum())
        print(f"| {k} | {diff.max():.3f} | {diff.mean():.4f} | {flips} of {a.steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
