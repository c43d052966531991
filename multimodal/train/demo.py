"""The demo model, end to end from one seed: ``python -m multimodal.train demo --out weights/demo --seed 0``.

Stages: (1) generate the toy world; (2) train a SentencePiece tokenizer on its text; (3) pretrain a tiny
LLaMA on that text, write it in Meta's format, and freeze it; (4) train a tiny CLIP contrastively on the
world's image-caption pairs, write it in OpenAI's format, and freeze it; (5) load both back through the
normal loader and train the V2 early-fusion adapter jointly (captions -> visual group, instructions ->
instruction group); (6) evaluate on held-out images, with and without the visual gates; (7) write the
README with the measured times and numbers.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..config import DEMO_CLIP, DEMO_LLAMA
from ..evaluate import evaluate, load_weights, report
from ..image import ImagePreprocessor, open_image
from ..prompt import CAPTION_INSTRUCTION, format_chat
from ..tokenizer import Tokenizer
from ..toyworld import LABELS, generate_world, labels, read_scenes
from .build import load_for_training
from .clip import build_clip, save_openai_clip, text_ids, train_clip
from .data import Sample, read_captions, read_instructions
from .lm import pretrain_lm, save_meta_llama
from .readme import write_readme
from .tokenizer import train_tokenizer
from .trainer import TrainConfig, train_adapter


DEMO_ADAPTER = TrainConfig(phase="joint", steps=1300, batch_size=32, lr=5e-3, warmup_steps=30, weight_decay=0.02,
                           max_len=96, cache_images=True)


@dataclass(frozen=True)
class DemoPlan:
    """Every size and step count of the demo recipe (the defaults are what weights/demo was built with)."""

    images: int = 6000
    # share of one-shape scenes, the only ones whose captions and questions carry a position; None: counts
    # uniform (a quarter)
    single_rate: float | None = 0.35
    instructions: int = 2000
    vocab_size: int = 800
    lm_steps: int = 1600
    lm_batch: int = 32
    lm_seq_len: int = 128  # holds a whole question with its caption context (about 55 tokens) twice
    lm_lr: float = 5e-3
    context_repeats: int = 4  # the samples with a caption in context, repeated in the LM's text (see with_caption_context)
    clip_images: int = 6000
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    adapter: TrainConfig = field(default_factory=lambda: replace(DEMO_ADAPTER))
    # LoRA rank (0: none) on every linear of the language model, in the instruction group: the bias/norm/prompt
    # group alone could not turn visual tokens tuned on captions into answers to questions (docs/training.md)
    lora_rank: int = 8
    eval_n: int = 200
    eval_seed: int = 1234
    threads: int = 2

    @classmethod
    def smoke(cls) -> "DemoPlan":
        """A minutes-less version of the same recipe, for tests of the command itself."""
        return cls(images=120, instructions=60, vocab_size=400, lm_steps=5, lm_batch=4, lm_seq_len=32, clip_images=60,
                   clip_steps=3, clip_batch=16, adapter=replace(DEMO_ADAPTER, steps=3, batch_size=4, warmup_steps=1),
                   eval_n=8)


def with_caption_context(files: dict[str, Path]) -> list[Sample]:
    """Text-only samples whose answer is in the prompt, laid out as the app lays out the caption
    expert's output (``Caption: ...`` in the Input section): every question of the conversations, and the
    caption instruction itself, with the image's caption as context.

    Why: the adapter's visual tokens can only steer circuits the frozen language model already has. A
    model that only ever guessed attribute words from the question has no circuit that reads them from
    its context, and then even perfect visual information barely moves it (measured: with an oracle
    table of visual tokens per attribute, the caption loss stalls at 0.44 nats per token; after this
    pretraining it falls to 0.09 in the same steps). Pretraining on these samples builds the circuit
    that copies an attribute from context to the answer, which the visual tokens then drive.
    """
    caption_of = {json.loads(line)["image"]: json.loads(line)["caption"] for line in files["captions"].read_text().splitlines()}
    out = [Sample(format_chat(CAPTION_INSTRUCTION, context=f"Caption: {c}"), c, None) for c in caption_of.values()]
    for item in json.loads(files["conversations"].read_text()):
        context = f"Caption: {caption_of[item['image']]}"
        turns = item["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            out.append(Sample(format_chat(q["value"].replace("<image>", "").strip(), context=context), a["value"], None))
    return out


def build_demo(out: str | Path, seed: int = 0, plan: DemoPlan = DemoPlan(), work: str | Path | None = None,
               progress: bool = True) -> dict:
    """Write weights/demo-style files to ``out`` and return what was measured. ``work`` keeps the
    generated world and training logs (default: a temporary folder, removed afterwards)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if work else tempfile.mkdtemp(prefix="demo-world-")
    work = Path(work or tmp)
    torch.set_num_threads(plan.threads)
    random.seed(seed)
    torch.manual_seed(seed)
    times: dict[str, float] = {}
    start = time.perf_counter()
    try:
        t = time.perf_counter()
        files = generate_world(work / "world", plan.images, plan.instructions, seed, DEMO_CLIP.image_size,
                               plan.single_rate)
        captions = read_captions(files["captions"])
        instructions = read_instructions(files["conversations"]) + read_instructions(files["instructions"])
        contexted = with_caption_context(files)
        times["world"] = time.perf_counter() - t

        t = time.perf_counter()
        text = [f"{s.prompt} {s.answer}" for s in captions + instructions + contexted]
        tokenizer = Tokenizer(train_tokenizer(text, out / "tokenizer.model", plan.vocab_size, seed))
        times["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        docs = [tokenizer.encode(s.prompt, bos=True) + tokenizer.encode(s.answer, bos=False, eos=True)
                for s in captions + instructions + contexted * plan.context_repeats]
        llama_cfg = replace(DEMO_LLAMA, vocab_size=tokenizer.n_words)
        lm, lm_losses = pretrain_lm(docs, llama_cfg, plan.lm_steps, plan.lm_batch, plan.lm_seq_len, lr=plan.lm_lr,
                                    seed=seed, progress=progress)
        save_meta_llama(lm, out)
        del lm
        times["language model"] = time.perf_counter() - t

        t = time.perf_counter()
        clip = build_clip(DEMO_CLIP, tokenizer.n_words, tokenizer.eos_id, seed=seed)
        pre = ImagePreprocessor(DEMO_CLIP)
        subset = captions[: plan.clip_images]
        pixels = torch.stack([pre(open_image(s.image)) for s in subset])  # [N, 3, H, W]
        names = sorted({s.answer for s in subset})
        caption_ids = torch.tensor([names.index(s.answer) for s in subset])
        scenes = read_scenes(files["scenes"])
        rows = [labels(scenes[Path(s.image).relative_to(files["scenes"].parent).as_posix()]) for s in subset]
        attributes = {k: torch.tensor([r[k] for r in rows]) for k in LABELS}  # name -> [N]
        clip_losses = train_clip(clip, pixels, text_ids(tokenizer, [s.answer for s in subset], 24), caption_ids,
                                 plan.clip_steps, plan.clip_batch, lr=plan.clip_lr, seed=seed, attributes=attributes, progress=progress)
        save_openai_clip(clip, out / "clip.pt")
        del clip, pixels
        times["clip"] = time.perf_counter() - t

        t = time.perf_counter()
        loaded = load_for_training(out, out / "tokenizer.model", out / "clip.pt", preset="demo", device="cpu",
                                   dtype="float32", bgr=False, lora_rank=plan.lora_rank)
        cfg = replace(plan.adapter, seed=seed, progress=progress)
        result = train_adapter(loaded, captions, instructions, cfg, work / "adapter", meta={"seed": seed})
        shutil.copyfile(work / "adapter" / "adapter.pth", out / "adapter.pth")
        del loaded
        times["adapter"] = time.perf_counter() - t

        t = time.perf_counter()
        results = evaluate(load_weights(out), plan.eval_n, plan.eval_seed)
        times["evaluation"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - start
        summary = {
            "seed": seed, "plan": asdict(plan), "times_s": times, "evaluation": results,
            "evaluation_report": report(results, plan.eval_n, plan.eval_seed),
            "losses": {"language model": (lm_losses[0], lm_losses[-1]), "clip": (clip_losses.contrastive[0], clip_losses.contrastive[-1]),
                       "clip attributes": (clip_losses.attributes[0], clip_losses.attributes[-1]),
                       "adapter caption": (result.history[0].get("caption"), result.history[-1].get("caption")),
                       "adapter instruction": (result.history[0].get("instruction"), result.history[-1].get("instruction"))},
        }
        write_readme(out, summary)
        return summary
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
