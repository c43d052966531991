"""Hugging Face folders: tiny random LlamaForCausalLM models written by transformers itself (and .bin
files as transformers reads them) must give our Transformer the same logits; bad folders fail in one
line naming the file."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from multimodal.config import RopeScaling  # noqa: E402
from multimodal.formats import BaseFiles, BaseFormatError  # noqa: E402
from multimodal.formats.hf import llama_config, read_hf_folder, rotate_half_to_interleaved  # noqa: E402
from multimodal.formats.hf_tokenizer import HFTokenizer  # noqa: E402
from multimodal.llama import Transformer  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
VARIANTS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "llama3": {"rope_scaling": LLAMA3, "rope_theta": 500000.0},
}
LAYOUTS = ("safetensors", "sharded", "bin", "bin-sharded")
SEQ = 24


def write_tokenizer(folder: Path) -> None:
    """A small byte-level BPE with a ChatML end-of-turn token, enough for the folder to be complete."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a tiny model reads a tiny folder", "hello world"], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))


def hf_model(variant: str) -> "transformers.LlamaForCausalLM":
    """Random weights large enough that a wrong mapping or RoPE order shows in the logits."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   **copy.deepcopy(VARIANTS[variant]))  # transformers edits the dicts
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def save(model: "transformers.LlamaForCausalLM", folder: Path, layout: str) -> None:
    """transformers 5 writes safetensors only; the .bin layouts are what it reads: torch.save of the
    state dict, and shards listed in pytorch_model.bin.index.json."""
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.config.save_pretrained(folder)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = list(state)
            parts = [names[: len(names) // 2], names[len(names) // 2:]]
            weight_map = {}
            for i, part in enumerate(parts):
                file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
                torch.save({k: state[k] for k in part}, folder / file)
                weight_map |= {k: file for k in part}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)


def our_model(files: BaseFiles) -> Transformer:
    with torch.device("meta"):
        model = Transformer(files.config)
    model = model.to_empty(device="cpu")
    model.reset_rope()
    own = dict(model.named_parameters())
    assert set(files.weights) == set(own)  # iterating names reads no tensor
    with torch.no_grad():
        for name in files.weights:
            own[name].copy_(files.weights[name])
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path: Path, variant: str, layout: str) -> None:
    model = hf_model(variant)
    save(model, tmp_path, layout)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    files = read_hf_folder(tmp_path, max_seq_len=32)
    assert files.format == "hf" and str(tmp_path) in files.source
    assert files.config.max_seq_len == 32 and files.config.hidden_dim == 80 and files.config.kv_heads == 2
    assert files.config.tie_embeddings == (variant == "tied")
    assert files.config.rope_scaling == (RopeScaling(**{k: v for k, v in LLAMA3.items() if k != "rope_type"})
                                         if variant == "llama3" else None)
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        got = our_model(files)(tokens)
    assert rel_diff(got, expected) < 1e-5


def test_rope_order_conversion_is_per_head() -> None:
    """Meta's row 2i is HF's row i and 2i+1 is HF's i + D/2, head by head."""
    heads, d = 3, 8
    w = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 2)
    got = rotate_half_to_interleaved(w, heads)[:, 0].long().tolist()
    expected = [h * d + (i // 2) + (i % 2) * (d // 2) for h in range(heads) for i in range(d)]
    assert got == expected


def test_config_spellings_of_transformers_4_and_5(tmp_path: Path) -> None:
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 96, "intermediate_size": 80, "max_position_embeddings": 4096}
    old_spelling = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    v4 = llama_config(base | {"rope_theta": 5e5, "rope_scaling": old_spelling}, tmp_path)
    v5 = llama_config(base | {"rope_parameters": {"rope_theta": 5e5, **LLAMA3}}, tmp_path)
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling.factor == 4.0
    assert v4.max_seq_len != 4096  # the loader picks it, not max_position_embeddings
    assert v4.kv_heads == 4 and not v4.tie_embeddings


def test_tokenizer_comes_with_the_folder(tmp_path: Path) -> None:
    save(hf_model("gqa"), tmp_path, "safetensors")
    tok = read_hf_folder(tmp_path).tokenizer
    assert isinstance(tok, HFTokenizer)
    assert tok.tok.token_to_id("<|im_end|>") in tok.stop_ids


# --- reading weights without leaving the files mapped ---------------------------------------------------


def mapped_files() -> set[Path]:
    """Files this process has memory-mapped now: a mapped page that was read counts in RSS until the
    mapping goes, which is what made a whole-model load peak at twice the weights."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux) to see which files are mapped")
    return {Path(line.split(maxsplit=5)[5].strip()) for line in maps.read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def read_all(files: BaseFiles) -> dict[str, torch.Tensor]:
    return {k: files.weights[k] for k in files.weights}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensors_are_read_into_their_own_memory(tmp_path: Path, layout: str) -> None:
    """Every tensor held and the shards still open: no weight file is mapped, and each tensor owns
    distinct memory (a second read of the same name is a new tensor)."""
    model = hf_model("gqa")
    save(model, tmp_path, layout)
    files = read_hf_folder(tmp_path)
    held = read_all(files)
    weight_files = {f for f in tmp_path.iterdir() if f.suffix in (".safetensors", ".bin")}
    assert not weight_files & mapped_files()
    again = files.weights["tok_embeddings.weight"]
    assert again.data_ptr() != held["tok_embeddings.weight"].data_ptr()
    assert torch.equal(again, model.state_dict()["model.embed_tokens.weight"])
    assert all(t.is_contiguous() for t in held.values())


def test_bin_views_and_shared_storages_read_as_saved(tmp_path: Path) -> None:
    """A .bin may hold strided views and tensors sharing one storage at an offset (torch.save keeps
    views as views): each is read from its own bytes, and the model gives transformers' logits."""
    model = hf_model("gqa")
    save(model, tmp_path, "bin")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    state[q] = state[q].t().contiguous().t()  # [64, 64] with strides (1, 64)
    k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    kv = torch.cat([state[k], state[v]])  # [64, 64]: k's rows, then v's
    state[k], state[v] = kv[:32], kv[32:]  # v starts 32 rows into the shared storage
    torch.save(state, tmp_path / "pytorch_model.bin")
    files = read_hf_folder(tmp_path)
    held = read_all(files)
    assert torch.equal(held["layers.1.attention.wv.weight"], model.state_dict()[v])
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(our_model(files)(tokens), model(tokens).logits.float()) < 1e-5


def test_bin_of_the_other_byte_order_goes_through_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw reads cannot swap bytes: such a file (faked here) is read through torch.load's own mapping,
    each tensor copied out of it."""
    import multimodal.formats.hf as hf

    monkeypatch.setattr(hf, "_byteorder", lambda path: "big" if sys.byteorder == "little" else "little")
    model = hf_model("gqa")
    save(model, tmp_path, "bin")
    files = read_hf_folder(tmp_path)
    held = read_all(files)
    assert torch.equal(held["norm.weight"], model.state_dict()["model.norm.weight"])
    assert held["norm.weight"].data_ptr() != files.weights["norm.weight"].data_ptr()  # copies, not the mapping
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(our_model(files)(tokens), model(tokens).logits.float()) < 1e-5


def test_safetensors_without_the_pread_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A safetensors without ``backend`` maps the file: each tensor is then copied out of a handle
    opened for it alone, so no mapping outlives the read."""
    import multimodal.formats.hf as hf
    from safetensors import safe_open

    def old_safe_open(*args: object, **kwargs: object) -> object:
        if "backend" in kwargs:
            raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
        return safe_open(*args, **kwargs)

    monkeypatch.setattr(hf, "safe_open", old_safe_open)
    model = hf_model("gqa")
    save(model, tmp_path, "sharded")
    files = read_hf_folder(tmp_path)
    held = read_all(files)
    assert not set(tmp_path.glob("*.safetensors")) & mapped_files()
    assert torch.equal(held["layers.1.feed_forward.w2.weight"], model.state_dict()["model.layers.1.mlp.down_proj.weight"])
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(our_model(files)(tokens), model(tokens).logits.float()) < 1e-5


# --- bad folders -------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    save(hf_model("gqa"), tmp_path, "safetensors")
    return tmp_path


def edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


def one_line_error(folder: Path, *needles: str) -> str:
    with pytest.raises(BaseFormatError) as err:
        read_hf_folder(folder)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_other_model_type_is_refused(folder: Path) -> None:
    path = edit_config(folder, model_type="qwen2")
    one_line_error(folder, str(path), "'qwen2'", "LLaMA-family")


def test_unknown_rope_scaling_is_refused(folder: Path) -> None:
    path = edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    one_line_error(folder, str(path), "'yarn'")


def test_head_dim_must_follow_from_the_shape(folder: Path) -> None:
    path = edit_config(folder, head_dim=32)
    one_line_error(folder, str(path), "head_dim 32")


def test_truncated_safetensors(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(folder, str(path))


def test_truncated_shard(tmp_path: Path) -> None:
    save(hf_model("gqa"), tmp_path, "sharded")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    one_line_error(tmp_path, str(shard))


def test_unknown_tensor_is_named(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path) | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    save_file(state, path, metadata={"format": "pt"})
    one_line_error(folder, str(path), "model.layers.0.self_attn.q_proj.bias")


def test_missing_tensor_is_named(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    one_line_error(folder, str(folder), "model.layers.1.mlp.up_proj.weight")


def test_folder_without_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    one_line_error(folder, str(folder), "model.safetensors")


def test_rotary_buffers_are_ignored(tmp_path: Path) -> None:
    model = hf_model("gqa")
    save(model, tmp_path, "bin")
    path = tmp_path / "pytorch_model.bin"
    state = torch.load(path, weights_only=True) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    torch.save(state, path)
    files = read_hf_folder(tmp_path)
    assert "layers.0.attention.wq.weight" in files.weights and len(files.weights) == 2 * 9 + 3


def test_truncated_bin(tmp_path: Path) -> None:
    save(hf_model("gqa"), tmp_path, "bin")
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:2000])
    one_line_error(tmp_path, str(path))
