"""Training from scratch on CPU: the loss falls, only the intended parameters move (frozen ones stay
bit-identical), each data kind trains only its own group, and the checkpoint loads through the normal
loader with nothing but trainable keys."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multimodal.adapter import is_trainable
from multimodal.checkpoint import official_to_ours
from multimodal.loading import LoadedModel, load_model
from multimodal.toyworld import generate_world
from multimodal.train.build import load_for_training
from multimodal.train.data import Sample, read_captions, read_instructions
from multimodal.train.groups import param_groups
from multimodal.train.trainer import TrainConfig, TrainResult, train_adapter

PRESET = "tiny-early"  # visual tokens in layers 0-1, adaption prompts in layers 2-3: disjoint groups
CFG = TrainConfig(phase="joint", steps=24, batch_size=8, lr=1e-2, warmup_steps=2, max_len=128, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample]]:
    files = generate_world(tmp_path_factory.mktemp("world"), n_images=48, n_instructions=24, seed=3, image_size=32)
    captions = read_captions(files["captions"])
    instructions = read_instructions(files["conversations"]) + read_instructions(files["instructions"])
    return captions, instructions


def fresh(files: dict[str, Path], preset: str = PRESET, **kw: object) -> LoadedModel:
    torch.manual_seed(0)  # the resampler's and adaption prompts' random init
    return load_for_training(files["llama_dir"], files["tokenizer_path"], files["clip_path"], preset, device="cpu",
                             dtype="float32", **kw)


def snapshot(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.named_parameters()}


def changed(before: dict[str, torch.Tensor], loaded: LoadedModel) -> set[str]:
    return {k for k, v in loaded.model.named_parameters() if not torch.equal(v, before[k])}


@pytest.fixture(scope="module")
def joint(tiny_files: dict[str, Path], world: tuple[list[Sample], list[Sample]],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, dict[str, torch.Tensor], TrainResult, Path]:
    loaded = fresh(tiny_files)
    before = snapshot(loaded)
    out = tmp_path_factory.mktemp("joint")
    result = train_adapter(loaded, *world, CFG, out)
    return loaded, before, result, out


def test_joint_training_lowers_both_losses(joint: tuple) -> None:
    _, _, result, _ = joint
    h = result.history
    assert len(h) == CFG.steps
    for kind in ("caption", "instruction"):
        first = sum(r[kind] for r in h[:3]) / 3
        last = sum(r[kind] for r in h[-3:]) / 3
        assert last < 0.85 * first, f"{kind} loss {first:.3f} -> {last:.3f}"


def test_only_trainable_parameters_change_and_the_base_stays_bit_identical(joint: tuple) -> None:
    loaded, before, _, _ = joint
    groups = param_groups(loaded.model, loaded.config, "joint")
    moved = changed(before, loaded)
    frozen = [k for k in before if not is_trainable(k)]
    assert frozen and not moved & set(frozen)
    assert any(k.startswith("clip.") for k in frozen) and "llama.layers.0.attention.wk.weight" in frozen
    assert moved == set(groups.all)  # every trained parameter moved, nothing else did
    assert {k for k in moved if "prompt_gate" in k} == {f"llama.layers.{i}.attention.prompt_gate.gate" for i in range(4)}


def test_groups_follow_the_paper(tiny_files: dict[str, Path]) -> None:
    loaded = fresh(tiny_files)
    g = param_groups(loaded.model, loaded.config, "joint")
    assert not set(g.caption) & set(g.instruction)
    assert set(g.caption) == {k for k in g.all if k.startswith("resampler.")} | {
        "llama.layers.0.attention.prompt_gate.gate", "llama.layers.1.attention.prompt_gate.gate"}
    assert "adapter_query.weight" in g.instruction and "llama.layers.3.attention.prompt_gate.gate" in g.instruction
    assert "llama.layers.0.attention.wq.bias" in g.instruction and "llama.norm.weight" in g.instruction
    assert "llama.layers.1.feed_forward.w2.scale" in g.instruction
    official = fresh(tiny_files, preset="tiny", lora_rank=2)
    pre = param_groups(official.model, official.config, "pretrain")
    assert not pre.instruction and "adapter_query.weight" in pre.caption
    assert "llama.layers.2.attention.prompt_gate.gate" in pre.caption and not any(".bias" in k and k.startswith("llama.") for k in pre.caption)
    fin = param_groups(official.model, official.config, "finetune")
    assert not fin.caption and not any("gate" in k or k.startswith(("resampler.", "adapter_query.")) for k in fin.instruction)
    assert "llama.layers.1.attention.wq.lora_a" in fin.instruction and "llama.layers.1.ffn_norm.weight" in fin.instruction


@pytest.mark.parametrize("kind", ["caption", "instruction"])
def test_one_data_kind_trains_only_its_own_group(tiny_files: dict[str, Path], world: tuple, tmp_path: Path, kind: str) -> None:
    captions, instructions = world
    loaded = fresh(tiny_files)
    before = snapshot(loaded)
    groups = param_groups(loaded.model, loaded.config, "joint")
    data = (captions, []) if kind == "caption" else ([], instructions)
    train_adapter(loaded, *data, replace(CFG, steps=3), tmp_path)
    own, other = (groups.caption, groups.instruction) if kind == "caption" else (groups.instruction, groups.caption)
    assert changed(before, loaded) == set(own)
    assert all(torch.equal(dict(loaded.model.named_parameters())[k], before[k]) for k in other)


def test_in_a_joint_step_each_loss_reaches_only_its_group(tiny_files: dict[str, Path], world: tuple, tmp_path: Path) -> None:
    """AdamW updates each parameter from its own gradient only, so after one joint step the visual group
    must be exactly where a caption-only step puts it, and the instruction group where an
    instruction-only step puts it: neither loss leaked into the other group."""
    captions, instructions = world
    one = replace(CFG, steps=1)
    runs = {}
    for name, data in {"joint": (captions, instructions), "caption": (captions, []), "instruction": ([], instructions)}.items():
        loaded = fresh(tiny_files)
        train_adapter(loaded, *data, one, tmp_path / name)
        runs[name] = dict(loaded.model.named_parameters())
    groups = param_groups(fresh(tiny_files).model, fresh(tiny_files).config, "joint")
    for k in groups.caption:
        assert torch.equal(runs["joint"][k], runs["caption"][k]), k
    for k in groups.instruction:
        assert torch.equal(runs["joint"][k], runs["instruction"][k]), k


def test_checkpoint_holds_only_trainable_keys_and_loads_through_the_normal_loader(tiny_files: dict[str, Path], joint: tuple) -> None:
    loaded, _, result, out = joint
    assert result.adapter_path == out / "adapter.pth"
    raw = torch.load(out / "adapter.pth", weights_only=True)
    assert set(raw) == {"model", "config"}
    ours = {official_to_ours(k) for k in raw["model"]}
    assert all(is_trainable(k) for k in ours)
    assert ours == set(loaded.model.trainable_state_dict())
    assert "visual_query.weight" in raw["model"] and "llama.layers.0.attention.gate" in raw["model"]  # official names
    reloaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], out / "adapter.pth",
                          preset=PRESET, device="cpu", dtype="float32")
    trained = dict(loaded.model.named_parameters())
    for k, v in reloaded.model.named_parameters():
        assert torch.equal(v, trained[k]), k
    tokens = torch.tensor([[1, 5, 9, 2]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(tokens, pixels), loaded.model(tokens, pixels))


def test_resume_continues_exactly_where_it_stopped(tiny_files: dict[str, Path], world: tuple, tmp_path: Path) -> None:
    cfg = replace(CFG, steps=6, grad_accum=2, batch_size=4)
    straight = fresh(tiny_files)
    train_adapter(straight, *world, cfg, tmp_path / "straight")
    interrupted = fresh(tiny_files)
    train_adapter(interrupted, *world, replace(cfg, stop_at=3), tmp_path / "resumed")
    again = fresh(tiny_files)  # a new process: fresh init, state comes from the checkpoint
    result = train_adapter(again, *world, cfg, tmp_path / "resumed", resume=True)
    assert [r["step"] for r in result.history] == [4, 5, 6]
    expected = dict(straight.model.named_parameters())
    for k, v in again.model.named_parameters():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0, msg=k)


def test_official_phases_train_their_own_sets(tiny_files: dict[str, Path], world: tuple, tmp_path: Path) -> None:
    captions, instructions = world
    pre = fresh(tiny_files, preset="tiny")
    before = snapshot(pre)
    train_adapter(pre, captions, [], replace(CFG, phase="pretrain", steps=2), tmp_path / "pre")
    assert changed(before, pre) == set(param_groups(pre.model, pre.config, "pretrain").caption)
    fin = fresh(tiny_files, preset="tiny", init_adapter=tmp_path / "pre" / "adapter.pth", lora_rank=2)
    before = snapshot(fin)
    torch.testing.assert_close(before["resampler.visual_query.weight"], dict(pre.model.named_parameters())["resampler.visual_query.weight"])
    train_adapter(fin, [], instructions, replace(CFG, phase="finetune", steps=2), tmp_path / "fin")
    moved = changed(before, fin)
    assert moved and all(k.endswith(("norm.weight", ".bias", ".lora_a", ".lora_b")) for k in moved)
    assert "llama.layers.1.attention.wq.lora_b" in moved  # zero-init LoRA does learn (unlike the released code)
    with pytest.raises(ValueError, match="pretrain"):
        train_adapter(fresh(tiny_files, preset="tiny"), [], instructions, replace(CFG, phase="pretrain"), tmp_path / "x")


def test_bf16_autocast_keeps_trainable_parameters_fp32(tiny_files: dict[str, Path], world: tuple, tmp_path: Path) -> None:
    loaded = fresh(tiny_files)
    before = snapshot(loaded)
    result = train_adapter(loaded, *world, replace(CFG, steps=2, precision="bf16"), tmp_path)
    assert all(torch.isfinite(torch.tensor(r["caption"])) for r in result.history)
    assert all(p.dtype == torch.float32 for k, p in loaded.model.named_parameters() if is_trainable(k))
    assert not changed(before, loaded) - set(param_groups(loaded.model, loaded.config, "joint").all)
