"""Open bases in the product: a Hugging Face copy of a Meta-format model under the released adapter
format, `weights link` for Hugging Face LLaMA-1 folders, the registry's SmolLM2 through the model
options, chat templates in the app's prompts, and text-only models that need no CLIP file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.chat import AppConfig, ChatApp
from app.state import ChatSession
from conftest import REPO_ROOT
from multimodal.config import TINY_LLAMA, build_preset
from multimodal.generate import Engine
from multimodal.loading import load_model
from multimodal.options import ModelOptions
from multimodal.prompt import ChatTemplateFormat
from tiny import random_meta_state, write_official_adapter
from weights.choice import auto_choice
from weights.cli import main as weights_main
from weights.packaged import packaged

transformers = pytest.importorskip("transformers")


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (pairs 2i, 2i+1 rotate together) in the order transformers' LLaMA expects
    (rows i and i + D/2), as transformers' own conversion script lays them out."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # [heads, 2, D/2, dim]


def write_hf_copy(meta_dir: Path, tokenizer: Path, out: Path) -> None:
    """A Hugging Face folder holding the same model as a Meta folder, written by transformers."""
    cfg = TINY_LLAMA
    sd = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg)
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = interleaved_to_rotate_half(w, cfg.n_heads)
            elif ours == "attention.wk":
                w = interleaved_to_rotate_half(w, cfg.kv_heads)
            state[f"model.layers.{i}.{theirs}.weight"] = w
    model.load_state_dict(state)
    model.save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")


def test_released_adapter_on_a_hugging_face_copy_of_the_base(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.pth"
    write_official_adapter(adapter, build_preset("tiny"), seed=5)
    hf_dir = tmp_path / "hf"
    write_hf_copy(tiny_files["llama_dir"], tiny_files["tokenizer_path"], hf_dir)
    meta = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], adapter,
                      preset="tiny", device="cpu", dtype="float32")
    hf = load_model(hf_dir, None, tiny_files["clip_path"], adapter, preset="tiny", device="cpu", dtype="float32")
    pixels = torch.rand(1, 3, 32, 32)
    tokens = torch.tensor([meta.tokenizer.encode("a red bus on a street")])
    with torch.no_grad():
        a, b = meta.model(tokens, pixels), hf.model(tokens, pixels)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert hf.tokenizer.encode("a red bus") == meta.tokenizer.encode("a red bus")


# -- weights link llama-7b for Hugging Face folders ----------------------------------------------------

LLAMA1_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}


def fake_hf_folder(path: Path, size: int = 13_476_000_000, **config: object) -> Path:
    """A folder shaped like a Hugging Face LLaMA copy: its config, a tokenizer and sparse weight files
    of the right total size (no disk is used)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**LLAMA1_7B, **config}))
    (path / "tokenizer.model").write_bytes(b"x")
    for i in range(2):
        with open(path / f"model-0000{i + 1}-of-00002.safetensors", "wb") as f:
            f.truncate(size // 2)
    return path


def link(folder: Path, root: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = weights_main(["link", "llama-7b", str(folder), "--dir", str(root)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_link_accepts_a_hugging_face_llama1_7b_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "weights"
    code, said = link(fake_hf_folder(tmp_path / "llama-7b-hf"), root, capsys)
    assert code == 0 and "linked llama-7b as a Hugging Face folder" in said
    assert (root / "llama-7b-hf").is_symlink()
    assert auto_choice(root).model == "official" and "Hugging Face" in auto_choice(root).reason


@pytest.mark.parametrize("config, size, expected", [
    ({"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, 13_476_000_000, "is Llama-2-7B"),
    ({"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632}, 2_200_000_000,
     "LLaMA-family model of another size (hidden_size 2048, num_hidden_layers 22"),
    ({"model_type": "qwen2"}, 13_476_000_000, "holds a 'qwen2' model"),
    ({}, 6_000_000_000, "add up to 6.0 GB"),
])
def test_link_says_what_a_wrong_folder_holds(tmp_path: Path, capsys: pytest.CaptureFixture, config: dict,
                                             size: int, expected: str) -> None:
    root = tmp_path / "weights"
    code, said = link(fake_hf_folder(tmp_path / "model", size, **config), root, capsys)
    assert code == 1 and expected in said, said
    assert not (root / "llama-7b-hf").exists()


# -- the registry's SmolLM2 through the product ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Engine:
    if packaged("smollm2-135m-instruct").path() is None:
        pytest.skip(f"SmolLM2's GGUF file is not installed: {packaged('smollm2-135m-instruct').member} "
                    f"({packaged('smollm2-135m-instruct').install})")
    return ModelOptions(model="smollm2", device="cpu").engine()


def test_smollm2_runs_from_its_package_with_its_chat_template(smollm2: Engine) -> None:
    assert smollm2.card is not None and smollm2.card.name == "SmolLM2-135M-Instruct"
    assert not smollm2.sees_images and isinstance(smollm2.prompt_format, ChatTemplateFormat)
    assert smollm2.max_seq_len == 2048
    app = ChatApp(smollm2, None, None, AppConfig())
    session = ChatSession()
    answer, details = app.api_chat(None, "What is the capital of France?", [], [], 0.0, 1.0, 16)
    assert smollm2.model.dtype in (torch.float32, torch.bfloat16)
    assert "Paris" in answer and "<|im_end|>" not in answer
    assert details["prompt"].startswith("<|im_start|>system\n") and details["prompt"].endswith("<|im_start|>assistant\n")
    assert "model: SmolLM2-135M" in details["stats"]
    # a follow-up: the earlier turn is a user/assistant pair of the template, the context sits in the user turn
    plan = app.plan(session, "And of Italy?", "[ocr] ROMA", 16)
    fmt = app.prompting.format  # the chat template, in the app's prompt style
    findings = app.prompting.render("[ocr] ROMA")
    assert plan.ids == smollm2.tokenizer.encode_chat(fmt.messages("And of Italy?", [], findings))
    assert findings in plan.prompt.split("<|im_start|>user\n")[-1] and "ROMA" in findings


def test_a_follow_up_prompt_extends_the_first_so_its_prefix_is_reused(smollm2: Engine) -> None:
    """The default prompt style keeps the findings with the first question about the image: a first
    question is asked as with the findings in the latest turn, and the follow-up's ids begin with the
    first request's ids followed by its answer, so the engine prefills only the new turn."""
    from app.prompting import DEFAULT_STYLE, Prompting, prompting_for
    from multimodal.prompt import ChatTemplateFormat

    assert DEFAULT_STYLE == "prose-lookup"
    first = prompting_for(smollm2.prompt_format)
    # the same examples with the findings in the latest user turn (context_in="user")
    latest = Prompting(ChatTemplateFormat(first.format.tokenizer, first.format.system, examples=first.format.examples,
                                          checks=first.format.checks, shown=first.format.shown), first.render)
    findings = first.render("[ocr] ROMA\n[detection] 2 people\n[detection] Colours: people: 2 black.")
    assert first.format.ids("Where is this?", [], findings) == latest.format.ids("Where is this?", [], findings)
    ids1 = first.format.ids("Where is this?", [], findings)
    ids2 = first.format.ids("How many people?", [("Where is this?", "In Rome.")], findings)
    assert ids2[:len(ids1)] == ids1 and smollm2.tokenizer.decode(ids2[len(ids1):]).startswith("In Rome.")
    assert smollm2.tokenizer.decode(ids2).count("ROMA") == 1  # the findings once, in the first turn
    new_turn = smollm2.tokenizer.decode(ids2[len(ids1):])
    assert "How many people?\nFindings check: 2 people.\n" in new_turn  # the check, under the new question
    ids3 = first.format.ids("What colour are they?", [("Where is this?", "In Rome."), ("How many people?", "Two.")],
                            findings)
    assert ids3[:len(ids2)] == ids2  # extends the follow-up's prompt too
    prompt = smollm2.tokenizer.decode(ids3)
    # the colours line is not among the findings shown, only in the check under the question that asks
    assert "Colours" not in prompt and prompt.count("black") == 1
    assert "What colour are they?\nFindings check: the people: 2 black.\n" in prompt
    moved = latest.format.ids("How many people?", [("Where is this?", "In Rome.")], findings)
    assert moved[:len(ids1)] != ids1  # the other style moves them to the latest turn: the prefix breaks


def test_chat_template_ids_equal_transformers_for_a_conversation(smollm2: Engine) -> None:
    pytest.importorskip("gguf")
    path = packaged("smollm2-135m-instruct").path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fmt = smollm2.prompt_format
    messages = fmt.messages("How many people?", [("What is it?", "A bus.")], "[detection] 4 people, 1 bus")
    assert smollm2.tokenizer.encode_chat(messages) == reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_cli_runs_the_registry_model_and_a_text_only_base_needs_no_clip(tiny_files: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    if packaged("smollm2-135m-instruct").path() is None:
        pytest.skip(f"SmolLM2's GGUF file is not installed ({packaged('smollm2-135m-instruct').install})")
    run = subprocess.run([sys.executable, "-m", "multimodal", "--model", "smollm2", "--temperature", "0",
                          "--weights-dir", str(tmp_path), "What is the capital of France?"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Paris" in run.stdout, run.stderr[-2000:]
    assert "Model: SmolLM2-135M-Instruct" in run.stderr
    # a Meta-format base with no adapter, in a weights folder without any CLIP file
    base = ModelOptions(llama_dir=str(tiny_files["llama_dir"]), tokenizer=str(tiny_files["tokenizer_path"]),
                        adapter="none", weights_dir=str(tmp_path), device="cpu")
    loaded, card = base.load_with_card()
    assert not loaded.model.has_vision and card.name == "llama"


def test_a_meta_folder_finds_its_tokenizer_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "7B"
    folder.mkdir()
    cfg = TINY_LLAMA
    torch.save(random_meta_state(cfg), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                                                    "n_kv_heads": cfg.kv_heads, "multiple_of": cfg.multiple_of,
                                                    "norm_eps": cfg.norm_eps, "vocab_size": -1}))
    from tiny import train_tokenizer

    train_tokenizer(tmp_path / "tokenizer.model", vocab_size=cfg.vocab_size)
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert loaded.tokenizer.n_words == cfg.vocab_size and not loaded.model.has_vision
