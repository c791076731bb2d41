"""GeNIe-Ada: the chosen r is where the judge's belief crosses from the source class to the target class."""

from __future__ import annotations

import pytest
import torch

from lbgen.components.genie_ada import adaptive_strength, crossing_index


def test_crossing_index_first_crossing_or_last():
    target = torch.tensor([[0.1, 0.6, 0.2], [0.4, 0.7, 0.3], [0.9, 0.8, 0.4]])  # 3 strengths x 3 images
    source = torch.tensor([[0.8, 0.3, 0.7], [0.5, 0.2, 0.6], [0.05, 0.1, 0.5]])
    assert crossing_index(target, source).tolist() == [2, 0, 2]  # image 2 never crosses: the largest r


def test_adaptive_strength_picks_the_image_at_the_crossing():
    strengths = [0.5, 0.6, 0.7, 0.8]
    switch = torch.tensor([0.55, 0.75, 0.95])  # image i turns into the target above this r

    def generate(r: float) -> torch.Tensor:  # image brightness encodes r, so the choice is visible in the output
        return torch.full((3, 3, 4, 4), r)

    def judge(images: torch.Tensor) -> torch.Tensor:
        r = images[:, 0, 0, 0]
        target_p = (r > switch).float() * 0.8 + 0.1
        probs = torch.zeros(3, 5)
        probs[torch.arange(3), torch.tensor([1, 1, 1])] = target_p  # target class 1
        probs[torch.arange(3), torch.tensor([0, 2, 3])] = 1 - target_p  # sources 0, 2, 3
        return probs

    images, chosen, target = adaptive_strength(generate, judge, strengths, torch.tensor([0, 2, 3]),
                                               torch.tensor([1, 1, 1]))
    assert chosen.tolist() == pytest.approx([0.6, 0.8, 0.8])
    assert images[:, 0, 0, 0].tolist() == pytest.approx([0.6, 0.8, 0.8]) and target.shape == (4, 3)
    with pytest.raises(ValueError, match="increasing"):
        adaptive_strength(generate, judge, [0.8, 0.5], torch.tensor([0]), torch.tensor([1]))


def test_genie_ada_generation_keeps_each_image_at_its_chosen_ratio(tiny_generator, fmnist_fixture, tmp_path,
                                                                   monkeypatch):
    """Each GeNIe-Ada image is byte for byte the fixed-r GeNIe image (same request, same seed) at its chosen r, and
    that r is where the judge's belief first crosses from the source class to the target class."""
    from lbgen.components import ClipScorer
    from lbgen.models import generation
    from lbgen.models.scoring import consistency_report

    from .test_alignment_components import TINY_CLIP
    from .test_generation import generate, pngs

    judged = {}  # (class, source class, recorded target probabilities) -> the judge's (target, source) along the sweep

    def recording_adaptive_strength(generate_at, judge_images, strengths, source, target):
        probs = []
        result = adaptive_strength(generate_at, lambda x: probs.append(judge_images(x).float().cpu()) or probs[-1],
                                   strengths, source, target)
        rows, stacked = torch.arange(len(target)), torch.stack(probs)  # [S, B, classes]
        for i, (t, s) in enumerate(zip(stacked[:, rows, target].T, stacked[:, rows, source].T, strict=True)):
            judged[int(target[i]), int(source[i]), tuple(round(float(p), 4) for p in t)] = (t, s)
        return result

    monkeypatch.setattr(generation, "adaptive_strength", recording_adaptive_strength)
    sweep = [0.4, 0.7, 1.0]
    judge = ClipScorer(model_name="tiny", pretrained=None, model_config=TINY_CLIP)
    _, ada = generate(tiny_generator, fmnist_fixture, tmp_path / "ada", method="genie", images_per_class=2,
                      model_kwargs={"ada_strengths": sweep, "ada_judge": judge})
    assert {r["ada_strength"] for r in ada} <= set(sweep) and all(len(r["ada_target_prob"]) == 3 for r in ada)
    fixed = {r: pngs(tmp_path / f"r{r}") for r in sweep
             if generate(tiny_generator, fmnist_fixture, tmp_path / f"r{r}", method="genie", strength=r,
                         images_per_class=2)}
    ada_images = pngs(tmp_path / "ada")
    for record in ada:
        name = record["id"] + ".png"
        assert ada_images[name] == fixed[record["ada_strength"]][name]
        chosen = sweep.index(record["ada_strength"])
        target_p, source_p = judged[record["class_index"], record["source_class"], tuple(record["ada_target_prob"])]
        assert (target_p[:chosen] <= source_p[:chosen]).all(), "an earlier r already crossed"
        assert target_p[chosen] > source_p[chosen] or chosen == len(sweep) - 1, "no crossing at the chosen r"
    records = [{**r, "scores": {"oracle_agrees": True}} for r in ada]
    assert set(consistency_report(records, [str(i) for i in range(10)])["per_setting"]) == {"genie@ada"}
    with pytest.raises(ValueError, match="needs a judge"):
        generate(tiny_generator, fmnist_fixture, tmp_path / "x", method="genie", model_kwargs={"ada_strengths": sweep})
