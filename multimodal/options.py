"""Which model to load: options shared by the command line and the app (flag > environment > default)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from weights.choice import DEMO_FILES  # noqa: F401 (the demo's file list, for callers of this module)

from .card import ModelCard, custom_card, demo_card, official_card, smollm2_card
from .config import PRESETS
from .loading import LoadedModel, load_model

if TYPE_CHECKING:
    from .generate import Engine


def demo_dir(weights_root: str | os.PathLike | None = None) -> Path:
    """The project's own small demo model, committed under weights/demo/ (preset "demo")."""
    from weights.choice import demo_dir as folder

    return folder(weights_root)


def demo_available(weights_root: str | os.PathLike | None = None) -> bool:
    from weights.choice import demo_missing

    return not demo_missing(weights_root)


MODELS = ("auto", "official", "smollm2", "demo")

# SmolLM2 bias-tuned to answer from the experts' findings, where `python -m multimodal.train findings` writes
# it (the repository's weights folder, whatever --weights-dir says): SmolLM2's default adapter once it is
# there. Not shipped: on the project's question sets it scored the same as the released model with worked
# examples (docs/experts.md). `--adapter none` runs SmolLM2 as released.
FINDINGS_ADAPTER = Path(__file__).resolve().parents[1] / "weights" / "smollm2-findings" / "adapter.pth"


def findings_adapter() -> str | None:
    return str(FINDINGS_ADAPTER) if FINDINGS_ADAPTER.is_file() else None


@dataclass
class ModelOptions:
    weights_dir: str | None = None  # None: $MM_WEIGHTS_DIR or <repo>/weights
    model: str = "auto"  # see MODELS
    adapter: str | None = None  # manifest name, .pth file or PEFT folder; "none"; None: the model's default
    preset: str = "official-7b"
    llama_dir: str | None = None  # a base of your own: Meta or Hugging Face folder, or a .gguf file
    tokenizer: str | None = None
    clip: str | None = None
    device: str | None = None  # None: cuda, then mps, then cpu
    dtype: str | None = None  # None: fp32 on cpu, bf16/fp16 on gpu
    max_seq_len: int | None = None
    bgr: bool | None = None  # None: the preset's channel order
    quantize: str | None = None  # "int8": weight-only int8 language model (torchao)
    compile: bool = False  # torch.compile the decoding step (CUDA graphs on a GPU); see Engine
    merge_lora: bool = True  # fold LoRA into the frozen weights at load (then no LoRA adapter can be swapped in)
    batch: int = 1  # > 1: that many requests decode together (continuous batching: multimodal/batching.py)
    decode_threads: str = "auto"  # CPU threads per decoding step: "auto" (measured at load), or a number
    int4: bool = True  # bfloat16 decoding on a CPU reads a GGUF file's 4-bit codes (int4.py); False: dense weights

    def engine(self) -> Engine:
        """Load the model and wrap it in an Engine with these options; ``engine.card`` says which it is."""
        from .generate import Engine

        if self.batch > 1 and self.compile:
            raise ValueError("--batch and --compile cannot be combined yet: the batched step runs eagerly")
        loaded, card = self.load_with_card()
        if self.batch > 1:
            from .batching import BatchEngine

            return BatchEngine(loaded, slots=self.batch, card=card)
        return Engine(loaded, compile=self.compile, card=card, decode_threads=self.decode_threads)

    def load(self) -> LoadedModel:
        return self.load_with_card()[0]

    def choice(self) -> str:
        """Which model ``load`` would load now: "official", "base" (linked), "smollm2", "demo" or "custom"
        (a base path given)."""
        from weights.choice import auto_choice

        if self.model in ("demo", "smollm2"):
            return self.model
        if self.llama_dir:
            return "custom"
        return auto_choice(self.weights_dir).model if self.model == "auto" else "official"

    def load_with_card(self) -> tuple[LoadedModel, ModelCard]:
        """Resolve every path (through the weights manifest unless given) and load the model.
        A missing file raises weights.MissingWeightError naming it and the command that gets it."""
        from weights.choice import linked_base, official_base
        from weights.packaged import require_packaged

        choice = self.choice()
        if choice == "demo":
            return self.load_demo(), demo_card()
        if choice == "smollm2":
            base = require_packaged("smollm2-135m-instruct")
        elif choice == "base":
            base = linked_base(self.weights_dir)
        else:
            base = Path(self.llama_dir) if self.llama_dir else official_base(self.weights_dir)
        default = {"official": "llama-adapter-bias-7b", "smollm2": findings_adapter()}.get(choice)
        adapter, adapter_name = self._adapter(default=default)
        clip = self._clip(adapter)
        loaded = load_model(base, self.tokenizer, clip, adapter, preset=self.preset, device=self.device,
                            dtype=self.dtype or self._default_dtype(choice),
                            max_seq_len=self.max_seq_len or self._default_context(choice),
                            bgr=self.bgr, quantize=self.quantize, pack=self._pack, merge_lora=self.merge_lora,
                            codes=self._codes(base, adapter), int4=self.int4 and not self.compile)
        if choice == "official":
            card = official_card(adapter_name)
        elif choice == "smollm2":
            card = smollm2_card(adapter_name, tuned=adapter is not None and adapter.resolve() == FINDINGS_ADAPTER.resolve())
        else:
            card = custom_card(base.resolve().name, adapter_name, sees_images=loaded.model.has_vision)
        return loaded, card

    def _adapter(self, default: str | None) -> tuple[Path | None, str | None]:
        """The adapter (a file or PEFT folder as given, a weights-manifest name, or none) and its name
        for people."""
        from weights import require

        name = self.adapter if self.adapter is not None else default
        if name in (None, "", "none"):
            return None, None
        path = Path(name)
        if path.suffix in (".pth", ".pt") or path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"adapter not found: {path}")
            return path, path.name
        return require(name, self.weights_dir), name

    def _clip(self, adapter: Path | None) -> Path | None:
        """The CLIP file, asked of the weights folder only when the adapter has a visual part."""
        from weights import require

        from .checkpoint import read_adapter

        if self.clip:
            return Path(self.clip)
        if adapter is None or adapter.is_dir() or not read_adapter(adapter).has_resampler:
            return None  # a text-only model (PEFT adapters have no visual part)
        return require("clip-vit-l-14", self.weights_dir)

    def _default_dtype(self, choice: str) -> str | None:
        """Chat bases on a CPU with native bf16 run in bfloat16 with packed weights: 2.3x the decoding
        speed of fp32 for SmolLM2 (docs/performance.md), and its GGUF weights are 4- and 8-bit already.
        Elsewhere (and for the released 7B adapters and the demo) the device's default."""
        from .loading import default_device
        from .packing import packing_pays

        device = torch.device(self.device) if self.device else default_device()
        if choice in ("smollm2", "base", "custom") and device.type == "cpu" and not self.compile and \
                self.quantize is None and packing_pays(device, torch.bfloat16):
            return "bfloat16"
        return None

    @staticmethod
    def _default_context(choice: str) -> int | None:
        """Chat bases get room for a conversation with expert context; the released 7B checkpoints keep
        the 512 tokens they were trained with (LlamaConfig's default)."""
        return 2048 if choice in ("smollm2", "custom", "base") else None

    @property
    def _pack(self) -> bool | None:
        """Compiled steps and oneDNN-packed weights exclude each other (inductor needs plain weights)."""
        return False if self.compile else None

    def _codes(self, base: Path, adapter: Path | None) -> bool:
        """A compiled step reads a GGUF file's 4/8-bit codes instead of float32 weights (coded.py):
        the same weights, a quarter of the bytes per token. Not with LoRA (merged weights differ from
        the file's) nor int8; an adapter of biases and norms (the findings tuning) leaves them as stored."""
        if not (self.compile and self.quantize is None and base.suffix == ".gguf"):
            return False
        if adapter is None:
            return True
        from .checkpoint import read_adapter

        return not adapter.is_dir() and read_adapter(adapter).lora_rank == 0  # biases and norms leave W as stored

    def load_demo(self) -> LoadedModel:
        d = demo_dir(self.weights_dir)
        from weights.choice import demo_missing

        missing = demo_missing(self.weights_dir)
        if missing:
            raise FileNotFoundError(f"the demo model is incomplete: {', '.join(str(d / f) for f in missing)} missing "
                                    "(see weights/demo/README.md for the command that trains it)")
        return load_model(d, d / "tokenizer.model", d / "clip.pt", d / "adapter.pth", preset="demo",
                          device=self.device, dtype=self.dtype, max_seq_len=self.max_seq_len, bgr=False,
                          quantize=self.quantize, pack=self._pack, merge_lora=self.merge_lora)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = parser.add_argument_group("model")
    g.add_argument("--weights-dir", default=env("MM_WEIGHTS_DIR"), help="weights folder (env MM_WEIGHTS_DIR)")
    g.add_argument("--model", default=env("MM_MODEL", "auto"), choices=MODELS,
                   help="official: LLaMA-7B + a released adapter; smollm2: SmolLM2-135M-Instruct from its package "
                        "(a small chat model that reads the experts); demo: the project's toy-world model; auto: "
                        "official when its weights are present, else a base linked with `python -m weights link "
                        "base PATH`, else smollm2, else the demo. --base runs a base of your own (env MM_MODEL)")
    g.add_argument("--adapter", default=env("MM_ADAPTER"),
                   help="adapter: a weights-manifest name, an official-format .pth file, a PEFT AdaptionPrompt folder, "
                        "or 'none' (default: llama-adapter-bias-7b for the official model, none for other bases; "
                        "env MM_ADAPTER)")
    g.add_argument("--preset", default=env("MM_PRESET", "official-7b"), choices=PRESETS, help="model layout (env MM_PRESET)")
    g.add_argument("--llama-dir", "--base", dest="llama_dir", default=env("MM_LLAMA_DIR"),
                   help="a LLaMA-family base of your own: Meta's folder (params.json, consolidated.*.pth), a Hugging "
                        "Face folder (config.json, *.safetensors or *.bin), or a .gguf file (env MM_LLAMA_DIR)")
    g.add_argument("--tokenizer", default=env("MM_TOKENIZER"),
                   help="Meta's tokenizer.model when it is neither in nor beside the Meta folder (Hugging Face folders "
                        "and GGUF files carry their own)")
    g.add_argument("--clip", default=env("MM_CLIP"), help="OpenAI CLIP file (ViT-L-14.pt)")
    g.add_argument("--device", default=env("MM_DEVICE"), choices=["cpu", "cuda", "mps"], help="default: cuda, mps, else cpu")
    g.add_argument("--dtype", default=env("MM_DTYPE"), choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on cpu, bfloat16 (or float16) on gpu. On a CPU with avx512_bf16 or AMX, "
                        "bfloat16 halves the memory and decodes faster (weights prepacked for oneDNN) (env MM_DTYPE)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + answer tokens (default: 512 for the released 7B adapters, 2048 for chat bases)")
    g.add_argument("--quantize", default=env("MM_QUANTIZE"), choices=["int8"],
                   help="weight-only int8 language model (torchao): LLaMA-7B in about 7 GB (env MM_QUANTIZE)")
    g.add_argument("--compile", action="store_true", default=env("MM_COMPILE") == "1",
                   help="torch.compile each decoding step (CUDA graphs on a GPU): the app compiles it at start, "
                        "the command line on its first answer (env MM_COMPILE=1)")
    g.add_argument("--decode-threads", default=env("MM_DECODE_THREADS", "auto"), type=_threads_choice,
                   help="CPU threads for each decoding step: auto (default: one thread or all of torch's, whichever "
                        "decodes faster when measured at load; a small model decodes faster on one), or a number; "
                        "the prompt is always read with all of them (env MM_DECODE_THREADS)")
    g.add_argument("--int4", action=argparse.BooleanOptionalAction, default=env("MM_INT4", "1") != "0",
                   help="a GGUF base's 4-bit weights decode through PyTorch's int4 kernel in bfloat16 on a CPU, as "
                        "stored (default; about 1.5x SmolLM2's decoding speed); --no-int4 decodes from the dense "
                        "weights (env MM_INT4=0)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="bgr", action="store_true", default=None,
                       help="feed BGR pixels (what the released checkpoints were trained on; the official preset's default)")
    order.add_argument("--rgb", dest="bgr", action="store_false", help="feed RGB pixels")


def _threads_choice(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected auto or a number of threads (1 or more), not {value!r}")
    return value


def options_from_args(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(weights_dir=args.weights_dir, model=args.model, adapter=args.adapter, preset=args.preset, llama_dir=args.llama_dir,
                        tokenizer=args.tokenizer, clip=args.clip, device=args.device, dtype=args.dtype,
                        max_seq_len=args.max_seq_len, bgr=args.bgr, quantize=args.quantize,
                        compile=args.compile, decode_threads=args.decode_threads, int4=args.int4)
