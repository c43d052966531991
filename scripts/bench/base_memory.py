"""A random Hugging Face folder to measure loading memory on: written by transformers' own
``save_pretrained`` (bf16 safetensors, sharded), with a small byte-level BPE tokenizer so that the
folder is complete for ``read_base``. The weights are random; only their size and layout matter."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from multimodal.config import LlamaConfig

from .hf import hf_config
from .shapes import CHUNK

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE of at most ``vocab_size`` tokens (the embedding may be larger, never smaller)
    with ChatML's special tokens and template."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=min(vocab_size, 300),
                                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a random model in a Hugging Face folder", "hello world, what is in the picture?"],
                            trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML}))


@torch.no_grad()
def write_random_hf_folder(folder: Path, cfg: LlamaConfig, dtype: torch.dtype = torch.bfloat16,
                           max_shard_size: str = "2GB", seed: int = 0) -> int:
    """LlamaForCausalLM of ``cfg``'s shape with random weights, saved by ``save_pretrained``; built on
    the meta device and given storage in ``dtype`` directly (never an fp32 copy of a 1B model).
    Returns the bytes of the weights written."""
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(cfg))
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    size = 0
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            for chunk in p.view(-1).split(CHUNK):  # [n] flat view, in place: no temporary of the whole tensor
                chunk.normal_(0.0, 1.0 if "embed_tokens" in name else 0.02, generator=g)
        size += p.numel() * p.element_size()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_tokenizer(folder, cfg.vocab_size)
    return size
