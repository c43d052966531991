"""Which model to load: options shared by the command line and the app (flag > environment > default)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PRESETS
from .loading import LoadedModel, load_model

if TYPE_CHECKING:
    from .generate import Engine


DEMO_FILES = ("params.json", "consolidated.00.pth", "tokenizer.model", "clip.pt", "adapter.pth")


def demo_dir(weights_root: str | os.PathLike | None = None) -> Path:
    """The project's own small demo model, committed under weights/demo/ (preset "demo")."""
    from weights import weights_dir

    return weights_dir(weights_root) / "demo"


def demo_available(weights_root: str | os.PathLike | None = None) -> bool:
    return all((demo_dir(weights_root) / f).is_file() for f in DEMO_FILES)


@dataclass
class ModelOptions:
    weights_dir: str | None = None  # None: $MM_WEIGHTS_DIR or <repo>/weights
    model: str = "auto"  # "official" (LLaMA-7B + released adapter), "demo", or "auto": official if present, else demo
    adapter: str | None = "llama-adapter-bias-7b"  # manifest name or a file path; "none" for the bare LLaMA
    preset: str = "official-7b"
    llama_dir: str | None = None  # explicit paths override the weights folder
    tokenizer: str | None = None
    clip: str | None = None
    device: str | None = None  # None: cuda, then mps, then cpu
    dtype: str | None = None  # None: fp32 on cpu, bf16/fp16 on gpu
    max_seq_len: int | None = None
    bgr: bool | None = None  # None: the preset's channel order
    quantize: str | None = None  # "int8": weight-only int8 language model (torchao)
    compile: bool = False  # torch.compile the decoding step (CUDA graphs on a GPU); see Engine
    merge_lora: bool = True  # fold LoRA into the frozen weights at load (then no LoRA adapter can be swapped in)

    def engine(self) -> Engine:
        """Load the model and wrap it in an Engine with these options."""
        from .generate import Engine

        return Engine(self.load(), compile=self.compile)

    def load(self) -> LoadedModel:
        """Resolve every path (through the weights manifest unless given) and load the model.
        A missing file raises weights.MissingWeightError naming it and the command that fetches it."""
        from weights import MissingWeightError, require

        if self.model == "demo":
            return self.load_demo()
        if self.model == "auto" and not self.llama_dir:
            try:
                require("llama-7b", self.weights_dir)
            except MissingWeightError:
                if demo_available(self.weights_dir):
                    return self.load_demo()
                raise
        llama_dir = Path(self.llama_dir) if self.llama_dir else require("llama-7b", self.weights_dir)
        tokenizer = Path(self.tokenizer) if self.tokenizer else _beside(llama_dir, "tokenizer.model")
        clip = Path(self.clip) if self.clip else require("clip-vit-l-14", self.weights_dir)
        if self.adapter in (None, "", "none"):
            adapter = None
        elif Path(self.adapter).suffix in (".pth", ".pt"):
            adapter = Path(self.adapter)
        else:
            adapter = require(self.adapter, self.weights_dir)
        return load_model(llama_dir, tokenizer, clip, adapter, preset=self.preset, device=self.device,
                          dtype=self.dtype, max_seq_len=self.max_seq_len, bgr=self.bgr, quantize=self.quantize,
                          pack=self._pack, merge_lora=self.merge_lora)

    @property
    def _pack(self) -> bool | None:
        """Compiled steps and oneDNN-packed weights exclude each other (inductor needs plain weights)."""
        return False if self.compile else None

    def load_demo(self) -> LoadedModel:
        d = demo_dir(self.weights_dir)
        missing = [f for f in DEMO_FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"the demo model is incomplete: {', '.join(str(d / f) for f in missing)} missing "
                                    "(see weights/demo/README.md for the command that trains it)")
        return load_model(d, d / "tokenizer.model", d / "clip.pt", d / "adapter.pth", preset="demo",
                          device=self.device, dtype=self.dtype, max_seq_len=self.max_seq_len, bgr=False,
                          quantize=self.quantize, pack=self._pack, merge_lora=self.merge_lora)


def _beside(llama_dir: Path, name: str) -> Path:
    """Meta's layout keeps tokenizer.model in the parent of the 7B folder; the weights folder keeps it inside."""
    inside = llama_dir / name
    return inside if inside.exists() or not (llama_dir.parent / name).exists() else llama_dir.parent / name


def add_model_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = parser.add_argument_group("model")
    g.add_argument("--weights-dir", default=env("MM_WEIGHTS_DIR"), help="weights folder (env MM_WEIGHTS_DIR)")
    g.add_argument("--model", default=env("MM_MODEL", "auto"), choices=["auto", "official", "demo"],
                   help="official LLaMA-7B + adapter, the project's small demo model, or auto: official when its "
                        "weights are present, else the demo (env MM_MODEL)")
    g.add_argument("--adapter", default=env("MM_ADAPTER", "llama-adapter-bias-7b"),
                   help="adapter: a weights-manifest name, a .pth file, or 'none' (env MM_ADAPTER)")
    g.add_argument("--preset", default=env("MM_PRESET", "official-7b"), choices=PRESETS, help="model layout (env MM_PRESET)")
    g.add_argument("--llama-dir", default=env("MM_LLAMA_DIR"), help="Meta LLaMA folder with params.json and consolidated.*.pth")
    g.add_argument("--tokenizer", default=env("MM_TOKENIZER"), help="tokenizer.model (default: beside the LLaMA weights)")
    g.add_argument("--clip", default=env("MM_CLIP"), help="OpenAI CLIP file (ViT-L-14.pt)")
    g.add_argument("--device", default=env("MM_DEVICE"), choices=["cpu", "cuda", "mps"], help="default: cuda, mps, else cpu")
    g.add_argument("--dtype", default=env("MM_DTYPE"), choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 (or float16) on gpu. On a CPU with avx512_bf16 or AMX, "
                        "bfloat16 halves the memory and decodes faster (weights prepacked for oneDNN) (env MM_DTYPE)")
    g.add_argument("--max-seq-len", type=int, default=None, help="prompt + answer tokens (default 512)")
    g.add_argument("--quantize", default=env("MM_QUANTIZE"), choices=["int8"],
                   help="weight-only int8 language model (torchao): LLaMA-7B in about 7 GB (env MM_QUANTIZE)")
    g.add_argument("--compile", action="store_true", default=env("MM_COMPILE") == "1",
                   help="torch.compile each decoding step (CUDA graphs on a GPU): the app compiles it at start, "
                        "the command line on its first answer (env MM_COMPILE=1)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="bgr", action="store_true", default=None,
                       help="feed BGR pixels (what the released checkpoints were trained on; the official preset's default)")
    order.add_argument("--rgb", dest="bgr", action="store_false", help="feed RGB pixels")


def options_from_args(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(weights_dir=args.weights_dir, model=args.model, adapter=args.adapter, preset=args.preset, llama_dir=args.llama_dir,
                        tokenizer=args.tokenizer, clip=args.clip, device=args.device, dtype=args.dtype,
                        max_seq_len=args.max_seq_len, bgr=args.bgr, quantize=args.quantize,
                        compile=args.compile)
