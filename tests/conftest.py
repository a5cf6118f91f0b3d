"""Fixtures built in code: a tiny random LLaVA (no download), random images, prompts."""
import numpy as np
import pytest
import torch
from PIL import Image

from qapruner.model import tiny

PROMPTS = ["USER: <image> what digit is in the top left ? ASSISTANT:",
           "USER: <image> how many digits are there ? ASSISTANT:",
           "USER: <image> is there a red digit ? ASSISTANT:",
           "USER: <image> what is the largest digit on left ? ASSISTANT:"]


def make_images(n: int, seed: int = 0, size=(120, 130)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def llava():
    torch.manual_seed(0)
    return tiny(seed=0)


@pytest.fixture(scope="session")
def outlier_llava():
    """The tiny model with a few massive residual channels (as real LLMs have): RMSNorm scales ×40 on 4 of
    128 channels, so that per-token activation quantization is dominated by them."""
    m = tiny(seed=0)
    with torch.no_grad():
        for layer in m.model.model.language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 40
    return m


@pytest.fixture(scope="session")
def images():
    return make_images(4)


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, llava):
    """The tiny LLaVA saved as a llava-hf directory (what `python -m export --model` reads)."""
    from qapruner.model import save

    return save(llava, tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory):
    """A small calibration folder in the shipped format (8 DigitsVQA pairs)."""
    from export.calibration import build

    out = tmp_path_factory.mktemp("calib") / "calibration"
    build(out, n_scenes=6, photo_scenes=1, include_matplotlib=False)
    return out
