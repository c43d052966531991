"""Bias tuning of a small chat base on made-up findings (findings_data.py): the paper's recipe for a
frozen LLaMA (zero-initialised biases on the linear layers and the RMSNorm weights, nothing else), used
to teach SmolLM2-135M-Instruct to answer from the experts' findings.

    python -m multimodal.train findings --out weights/smollm2-findings/adapter.pth

The result is an ordinary adapter file (official key names, no visual part: a text-only model), which
``load_model(..., adapter_path=...)`` and the app's ``--adapter`` read like any other. The prompt it is
tuned on is the app's: the base's chat template, the system turn for a model that sees through the
experts, the findings with the first question about the image (prompt style ``prose-tuned``), so no
worked examples are needed. The loss is on the answer tokens only.

So that questions without an image keep their answers, a share of the batches are plain questions the
untuned base answers itself (greedy, before tuning): the tuning is asked to leave those alone.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter import is_trainable
from ..checkpoint import save_adapter
from ..loading import LoadedModel
from ..packing import packing_pays
from ..prompt import SYSTEM_EXPERTS, ChatTemplateFormat
from .data import IGNORE
from .findings_data import Exchange, exchanges

PROMPT_STYLE = "prose-tuned"  # app.prompting's style for a model tuned here (the adapter file says so)

# General questions the tuning must not change the answers to (their targets are the base's own answers).
PLAIN_QUESTIONS = (
    "What is the capital of France?", "What is the capital of Japan?", "What is 12 plus 7?",
    "Name three colours.", "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?",
    "What is water made of?", "Translate 'good morning' into French.", "What is the boiling point of water?",
    "Give me a synonym for happy.", "How many days are in a week?", "What is photosynthesis?",
    "Write a haiku about the sea.", "What language is spoken in Brazil?", "What is the square root of 81?",
    "Tell me a fun fact about cats.", "What does a thermometer measure?", "Hello! How are you?",
    "What is the opposite of cold?", "Explain what a noun is.", "What is the chemical symbol for gold?",
    "How many legs does a spider have?", "What is the tallest mountain on Earth?", "Suggest a name for a dog.",
)


@dataclass
class FindingsPlan:
    """The recipe; the defaults made weights/smollm2-findings/adapter.pth."""

    examples: int = 2400
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 10
    plain_share: float = 0.15  # of the examples: plain questions with the base's own answers
    plain_tokens: int = 48  # longest base answer kept as a target
    seed: int = 0
    threads: int = 2

    @classmethod
    def smoke(cls) -> "FindingsPlan":
        return cls(examples=8, batch_size=4, plain_share=0.25, plain_tokens=8)


def tuned_format(tokenizer) -> ChatTemplateFormat:
    """The prompt form the tuning uses and the app's ``prose-tuned`` style gives."""
    return ChatTemplateFormat(tokenizer, SYSTEM_EXPERTS, context_in="first")


def encode(fmt: ChatTemplateFormat, ex: Exchange) -> tuple[list[int], list[int]]:
    """Token ids of the whole exchange and its labels (IGNORE on the prompt: loss on the answer only)."""
    messages = fmt.messages(ex.question, ex.history, ex.findings or None)
    prompt = fmt.tokenizer.encode_chat(messages)
    full = fmt.tokenizer.encode_chat(messages + [{"role": "assistant", "content": ex.answer}], add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the prompt with the answer; cannot mask the prompt")
    return full, [IGNORE] * len(prompt) + full[len(prompt):]


@torch.inference_mode()
def base_answers(loaded: LoadedModel, fmt: ChatTemplateFormat, questions: tuple[str, ...], max_tokens: int) -> list[str]:
    """The untuned model's greedy answers to plain questions (no findings): the targets that keep them.
    Decoded with a KV cache that is removed afterwards (training runs without one)."""
    llama, tok = loaded.model.llama, loaded.tokenizer
    llama.setup_cache(batch=1, max_seq_len=min(llama.config.max_seq_len, 1024))
    out = []
    try:
        for q in questions:
            ids = fmt.ids(q, (), None)
            logits = llama(torch.tensor([ids]), start_pos=0, last_only=True)
            new: list[int] = []
            for _ in range(max_tokens):
                token = int(logits.argmax(-1))
                if token in tok.stop_ids:
                    break
                new.append(token)
                logits = llama(torch.tensor([[token]]), start_pos=len(ids) + len(new) - 1, last_only=True)
            out.append(tok.decode(new).strip())
    finally:
        for layer in llama.layers:
            layer.attention.kv_cache = None
    return out


def batches(rows: list[tuple[list[int], list[int]]], size: int, rng: random.Random, pad: int) -> list[dict[str, torch.Tensor]]:
    """Rows of similar length together (less padding), batches in random order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + rng.random())
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    out = []
    for group in groups:
        width = max(len(rows[i][0]) for i in group)
        tokens = torch.full((len(group), width), pad, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for r, i in enumerate(group):
            ids, lab = rows[i]
            tokens[r, :len(ids)], labels[r, :len(lab)] = torch.tensor(ids), torch.tensor(lab)
        out.append({"tokens": tokens, "labels": labels})
    return out


def answer_loss(llama: torch.nn.Module, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> torch.Tensor:
    tokens, labels = batch["tokens"], batch["labels"]
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = llama(tokens)  # [B, S, V] float
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def tune(loaded: LoadedModel, plan: FindingsPlan, out: Path, log=print) -> dict:
    """Tune ``loaded`` (a float32 chat base on the CPU, no cache set up) in place and write the adapter."""
    torch.manual_seed(plan.seed)
    rng = random.Random(plan.seed)
    torch.set_num_threads(plan.threads)
    fmt = tuned_format(loaded.tokenizer)
    model, llama = loaded.model, loaded.model.llama
    n_plain = round(plan.examples * plan.plain_share)
    questions = tuple(rng.choice(PLAIN_QUESTIONS) for _ in range(min(n_plain, len(PLAIN_QUESTIONS))))
    start = time.perf_counter()
    answers = base_answers(loaded, fmt, questions, plan.plain_tokens)
    plain = [Exchange("", (), q, a) for q, a in zip(questions, answers) if a]
    repeated = [plain[i % len(plain)] for i in range(n_plain)] if plain else []
    rows = [encode(fmt, ex) for ex in exchanges(plan.examples - len(repeated), seed=plan.seed) + repeated]
    log(f"{len(rows)} exchanges ({len(repeated)} plain questions with the base's answers), "
        f"{sum(len(r[0]) for r in rows) / len(rows):.0f} tokens on average; base answers in {time.perf_counter() - start:.0f} s")

    params = {n: p for n, p in model.named_parameters() if is_trainable(n) and n.startswith("llama.")}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(list(params.values()), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = torch.bfloat16 if packing_pays("cpu", torch.bfloat16) else None  # native bf16: about 2x faster
    steps = [b for _ in range(plan.epochs) for b in batches(rows, plan.batch_size, rng, loaded.tokenizer.eos_id)]
    losses = []
    for i, batch in enumerate(steps):
        lr = plan.lr * min(1.0, (i + 1) / plan.warmup) * 0.5 * (1 + math.cos(math.pi * i / len(steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = answer_loss(llama, batch, amp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i % 10 == 0 or i + 1 == len(steps):
            log(f"step {i + 1}/{len(steps)}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:.0f} s")
    model.eval().requires_grad_(False)
    summary = {"recipe": "multimodal.train.findings", "prompt_style": PROMPT_STYLE, "plan": asdict(plan), "steps": len(steps),
               "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
               "seconds": round(time.perf_counter() - start)}
    save_adapter({n: p.detach().float() for n, p in params.items()}, out, config=summary)
    return summary
