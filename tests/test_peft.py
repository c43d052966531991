"""PEFT AdaptionPrompt adapters: read onto a Hugging Face base, they give PEFT's own logits; written
back, PEFT loads them and gives the same logits again. The reference is peft + transformers, run here."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from multimodal.config import TINY_LLAMA, build_preset  # noqa: E402
from multimodal.formats.peft import export_peft_adaption_prompt, read_peft_adaption_prompt  # noqa: E402
from multimodal.loading import LoadedModel, build_empty, load_model  # noqa: E402
from tiny import official_adapter_state  # noqa: E402

TOKENS = torch.tensor([[1, 17, 99, 4, 250, 31, 8, 77, 123, 5, 64], [1, 300, 2, 9, 45, 201, 7, 7, 88, 13, 400]])


@pytest.fixture(scope="module")
def peft_files(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A random GQA LlamaForCausalLM saved by save_pretrained, a PEFT AdaptionPrompt adapter on it with
    non-zero prompts and gates saved by PEFT, and PEFT's logits."""
    root = tmp_path_factory.mktemp("peft")
    hf_cfg = transformers.LlamaConfig(vocab_size=TINY_LLAMA.vocab_size, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hf_cfg).eval()
    base.save_pretrained(root / "base")
    shutil.copy(tiny_files["tokenizer_path"], root / "base" / "tokenizer.model")
    model = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
            elif name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
        with model.disable_adapter():
            plain = model(input_ids=TOKENS).logits
    return {"base": root / "base", "adapter": root / "adapter", "logits": logits, "plain": plain, "root": root}


def ours(files: dict[str, object]) -> LoadedModel:
    return load_model(files["base"], adapter_path=files["adapter"], device="cpu", dtype="float32")


def test_peft_adapter_on_hf_base_gives_peft_logits(peft_files: dict[str, object]) -> None:
    loaded = ours(peft_files)
    model = loaded.model
    a = model.config.adapter
    assert not model.has_vision and model.clip is None and model.resampler is None
    assert a.adapter_layers == (1, 2) and a.prompt_len == 4 and a.gate_fn == "identity" and not a.gate_per_head
    assert model.llama.layers[0].attention.prompt_gate is None
    with torch.no_grad():
        out = model(TOKENS)
        torch.testing.assert_close(out, peft_files["logits"], atol=1e-5, rtol=0)
        assert (out - peft_files["plain"]).abs().max() > 0.1  # the prompts matter
        # one token at a time through the KV cache: the same
        model.llama.setup_cache(batch=2)
        prompts = model.prompt_kv(None, batch=2)
        steps = [model.llama(TOKENS[:, i:i + 1], start_pos=i, prompts=prompts, last_only=True) for i in range(TOKENS.shape[1])]
        model.llama.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1), peft_files["logits"], atol=1e-5, rtol=0)


def test_disabled_peft_adapter_equals_closed_gates(peft_files: dict[str, object]) -> None:
    model = ours(peft_files).model
    with torch.no_grad():
        for i in model.config.adapter.prompted_layers:
            model.llama.layers[i].attention.prompt_gate.gate.zero_()
        torch.testing.assert_close(model(TOKENS), peft_files["plain"], atol=1e-5, rtol=0)
        assert not torch.allclose(peft_files["plain"], peft_files["logits"], atol=1e-3)


def test_export_round_trip_through_peft(peft_files: dict[str, object]) -> None:
    loaded = ours(peft_files)
    out = export_peft_adaption_prompt(loaded.model, peft_files["root"] / "exported")
    base = transformers.LlamaForCausalLM.from_pretrained(peft_files["base"]).eval()
    again = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=TOKENS).logits, peft_files["logits"], atol=1e-5, rtol=0)
    back = read_peft_adaption_prompt(out, loaded.config.llama)
    original = read_peft_adaption_prompt(peft_files["adapter"], loaded.config.llama)
    assert back.layout == original.layout
    for k, v in original.state.items():
        assert torch.equal(back.state[k], v), k


def test_tanh_gates_equal_across_heads_export_as_their_value(peft_files: dict[str, object]) -> None:
    """A LLaMA-Adapter-style adapter (tanh of per-head gates) whose heads agree is PEFT-expressible:
    the written gate is tanh(g), and PEFT then computes what our model computes."""
    model = ours(peft_files).model
    tanh_cfg = model.config.with_adapter(gate_fn="tanh", gate_per_head=True)
    tanh_model = build_empty(tanh_cfg, "cpu", torch.float32)
    same = {k: v for k, v in model.state_dict().items() if ".prompt_gate." not in k}
    assert not set(tanh_model.load_state_dict(same, strict=False).missing_keys) - {
        f"llama.layers.{i}.attention.prompt_gate.gate" for i in tanh_cfg.adapter.prompted_layers}
    with torch.no_grad():
        for i in tanh_cfg.adapter.prompted_layers:
            tanh_model.llama.layers[i].attention.prompt_gate.gate.fill_(0.3 + 0.2 * i)
        expected = tanh_model(TOKENS)
    out = export_peft_adaption_prompt(tanh_model, peft_files["root"] / "from_tanh")
    base = transformers.LlamaForCausalLM.from_pretrained(peft_files["base"]).eval()
    again = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=0)


def test_export_names_what_peft_cannot_express(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    visual = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], preset="tiny",
                        device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="visual part"):
        export_peft_adaption_prompt(visual.model, tmp_path / "no")
    # an official-format text adapter (no resampler) with tuned biases and different gates per head
    sd = {k: v for k, v in official_adapter_state(build_preset("tiny"), seed=3).items()
          if k.startswith(("llama.", "adapter_query."))}
    torch.save({"model": sd}, tmp_path / "text.pth")
    text = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], adapter_path=tmp_path / "text.pth",
                      preset="tiny", device="cpu", dtype="float32")
    assert not text.model.has_vision
    with pytest.raises(ValueError, match=r"gate differs between heads.*wq\.bias"):
        export_peft_adaption_prompt(text.model, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_peft_folder_errors_name_the_file(peft_files: dict[str, object], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(peft_files["adapter"], bad)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match=r"adapter_config\.json.*LORA"):
        load_model(peft_files["base"], adapter_path=bad, device="cpu", dtype="float32")
