"""Shapes come from the files: a configuration no preset names, written in the official formats, loads
with no code change; adapters without a visual part make text-only models; read_base finds the base."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from multimodal.config import AdapterConfig, ClipVisionConfig, LlamaConfig, ModelConfig, ResamplerConfig, build_preset
from multimodal.formats import BaseFormatError, read_base
from multimodal.generate import Engine, SamplingParams
from multimodal.loading import load_llama_only, load_model
from tiny import official_adapter_state, tiny_clip, write_meta_dir, write_official_adapter

TOKENS = torch.tensor([[1, 17, 99, 4, 250, 31, 8, 77, 123, 5, 64]])

# shapes no preset has: 6 heads over 3 KV heads, a padded vocabulary (the tokenizer has 512), a 24 px CLIP
# of 4 px patches, a one-block resampler of width 32 with 5 queries, prompts in the top 2 of 3 layers
LLAMA = LlamaConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=520, multiple_of=16, max_seq_len=64)
CLIP = ClipVisionConfig(image_size=24, patch_size=4, width=128, layers=3, heads=2, output_dim=20)
RESAMPLER = ResamplerConfig(dim=32, depth=1, heads=16, n_queries=5)  # 16: the official rule for a new width
CUSTOM = ModelConfig("custom", LLAMA, CLIP, RESAMPLER, AdapterConfig(adapter_layers=(1, 2), visual_layers=(1, 2), prompt_len=5))


@pytest.fixture(scope="module")
def custom_files(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("custom")
    write_meta_dir(root / "llama", LLAMA, seed=3)
    shutil.copy(tiny_files["tokenizer_path"], root / "tokenizer.model")  # beside the folder, as Meta ships it
    torch.save(tiny_clip(CLIP, seed=3).state_dict(), root / "clip.pt")
    write_official_adapter(root / "adapter.pth", CUSTOM, seed=3)  # gates in every layer, as released
    return {"llama": root / "llama", "clip": root / "clip.pt", "adapter": root / "adapter.pth", "root": root}


def pixels(seed: int, size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_resampler(sd: dict[str, torch.Tensor], clip_feats: torch.Tensor, heads: int) -> torch.Tensor:
    """The official resampler (timm 0.3.2 blocks) rebuilt from torch's own modules and the file's
    tensors: nn.MultiheadAttention's packed q/k/v projection has the same layout as timm's qkv."""
    dim = sd["visual_query.weight"].shape[1]
    x = F.layer_norm(F.linear(clip_feats, sd["clip_proj.weight"], sd["clip_proj.bias"]), (dim,),
                     sd["clip_proj_norm.weight"], sd["clip_proj_norm.bias"])
    x = torch.cat([sd["visual_query.weight"][None], x], dim=1)
    attn = nn.MultiheadAttention(dim, heads, batch_first=True)
    p = "visual_blocks.0."
    attn.load_state_dict({"in_proj_weight": sd[p + "attn.qkv.weight"], "in_proj_bias": sd[p + "attn.qkv.bias"],
                          "out_proj.weight": sd[p + "attn.proj.weight"], "out_proj.bias": sd[p + "attn.proj.bias"]})
    h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    x = x + attn(h, h, h, need_weights=False)[0]
    h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
    out = F.linear(x[:, :sd["visual_query.weight"].shape[0]], sd["visual_proj.weight"], sd["visual_proj.bias"])
    return F.layer_norm(out, (LLAMA.dim,), sd["visual_proj_norm.weight"], sd["visual_proj_norm.bias"])


def test_unnamed_configuration_loads_with_shapes_from_its_files(custom_files: dict[str, Path]) -> None:
    loaded = load_model(custom_files["llama"], None, custom_files["clip"], custom_files["adapter"], preset="tiny",
                        device="cpu", dtype="float32")
    cfg = loaded.config
    assert cfg.llama.vocab_size == 520 and loaded.tokenizer.n_words == 512  # padded vocabulary from params.json
    assert cfg.clip == CLIP
    assert cfg.resampler == RESAMPLER
    a = cfg.adapter
    assert (a.adapter_layers, a.visual_layers, a.prompt_len, a.lora_rank) == ((1, 2), (1, 2), 5, 0)
    model = loaded.model
    sd = official_adapter_state(CUSTOM, seed=3)
    clip = tiny_clip(CLIP, seed=3)
    x = pixels(0, CLIP.image_size)
    with torch.no_grad():
        # CLIP's heads, width and grid are right if open_clip's own image embedding (pooled CLS) agrees
        from multimodal.visual import clip_tokens
        feats = clip_tokens(model.clip, x)
        torch.testing.assert_close(feats[:, 0], clip.encode_image(x), atol=1e-5, rtol=1e-5)
        # and the resampler's (16 heads of width 2) if a reference built from torch modules agrees
        torch.testing.assert_close(model.encode_image(x), reference_resampler(sd, feats, heads=16), atol=1e-5, rtol=1e-5)
        assert torch.equal(model.adapter_query.weight, sd["adapter_query.weight"])
        assert torch.equal(model.llama.layers[2].attention.prompt_gate.gate, sd["llama.layers.2.attention.gate"])
        assert not torch.allclose(model(TOKENS, x), model(TOKENS, pixels(1, CLIP.image_size)), atol=1e-4)


def test_adapter_without_resampler_makes_a_text_only_model(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    sd = {k: v for k, v in official_adapter_state(build_preset("tiny"), seed=5).items()
          if k.startswith(("llama.", "adapter_query."))}
    torch.save({"model": sd}, tmp_path / "text.pth")
    loaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], None, tmp_path / "text.pth",
                        preset="tiny", device="cpu", dtype="float32")
    model = loaded.model
    assert not model.has_vision and model.clip is None and model.resampler is None
    assert model.config.adapter.adapter_layers == (1, 2, 3) and model.config.adapter.visual_layers == ()
    with pytest.raises(ValueError, match="this model has no visual encoder"):
        model.prompt_kv(pixels(0, 32))
    prompts = model.prompt_kv(None)
    assert prompts[0] is None and all(p is not None for p in prompts[1:])
    # the layer's prompt is its adaption prompt alone: its keys are the frozen wk of those rows
    rows = sd["adapter_query.weight"].view(3, 4, -1)  # [layers, P, dim]
    wk = model.llama.layers[2].attention.wk.weight
    torch.testing.assert_close(prompts[2].k, (rows[1] @ wk.T).view(1, 4, 2, 16).transpose(1, 2))
    # a CLIP file given anyway is not needed and not read
    again = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["root"] / "no-such-clip.pt",
                       tmp_path / "text.pth", preset="tiny", device="cpu", dtype="float32")
    assert not again.model.has_vision
    # the engine answers without an image; given one (the app's experts read it), the model is not shown it
    engine = Engine(loaded)
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    alone = engine.complete("the bus is", None, greedy)
    assert isinstance(alone, str) and not engine.sees_images
    assert engine.complete("the bus is", Image.new("RGB", (32, 32)), greedy) == alone


def test_no_adapter_and_no_clip_is_the_bare_base(tiny_files: dict[str, Path]) -> None:
    loaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], preset="tiny", device="cpu",
                        dtype="float32")
    assert not loaded.model.has_vision and loaded.model.config.adapter.prompted_layers == ()
    assert loaded.model.prompt_kv(None) == [None] * 4
    plain = load_llama_only(tiny_files["llama_dir"], vocab_size=512, max_seq_len=128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(TOKENS), plain(TOKENS), atol=1e-6, rtol=0)


def test_visual_adapter_without_clip_file_says_so(tiny_files: dict[str, Path], tiny_adapter) -> None:
    with pytest.raises(ValueError, match="visual resampler.*CLIP"):
        load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], None, tiny_adapter(0, 1), preset="tiny",
                   device="cpu", dtype="float32")


def test_read_base_finds_meta_folders_and_names_what_it_looked_for(custom_files: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    base = read_base(custom_files["llama"], max_seq_len=32)
    assert base.format == "meta" and base.config.max_seq_len == 32 and base.config.n_kv_heads == 3
    assert base.tokenizer.n_words == 512 and "layers.2.attention.wq.weight" in base.weights
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing", custom_files["clip"]):
        with pytest.raises(BaseFormatError, match=rf"{path.name}.*params\.json.*config\.json.*\.gguf"):
            read_base(path)


def test_tokenizer_larger_than_the_embedding_fails(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    small = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=500, multiple_of=16)
    write_meta_dir(tmp_path / "llama", small)
    with pytest.raises(BaseFormatError, match="vocab_size 500.*512"):
        read_base(tmp_path / "llama", tokenizer=tiny_files["tokenizer_path"])
