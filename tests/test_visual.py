"""The visual path against open_clip's own code, and image input handling."""
from __future__ import annotations

import io
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from conftest import fixture_path
from multimodal.checkpoint import CheckpointError, read_openai_clip_visual
from multimodal.config import TINY_CLIP, ClipVisionConfig
from multimodal.image import ImageError, ImagePreprocessor, open_image
from multimodal.visual import build_clip_vision, clip_tokens
from tiny import tiny_clip


def test_clip_tokens_match_open_clips_forward(tmp_path: Path) -> None:
    """All tokens after ln_post and proj: CLS equals open_clip's pooled embedding, patches equal its
    (ln_post'd) tokens times proj."""
    sd = tiny_clip(TINY_CLIP, seed=1).state_dict()
    reference = open_clip.model.build_model_from_openai_state_dict(dict(sd)).float().eval()
    torch.save(reference.state_dict(), tmp_path / "clip.pt")  # the fp16-rounded weights both sides use
    ours = build_clip_vision(TINY_CLIP)
    ours.load_state_dict(read_openai_clip_visual(tmp_path / "clip.pt"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = clip_tokens(ours.eval(), x)
        reference.visual.output_tokens = True
        pooled, patches = reference.visual(x)
    assert tokens.shape == (2, TINY_CLIP.n_tokens, TINY_CLIP.output_dim)
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], patches @ reference.visual.proj, atol=1e-5, rtol=1e-5)


def test_reads_torchscript_clip_archive(tmp_path: Path) -> None:
    """OpenAI ships ViT-L-14.pt as TorchScript; the loader takes its visual.* weights."""

    class Wrapper(torch.nn.Module):
        def __init__(self, clip: torch.nn.Module) -> None:
            super().__init__()
            self.visual = clip.visual
            self.logit_scale = clip.logit_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    clip = tiny_clip(TINY_CLIP, seed=2)
    traced = torch.jit.trace(Wrapper(clip), torch.randn(1, 3, 32, 32), check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    visual = read_openai_clip_visual(tmp_path / "ViT-tiny.pt")
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(visual[k], v), k


def test_rejects_a_file_that_is_not_clip(tmp_path: Path) -> None:
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI-format CLIP"):
        read_openai_clip_visual(tmp_path / "x.pt")


def test_preprocessing_is_clips_transform_and_bgr_reverses_channels() -> None:
    image = open_image(fixture_path("images/bus.jpg"))
    cfg = ClipVisionConfig()
    reference = open_clip.transform.image_transform(224, is_train=False, mean=cfg.mean, std=cfg.std)
    rgb = ImagePreprocessor(cfg)(image)
    assert rgb.shape == (3, 224, 224)
    torch.testing.assert_close(rgb, reference(image), atol=1e-6, rtol=0)
    # the released checkpoints saw cv2.imread's BGR pixels normalised with the RGB statistics
    bgr = ImagePreprocessor(cfg, bgr=True)(image)
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    torch.testing.assert_close(bgr, ((rgb * std + mean).flip(0) - mean) / std, atol=1e-5, rtol=0)


def test_open_image_refuses_bad_input_clearly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "nowhere.png")
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(buf, format="PNG")
    with pytest.raises(ImageError, match="broken or truncated"):
        open_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    # a decompression bomb is refused from its header, before decoding
    big = io.BytesIO()
    Image.new("1", (9000, 9000)).save(big, format="PNG")
    with pytest.raises(ImageError, match="9000x9000"):
        open_image(big.getvalue())
    rgba = Image.new("RGBA", (10, 20), (10, 20, 30, 0))
    assert open_image(rgba).mode == "RGB" and open_image(rgba).size == (10, 20)


def test_importing_ultralytics_leaves_pil_alone(tmp_path: Path) -> None:
    """Ultralytics replaces PIL's Image.open on import; the detection expert restores it, so upload
    checks keep PIL's behaviour (and never trigger Ultralytics' requirements check)."""
    from experts.detection import _import_yolo

    pil_open = Image.open
    _import_yolo()
    assert Image.open is pil_open
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "notes.png")
