"""Adapter V2 behaviour: zero-init, KV cache, the official checkpoint format, fusion presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multimodal.adapter import is_trainable
from multimodal.checkpoint import CheckpointError, read_adapter, save_adapter
from multimodal.config import TINY_LLAMA, build_preset
from multimodal.llama import Transformer
from multimodal.loading import LoadedModel, build_empty, load_model, load_llama_only
from tiny import official_adapter_state, write_official_adapter


def pixels(seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def load(files: dict[str, Path], preset: str = "tiny", adapter: Path | None = None) -> LoadedModel:
    return load_model(files["llama_dir"], files["tokenizer_path"], files["clip_path"], adapter, preset=preset,
                      device="cpu", dtype="float32")


TOKENS = torch.tensor([[1, 17, 99, 4, 250, 31, 8, 77, 123, 5, 64]])


@pytest.mark.parametrize("lora", [0, 4])
def test_zero_gates_give_plain_llama_whatever_the_image(tiny_files: dict[str, Path], tmp_path: Path, lora: int) -> None:
    cfg = build_preset("tiny")
    # a trained-looking adapter whose gates, biases and LoRA up-projections are all back at zero
    sd = official_adapter_state(cfg, lora_rank=lora, seed=1)
    for k in sd:
        if k.endswith(("gate", "bias", "_l2.weight")) and k.startswith("llama."):
            sd[k] = torch.zeros_like(sd[k]) + (1.0 if k.endswith("new_gate") else 0.0)
    norms = {k: v for k, v in sd.items() if k.startswith("llama.") and k.endswith("norm.weight")}
    for k in norms:
        del sd[k]  # keep Meta's norms so the plain model is the same LLaMA
    torch.save({"model": sd, "config": {"w_lora": bool(lora), "lora_rank": lora}}, tmp_path / "a.pth")
    model = load(tiny_files, adapter=tmp_path / "a.pth").model
    assert model.llama.layers[1].attention.wq.lora_a is not None if lora else model.llama.layers[1].attention.wq.lora_a is None
    plain = load_llama_only(tiny_files["llama_dir"], vocab_size=TINY_LLAMA.vocab_size, max_seq_len=TINY_LLAMA.max_seq_len)
    with torch.no_grad():
        expected = plain(TOKENS)
        for seed in (0, 1):
            torch.testing.assert_close(model(TOKENS, pixels(seed)), expected, atol=1e-6, rtol=0)
        # and the image does matter once a gate opens
        model.llama.layers[2].attention.prompt_gate.gate.fill_(0.5)
        assert not torch.allclose(model(TOKENS, pixels(0)), model(TOKENS, pixels(1)), atol=1e-4)


@pytest.fixture(scope="module")
def trained(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with a random LORA-BIAS adapter in the official format (open gates)."""
    path = tmp_path_factory.mktemp("adapter") / "lora.pth"
    write_official_adapter(path, build_preset("tiny"), lora_rank=4, seed=2)
    return load(tiny_files, adapter=path)


def test_kv_cache_matches_full_recompute_with_image(trained: LoadedModel) -> None:
    model = trained.model
    with torch.no_grad():
        prompts = model.prompt_kv(pixels(3))
        full = model.llama(TOKENS, prompts=prompts)  # [1, S, V]
        model.llama.setup_cache(batch=1)
        try:
            step = [model.llama(TOKENS[:, i:i + 1], start_pos=i, prompts=prompts, last_only=True) for i in range(TOKENS.shape[1])]
            torch.testing.assert_close(torch.stack(step, dim=1), full, atol=1e-5, rtol=1e-5)
            # a multi-token chunk after a cached prefix (as a second chat turn would be)
            model.llama(TOKENS[:, :4], start_pos=0, prompts=prompts)
            chunk = model.llama(TOKENS[:, 4:], start_pos=4, prompts=prompts)
            torch.testing.assert_close(chunk, full[:, 4:], atol=1e-5, rtol=1e-5)
        finally:
            model.llama.clear_cache()


@pytest.mark.parametrize("lora,with_config", [(0, True), (0, False), (4, True), (4, False)])
def test_official_format_loads_into_the_right_places(tiny_files: dict[str, Path], tmp_path: Path, lora: int,
                                                    with_config: bool) -> None:
    sd = write_official_adapter(tmp_path / "ckpt.pth", build_preset("tiny"), lora_rank=lora, with_config=with_config, seed=4)
    model = load(tiny_files, adapter=tmp_path / "ckpt.pth").model
    layer = model.llama.layers[2]
    assert torch.equal(layer.attention.prompt_gate.gate, sd["llama.layers.2.attention.gate"])
    assert torch.equal(layer.attention.wq.bias, sd["llama.layers.2.attention.wq.bias"])
    assert torch.equal(layer.feed_forward.w2.bias, sd["llama.layers.2.feed_forward.w2.bias"])
    assert torch.equal(layer.ffn_norm.weight, sd["llama.layers.2.ffn_norm.weight"])
    assert torch.equal(model.resampler.visual_blocks[1].attn.qkv.weight, sd["visual_blocks.1.attn.qkv.weight"])
    assert torch.equal(model.resampler.clip_proj_norm.bias, sd["clip_proj_norm.bias"])
    assert torch.equal(model.adapter_query.weight, sd["adapter_query.weight"])
    assert model.llama.layers[0].attention.prompt_gate is None  # layer 0's stored gate is unused, as released
    if lora:
        assert torch.equal(layer.attention.wk.lora_a, sd["llama.layers.2.attention.lora_wk_l1.weight"])
        assert torch.equal(layer.feed_forward.w3.lora_b, sd["llama.layers.2.feed_forward.lora_w3_l2.weight"])
        assert torch.equal(layer.attention.prompt_gate.new_gate, sd["llama.layers.2.attention.new_gate"])
    else:
        assert layer.attention.wk.lora_a is None and layer.attention.prompt_gate.new_gate is None


def test_unknown_key_fails_naming_it(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    write_official_adapter(tmp_path / "bad.pth", build_preset("tiny"), extra={"llama.layers.1.attention.mystery": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"llama\.layers\.1\.attention\.mystery"):
        load(tiny_files, adapter=tmp_path / "bad.pth")


def test_adapter_may_not_overwrite_frozen_weights(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    extra = {"llama.layers.1.attention.wk.weight": torch.zeros(32, 64)}
    write_official_adapter(tmp_path / "bad.pth", build_preset("tiny"), extra=extra)
    with pytest.raises(CheckpointError, match=r"frozen.*layers\.1\.attention\.wk\.weight"):
        load(tiny_files, adapter=tmp_path / "bad.pth")


def test_gate_of_unprompted_layer_is_ignored_like_the_official_loader(tiny_files: dict[str, Path], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The released code loads layer 0's stored gate and never uses it: even a non-zero one changes
    nothing, and the loader says so in one log line."""
    write_official_adapter(tmp_path / "plain.pth", build_preset("tiny"))
    extra = {"llama.layers.0.attention.gate": torch.full((1, TINY_LLAMA.n_heads, 1, 1), 0.3)}
    write_official_adapter(tmp_path / "odd.pth", build_preset("tiny"), extra=extra)
    with caplog.at_level("INFO", logger="multimodal.loading"):
        odd = load(tiny_files, adapter=tmp_path / "odd.pth").model
    lines = [r.getMessage() for r in caplog.records if "layers.0.attention.gate" in r.getMessage()]
    assert len(lines) == 1 and "non-zero" in lines[0]
    assert odd.llama.layers[0].attention.prompt_gate is None
    plain = load(tiny_files, adapter=tmp_path / "plain.pth").model
    with torch.no_grad():
        torch.testing.assert_close(odd(TOKENS, pixels(0)), plain(TOKENS, pixels(0)), atol=0, rtol=0)


def test_missing_adapter_keys_keep_init_values(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    sd = official_adapter_state(build_preset("tiny"), seed=6)
    sd = {k: v for k, v in sd.items() if not k.endswith("wq.bias")}
    torch.save({"model": sd}, tmp_path / "partial.pth")
    model = load(tiny_files, adapter=tmp_path / "partial.pth").model
    attn = model.llama.layers[3].attention
    assert torch.count_nonzero(attn.wq.bias) == 0
    assert torch.equal(attn.wo.bias, sd["llama.layers.3.attention.wo.bias"])


def test_missing_gate_of_a_prompted_layer_fails_naming_it(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    sd = official_adapter_state(build_preset("tiny"), seed=6)
    del sd["llama.layers.2.attention.gate"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"lacks.*llama\.layers\.2\.attention\.gate"):
        load(tiny_files, adapter=tmp_path / "partial.pth")


def test_save_writes_the_official_format(trained: LoadedModel, tmp_path: Path) -> None:
    model = trained.model
    save_adapter(model.trainable_state_dict(), tmp_path / "out.pth", {"w_bias": True, "w_lora": True, "lora_rank": 4})
    raw = torch.load(tmp_path / "out.pth", weights_only=True)
    written = set(raw["model"])
    official = set(official_adapter_state(build_preset("tiny"), lora_rank=4)) - {"llama.layers.0.attention.gate",
                                                                                  "llama.layers.0.attention.new_gate"}
    assert written == official
    back = read_adapter(tmp_path / "out.pth")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(back.state[k], v), k


def test_trainable_parameters_match_the_released_bias_7b_count() -> None:
    """The reference counts 63,095,552 tensors' elements in BIAS-7B, with 32 gates of 32 heads; the
    released code never uses layer 0's gate, which this model does not create."""
    with torch.device("meta"):
        from multimodal.model import MultimodalLlama
        model = MultimodalLlama(build_preset("official-7b"))
        lora = MultimodalLlama(build_preset("official-7b").with_adapter(lora_rank=16, new_gate=True))
    count = sum(p.numel() for n, p in model.named_parameters() if is_trainable(n))
    assert count == 63_095_552 - 32
    lora_count = sum(p.numel() for n, p in lora.named_parameters() if is_trainable(n))
    assert lora_count - count == 39_976_992 - 1  # LoRA in all 32 layers + new_gate, minus layer 0's new_gate


@pytest.mark.parametrize("preset,first_layer", [("tiny", 1), ("tiny-early", 0)])
def test_image_changes_hidden_states_first_at_the_presets_first_layer(tiny_files: dict[str, Path], tmp_path: Path,
                                                                     preset: str, first_layer: int) -> None:
    cfg = build_preset(preset)
    write_official_adapter(tmp_path / "a.pth", cfg, seed=7)
    model = load(tiny_files, preset=preset, adapter=tmp_path / "a.pth").model
    assert min(cfg.adapter.visual_layers) == first_layer
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in model.llama.layers]
    with torch.no_grad():
        model(TOKENS, pixels(0))
        a, outputs = outputs, []
        model(TOKENS, pixels(1))
        b = outputs
    for h in hooks:
        h.remove()
    changed = [not torch.equal(x, y) for x, y in zip(a, b)]
    assert changed.index(True) == first_layer
    assert all(changed[first_layer:])


def test_build_empty_initialises_only_tuned_parameters() -> None:
    model = build_empty(build_preset("tiny").with_adapter(lora_rank=2, new_gate=True, scale=True), "cpu", torch.float32)
    attn = model.llama.layers[1].attention
    assert torch.count_nonzero(attn.prompt_gate.gate) == 0 and torch.all(attn.prompt_gate.new_gate == 1)
    assert torch.count_nonzero(attn.wq.lora_b) == 0 and torch.count_nonzero(attn.wq.lora_a) > 0
    assert torch.all(attn.wq.scale == 1) and torch.count_nonzero(attn.wo.bias) == 0
    assert isinstance(model.llama, Transformer) and model.llama.rope.shape == (TINY_LLAMA.max_seq_len + 1, 8, 2)  # + the spare cache slot
