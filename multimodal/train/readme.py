"""weights/demo/README.md, written by the demo command itself so the numbers in it (sizes, times, losses,
evaluation) are the ones measured on the run that produced the files."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..config import DEMO_CLIP, DEMO_RESAMPLER, LlamaConfig, build_preset
from ..options import DEMO_FILES

_TEMPLATE = """# The demo model

A complete, tiny LLaMA-Adapter V2 multimodal model that the project trains itself, from nothing, on a
synthetic "toy world" of coloured shapes. It is what the app loads when no real weights are present
(`--model auto` / `--model demo`), so a fresh checkout is a working multimodal assistant, and the test
suite uses it as an end-to-end proof that visual information flows through the early gated layers.

## Files (same formats as the real weights)

| file | what | size |
|---|---|---|
{files}

Total: {total}.

- `params.json` + `consolidated.00.pth`: the language model, Meta's format and key names (fp16):
  LLaMA with dim {dim}, {layers} layers, {heads} heads, vocabulary {vocab}.
- `tokenizer.model`: its own SentencePiece BPE model, Meta's conventions (unk 0, bos 1, eos 2, no pad,
  byte fallback); pieces are words or parts of words, one token per attribute word.
- `clip.pt`: a whole CLIP in OpenAI's state-dict format (open_clip `CLIP(..., quick_gelu=True)`, fp16):
  ViT with {clip_size} px images, {patch} px patches, width {width}, {clip_layers} layers, output {out_dim};
  plus the tiny text tower it was trained against (the loader reads only `visual.*`).
- `adapter.pth`: the V2 adapter in the official format (`{{"model": ..., "config": ...}}`, official key
  names, only trainable parameters): resampler ({rdim}-wide, {rdepth} blocks, {queries} visual queries),
  visual tokens in layers {visual}, adaption prompts in layers {adapter}, gates, RMSNorm weights, biases,
  scales and rank-{lora} LoRA on every linear of the language model. Preset `demo` in
  `multimodal/config.py`; the loader reads the LoRA rank from the file.

## How it was produced

One seeded command, from the repository root:

```
python -m multimodal.train demo --out weights/demo --seed {seed}
```

It ran in **{total_time}** on this machine ({machine}, torch {torch}, {threads} threads):

| stage | what | time |
|---|---|---|
| 1 world | {images} images ({size} px) with captions and 1-3 turn conversations, {instructions} text instructions | {t_world} |
| 2 tokenizer | SentencePiece BPE, {vocab} pieces, on the world's formatted text | {t_tokenizer} |
| 3 language model | plain next-token training of the whole LLaMA on the same text, plus every question and the caption instruction with the image's caption as `Caption: ...` context (repeated {context_repeats}x), so that it learns to answer from its context ({lm_steps} steps, loss {lm_loss}); then frozen | {t_lm} |
| 4 CLIP | contrastive image-caption training of the whole CLIP, identical captions as shared positives, plus a cross-entropy per labelled attribute from linear heads on the CLS embedding and on the mean of all output tokens (what the resampler's queries see before they learn where to look), heads thrown away afterwards ({clip_steps} steps, contrastive loss {clip_loss}); then frozen | {t_clip} |
| 5 adapter | joint V2 training, base frozen, LoRA rank {lora} in the instruction group ({adapter_steps} steps; each step one caption batch and one instruction batch of {batch}; caption loss {cap_loss}, instruction loss {ins_loss}) | {t_adapter} |
| 6 evaluation | held-out images, with and without visual gates | {t_eval} |

Why stages 3 and 4 are shaped so: the visual tokens can only steer circuits the frozen language model
already has, and only pass on what CLIP already encodes. A language model trained without the
`Caption: ...` samples could not answer from a caption even when it was written in its prompt, and with
it the adapter stalled whatever visual tokens it was given; contrastive training alone left CLIP's
embedding reading colour but position and count near chance. Both are measured in the docstrings of
`multimodal/train/demo.py` and `multimodal/train/clip.py`. The language model's step count matters as
much: after 1000 steps it copied colour and size from a caption in its prompt but not a single shape's
name or its position (it had learned to copy the caption's last word instead), and the adapter then
never learned those two from the image; by 1600 steps it copies every attribute (docs/training.md).

Stage 5 is the paper's recipe: the caption loss trains only the visual group (resampler and the gates
of the visual layers), the instruction loss (questions about images, multi-turn chats, text-only
instructions) trains only the instruction group (adaption prompts, gates of the adapter layers, norms,
biases, scales, LoRA). Without LoRA the captions came out right but the answers to questions did not
(77% overall): that group alone could not turn visual tokens tuned on captions into answers. See
`docs/training.md`.

Prompts are exactly the app's: `format_prompt(...)` for single questions and captions
(`"Generate caption of this image"`), `format_chat(question, history)` for later turns.

Rerunning the command with the same seed regenerates the same world and repeats the same training; the
weights match to floating-point reordering (thread count and CPU type can change the last bits), and
the evaluation below is what to expect.

## What it can do, measured

```
python -m multimodal.evaluate --weights weights/demo --n {eval_n} --seed {eval_seed}
```

```
{report}
```

The bar: at least 90% exact overall with the gates, and chance level with the visual gates forced to
zero (the image cannot reach the language model then, so the gap is what came from the image).
**{{verdict}}**

It was also trained, but not measured here, on "Is the shape big or small?", reading eight words (cat,
dog, sun, car, tree, fish, book, moon), captions and descriptions ("A big red circle on the left."),
follow-up turns, and a few text instructions ("What can you do?", "What is the opposite of big?").
`training.json` holds every measured number of the run.

## What it cannot do

It knows nothing outside the toy world: six colours (red, green, blue, yellow, purple, orange), four
shapes (circle, square, triangle, diamond), one to four identical shapes, five positions, two sizes, the
eight words above, on a light background at {size} px. Real photos, other objects, mixed scenes, other
phrasings of questions, long answers, open chat and knowledge questions give confident nonsense. It is a
demonstration of the pipeline and a test fixture, not an assistant to rely on.
"""


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _t(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def write_readme(out: Path, summary: dict[str, Any]) -> Path:
    plan, times, losses = summary["plan"], summary["times_s"], summary["losses"]
    sizes = {f: (out / f).stat().st_size for f in DEMO_FILES}
    params = json.loads((out / "params.json").read_text())
    cfg = build_preset("demo", LlamaConfig.from_params(params))
    a = plan["adapter"]
    fmt = lambda pair: f"{pair[0]:.2f} -> {pair[1]:.2f}" if pair[0] is not None else "-"  # noqa: E731
    text = _TEMPLATE.format(
        files="\n".join(f"| `{f}` | {w} | {_size(sizes[f])} |" for f, w in zip(DEMO_FILES, (
            "LLaMA shape", "LLaMA weights", "tokenizer", "CLIP (vision + text)", "V2 adapter"))),
        total=_size(sum(sizes.values())), dim=params["dim"], layers=params["n_layers"], heads=params["n_heads"],
        vocab=params["vocab_size"], clip_size=DEMO_CLIP.image_size, patch=DEMO_CLIP.patch_size, width=DEMO_CLIP.width,
        clip_layers=DEMO_CLIP.layers, out_dim=DEMO_CLIP.output_dim, rdim=DEMO_RESAMPLER.dim, rdepth=DEMO_RESAMPLER.depth,
        queries=DEMO_RESAMPLER.n_queries, visual=list(cfg.adapter.visual_layers), adapter=list(cfg.adapter.adapter_layers),
        seed=summary["seed"], total_time=_t(times["total"]), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
        torch=torch.__version__, threads=plan["threads"], images=plan["images"], size=DEMO_CLIP.image_size,
        instructions=plan["instructions"], t_world=_t(times["world"]), t_tokenizer=_t(times["tokenizer"]),
        lm_steps=plan["lm_steps"], context_repeats=plan["context_repeats"], lm_loss=fmt(losses["language model"]), t_lm=_t(times["language model"]),
        clip_steps=plan["clip_steps"], clip_loss=fmt(losses["clip"]), t_clip=_t(times["clip"]),
        adapter_steps=a["steps"], lora=plan["lora_rank"], batch=a["batch_size"], cap_loss=fmt(losses["adapter caption"]),
        ins_loss=fmt(losses["adapter instruction"]), t_adapter=_t(times["adapter"]), t_eval=_t(times["evaluation"]),
        eval_n=plan["eval_n"], eval_seed=plan["eval_seed"], report=summary["evaluation_report"])
    e = summary["evaluation"]
    met = e["with_gates"]["overall"] >= 0.9 and e["gates_zeroed"]["overall"] <= e["chance"]["overall"] + 0.15
    verdict = ("This run meets the bar." if met else
               f"This run does NOT meet the bar: {e['with_gates']['overall']:.1%} overall with the gates "
               f"(chance {e['chance']['overall']:.1%}). The model is a working pipeline, not yet a good demo.")
    text = text.replace("{verdict}", verdict)
    (out / "training.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    path = out / "README.md"
    path.write_text(text)
    return path
