"""BOB: attribute bank, class-agnostic extraction, attribute captions, marginalised generation requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from lbgen.attributes import (
    DEFAULT_CAPTION,
    AttributeBank,
    ClipAttributeExtractor,
    mentions_class,
    scrub_class_names,
)
from lbgen.components import ClipScorer
from lbgen.components.prompts import fill_caption
from lbgen.datamodules import (
    FASHION_MNIST_CLASSES,
    AttributeCaptionedDataModule,
    FashionMNISTDataModule,
    GenerationRequestsDataModule,
)

from .test_alignment_components import TINY_CLIP

CLASSES = list(FASHION_MNIST_CLASSES)
BACKGROUNDS = ["brick wall", "green grass", "moon surface", "starry night sky", "gravel"]
POSES = ["upright", "tilted left", "tilted right"]


def biased_bank(per_class: int = 20, seed: int = 0) -> AttributeBank:
    """A bank where each class mostly sits on its own background: what marginalisation must break."""
    rng = np.random.default_rng(seed)
    records = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            own = rng.random() < 0.9
            background = BACKGROUNDS[c % len(BACKGROUNDS)] if own else BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            records.append({"id": f"train:{c * 1000 + i}", "class_index": c, "class_name": name,
                            "background": background, "pose": POSES[rng.integers(len(POSES))], "extractor": "test"})
    return AttributeBank(records=records, class_names=CLASSES, descriptor="garment", extractor="test")


def test_caption_is_built_as_specified():
    assert DEFAULT_CAPTION == "a {descriptor} photo of a {class} in the {background} background with the {pose} pose"
    assert fill_caption(DEFAULT_CAPTION, "Ankle boot", "brick wall", "tilted left", "garment") == (
        "a garment photo of a Ankle boot in the brick wall background with the tilted left pose")
    with pytest.raises(ValueError, match="needs a background"):
        fill_caption(DEFAULT_CAPTION, "Bag", None, "upright", "garment")
    with pytest.raises(ValueError, match="unknown field"):
        fill_caption("a {colour} {class}", "Bag")


def test_scrub_removes_every_class_name_and_part():
    text = "A T-shirt/top next to an ankle boot; the top is folded, a shirt and a Bag on trousers"
    scrubbed = scrub_class_names(text, CLASSES, "garment")
    assert mentions_class(scrubbed, CLASSES) == []
    assert "garment" in scrubbed and "trousers" not in scrubbed.lower()  # plurals are mentions too
    assert mentions_class("a boot-like shape", CLASSES) == [] and mentions_class("two boots", CLASSES) == ["boots"]
    assert mentions_class("laptop stand", CLASSES) == []  # a word containing "top" is not a mention


def test_bank_round_trip_and_validation(tmp_path):
    bank = biased_bank()
    path = bank.save(tmp_path / "attributes.json")
    loaded = AttributeBank.load(path, CLASSES)
    assert loaded.records == bank.records and loaded.descriptor == "garment"
    summary = json.loads(path.read_text())["summary"]["background"]  # counts for a person reviewing the file
    backgrounds = [r["background"] for r in bank.records]
    assert summary == {b: backgrounds.count(b) for b in set(backgrounds)}
    with pytest.raises(ValueError, match="made for classes"):
        AttributeBank.load(path, CLASSES[::-1])
    data = json.loads(path.read_text())
    data["records"][3]["background"] = "a sneaker on grass"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="names class"):
        AttributeBank.load(path)
    data["records"][3]["background"] = "grass"
    data["records"][4]["id"] = data["records"][5]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="duplicate id"):
        AttributeBank.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AttributeBank.load(path)
    with pytest.raises(FileNotFoundError, match="configs/bob/attributes.yaml"):
        AttributeBank.load(tmp_path / "missing.json")


def test_clip_extractor_picks_from_the_vocabularies_and_never_names_a_class():
    torch.manual_seed(0)
    clip = ClipScorer(model_name="tiny", pretrained=None, model_config=TINY_CLIP)
    extractor = ClipAttributeExtractor(clip, BACKGROUNDS, POSES, descriptor="garment")
    extractor.prepare(CLASSES)
    out = extractor(torch.rand(12, 3, 32, 32), CLASSES)
    assert len(out) == 12
    assert all(d["background"] in BACKGROUNDS and d["pose"] in POSES for d in out)
    assert all(mentions_class(v, CLASSES) == [] for d in out for v in d.values())
    leaking = ClipAttributeExtractor(clip, [*BACKGROUNDS, "a pile of sneakers"], POSES)
    with pytest.raises(ValueError, match="names classes"):
        leaking.prepare(CLASSES)


def _requests(bank_path, sampling: str, n: int = 300) -> list[dict]:
    return GenerationRequestsDataModule(
        class_names=CLASSES, images_per_class=n, attribute_mode=sampling, attribute_bank=str(bank_path),
        prompt_template=DEFAULT_CAPTION).requests()


def _independence_p(requests: list[dict]) -> float:
    table = np.zeros((len(CLASSES), len(BACKGROUNDS)))
    for r in requests:
        table[r["class_index"], BACKGROUNDS.index(r["background"])] += 1
    return chi2_contingency(table).pvalue


def test_marginalised_attributes_are_independent_of_the_class(tmp_path):
    path = biased_bank().save(tmp_path / "attributes.json")
    bob = _requests(path, "bob")
    # 3000 draws: the bank's strong class-background link (90%) is gone under marginalisation ...
    assert _independence_p(bob) > 1e-3
    # ... and stays under conditioning (the test has the power to see a dependence)
    assert _independence_p(_requests(path, "conditioned")) < 1e-12
    r = bob[0]
    assert r["prompt"] == (f"a garment photo of a {r['class_name']} in the {r['background']} background with the "
                           f"{r['pose']} pose")
    assert r["attribute_mode"] == "bob" and r["attributes_from"].startswith("train:")
    # seeded per request: a request draws the same attributes however many requests are made
    assert _requests(path, "bob", n=5) == [r for r in _requests(path, "bob", n=7) if r["index"] < 5]


def test_generation_attribute_options_are_checked(tmp_path):
    path = biased_bank().save(tmp_path / "attributes.json")
    edited = biased_bank()
    edited.records[0]["background"] = "gravel" if edited.records[0]["background"] != "gravel" else "brick wall"
    other = edited.save(tmp_path / "edited.json")
    described = [GenerationRequestsDataModule(class_names=CLASSES, attribute_mode="bob", attribute_bank=str(p),
                                              prompt_template=DEFAULT_CAPTION).describe() for p in (path, other)]
    assert described[0] != described[1]  # a resumed generation refuses an edited bank
    with pytest.raises(ValueError, match="needs attribute_bank"):
        GenerationRequestsDataModule(class_names=CLASSES, attribute_mode="bob", prompt_template=DEFAULT_CAPTION)
    with pytest.raises(ValueError, match="uses attributes"):
        GenerationRequestsDataModule(class_names=CLASSES, prompt_template=DEFAULT_CAPTION)
    with pytest.raises(ValueError, match="made for classes"):
        GenerationRequestsDataModule(class_names=CLASSES[:5], attribute_mode="bob", attribute_bank=str(path),
                                     prompt_template=DEFAULT_CAPTION)


def test_captioned_datamodule_gives_bank_captions_and_plain_ones(fmnist_fixture, tmp_path):
    data = FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, shots=3, batch_size=30)
    images, labels = data.pool
    records = [{"id": images.sample_id(int(p)), "class_index": int(labels[p]), "background": f"bg{int(p) % 4}",
                "pose": "upright"} for p in data.split.train]
    path = AttributeBank(records=records, class_names=CLASSES, descriptor="garment", extractor="t").save(
        tmp_path / "bank.json")
    bob = AttributeCaptionedDataModule(FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, shots=3,
                                                              batch_size=30), attribute_bank=str(path))
    bob.setup("fit")
    batch = next(iter(bob.train_dataloader()))
    for caption, index, label in zip(batch["caption"], batch["index"].tolist(), batch["label"].tolist(), strict=True):
        assert caption == (f"a garment photo of a {CLASSES[label]} in the bg{index % 4} background with the upright "
                           "pose")
    assert not batch["caption_plain"].any()  # every caption here is the image's own
    plain = AttributeCaptionedDataModule(FashionMNISTDataModule(root=str(fmnist_fixture), image_size=16, shots=3,
                                                                batch_size=30), caption_template="a photo of a {class}")
    plain.setup("fit")
    batch = next(iter(plain.train_dataloader()))
    assert batch["caption"] == [f"a photo of a {CLASSES[c]}" for c in batch["label"].tolist()]
    assert batch["caption_plain"].all()  # the plain class caption: true of the whole class
    other_split = AttributeCaptionedDataModule(FashionMNISTDataModule(
        root=str(fmnist_fixture), image_size=16, shots=3, split_seed=1, batch_size=30), attribute_bank=str(path))
    with pytest.raises(ValueError, match="no record for"):
        other_split.setup("fit")


def test_bank_agreement_counts_equal_words_over_common_images():
    names = ["a", "b"]
    exact = AttributeBank(records=[{"id": f"i{k}", "class_index": k % 2, "background": "grass", "pose": "upright"}
                                   for k in range(4)], class_names=names, descriptor="thing", extractor="exact")
    guess = AttributeBank(records=[{"id": "i0", "class_index": 0, "background": "grass", "pose": "upright"},
                                   {"id": "i1", "class_index": 1, "background": "brick", "pose": "upright"},
                                   {"id": "x", "class_index": 0, "background": "grass", "pose": "tilted"}],
                          class_names=names, descriptor="thing", extractor="clip")
    assert guess.agreement(exact) == {"n": 2, "background": 0.5, "pose": 1.0, "both": 0.5}
    other = AttributeBank(records=[{"id": "y", "class_index": 0, "background": "grass", "pose": "upright"}],
                          class_names=names, descriptor="thing", extractor="clip")
    with pytest.raises(ValueError, match="no image in common"):
        other.agreement(exact)
