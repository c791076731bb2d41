"""The captioner extractor runs a real (tiny, random, offline) BLIP through the transformers pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lbgen.attributes.bank import mentions_class
from lbgen.attributes.captioner import CaptionerAttributeExtractor, clean_answer

from .conftest import save_tiny_blip

CLASS_WORDS = ["shirt", "boot", "bag", "dress", "coat"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "in", "front", "seen", "from",
         "side", "top", "object", "garment", "grass", "wall", *CLASS_WORDS]
CLASS_NAMES = ["T-shirt/top", "Ankle boot", "Bag", "Dress", "Coat"]
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BLIP captioner whose language head favours class words, so a leak would show."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny_blip") / "blip", VOCAB, CLASS_WORDS)


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_describes_background_and_pose_without_remote_code(tiny_blip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    calls = []
    real_pipeline = transformers.pipeline

    def recording_pipeline(*args, **kwargs):
        calls.append(kwargs)
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(transformers, "pipeline", recording_pipeline)
    extractor = CaptionerAttributeExtractor(str(tiny_blip), descriptor="garment", max_new_tokens=6, batch_size=2)
    assert extractor.extractor_id == f"captioner:{tiny_blip}"
    out = extractor.describe(images(3))
    assert len(out) == 3
    for d in out:
        assert set(d) == {"background", "pose"}
        assert all(isinstance(v, str) and v.strip() and v == v.lower() and len(v.split()) <= 10 for v in d.values())
    extractor.describe(images(1))
    assert len(calls) == 1 and calls[0]["trust_remote_code"] is False  # built once, lazily, without remote code
    assert str(calls[0]["device"]) == "cpu"


@pytest.mark.parametrize("chat", [False, True])
def test_never_names_a_class(tiny_blip: Path, chat: bool) -> None:
    extractor = CaptionerAttributeExtractor(str(tiny_blip), task="image-text-to-text", descriptor="garment",
                                            background_prompt="a photo of a {descriptor} in front of",
                                            pose_prompt="the {descriptor} seen from", max_new_tokens=8)
    extractor.prepare(CLASS_NAMES)
    if chat:  # a chat vision-language model; BlipProcessor.from_pretrained drops a saved chat template, so set it here
        extractor._pipeline(torch.device("cpu")).processor.chat_template = CHAT_TEMPLATE
    raw = extractor.describe(images(3))
    assert any(mentions_class(v, CLASS_NAMES) for d in raw for v in d.values())  # the model does emit class words
    for d in extractor(images(3), CLASS_NAMES):
        for value in d.values():
            assert value.strip() and mentions_class(value, CLASS_NAMES) == []
    with pytest.raises(ValueError, match="names classes"):
        CaptionerAttributeExtractor(str(tiny_blip), descriptor="bag").prepare(CLASS_NAMES)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*save_pretrained"):
        CaptionerAttributeExtractor(str(missing)).describe(images(1))
    for local_files_only in (None, True):  # None: offline because conftest sets HF_HUB_OFFLINE
        extractor = CaptionerAttributeExtractor("nonexistent-org/nonexistent-captioner",
                                                local_files_only=local_files_only)
        with pytest.raises(OSError, match="(?s)'nonexistent-org/nonexistent-captioner'.*hf download"):
            extractor.describe(images(1))


def test_clean_answer() -> None:
    prompt = "a photo of a garment in front of"
    assert clean_answer("A photo of a garment in front of a White Wall. It is nice", prompt) == "a white wall"
    assert clean_answer("  ...  ") == "plain"
    assert clean_answer(" ".join(["word"] * 30)) == " ".join(["word"] * 10)
    with pytest.raises(ValueError, match="descriptor"):
        CaptionerAttributeExtractor("x", background_prompt="a {thing}")
