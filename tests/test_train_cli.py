"""The training command as users run it: one process, and two processes under torchrun (DDP over Gloo on
the CPU), writing a checkpoint the normal loader reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal.adapter import is_trainable
from multimodal.checkpoint import read_adapter
from multimodal.loading import load_model
from multimodal.toyworld import generate_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_world(tmp_path_factory.mktemp("world"), n_images=24, n_instructions=8, seed=5, image_size=32)


def command(files: dict[str, Path], data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["adapter", "--preset", "tiny-early", "--llama-dir", str(files["llama_dir"]),
            "--tokenizer", str(files["tokenizer_path"]), "--clip", str(files["clip_path"]),
            "--captions", str(data["captions"]), "--instructions", str(data["conversations"]), str(data["instructions"]),
            "--out", str(out), "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--no-progress",
            "--device", "cpu", "--threads", "1", *extra]


def run(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_checkpoint(files: dict[str, Path], out: Path, steps: int) -> None:
    ckpt = read_adapter(out / "adapter.pth")
    assert ckpt.config["step"] == steps and ckpt.config["preset"] == "tiny-early"
    assert ckpt.state and all(is_trainable(k) for k in ckpt.state)
    assert any(v.abs().max() > 0 for k, v in ckpt.state.items() if k.endswith(".gate"))  # the gates opened
    load_model(files["llama_dir"], files["tokenizer_path"], files["clip_path"], out / "adapter.pth", preset="tiny-early",
               device="cpu", dtype="float32")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == steps and {"caption", "instruction"} <= set(log[-1])


def test_single_process_command_then_resume(tiny_files: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    proc = run(command(tiny_files, data, tmp_path / "run"), [sys.executable, "-m", "multimodal.train"])
    assert "wrote" in proc.stderr and "world size 1" in proc.stderr
    check_checkpoint(tiny_files, tmp_path / "run", 3)
    run(command(tiny_files, data, tmp_path / "run", "--steps", "5", "--resume"), [sys.executable, "-m", "multimodal.train"])
    check_checkpoint(tiny_files, tmp_path / "run", 5)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 5 and state["optimizer"]["state"]


def test_torchrun_two_processes_ddp(tiny_files: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "multimodal.train"]
    proc = run(command(tiny_files, data, tmp_path / "ddp", "--grad-accum", "2"), launcher)
    assert "world size 2" in proc.stderr
    check_checkpoint(tiny_files, tmp_path / "ddp", 3)
