"""Scoring a generated dataset: oracle label consistency written into the manifest, CLIP filtering into a view
that the synthetic DataModule reads."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lbgen.cli import cli_main
from lbgen.datamodules import SyntheticDataModule, read_manifest
from lbgen.evaluation import label_consistency
from lbgen.models import ClassifierSystem
from lbgen.models.scoring import CONSISTENCY_FILE, VIEW_DIR, filter_view

from .conftest import REPO, load_recipe, shrink

NAMES = ["a", "b"]


def fake_records(probs: list[list[float]]) -> list[dict]:
    return [{"id": f"c{c}-i{i}", "class_index": c, "scores": {"clip_prob": p, "oracle_agrees": p > 0.5}}
            for c, row in enumerate(probs) for i, p in enumerate(row)]


def test_filter_rules():
    records = fake_records([[0.9, 0.8, 0.2, 0.1, 0.6], [0.3, 0.35, 0.4, 0.45, 0.05]])
    view = filter_view(records, NAMES, "global", 0.5, 0.0)
    assert set(view["kept"]) == {"c0-i0", "c0-i1", "c0-i4"}  # class b is emptied by a global threshold
    assert view["per_class"]["b"]["kept"] == 0 and view["per_class"]["a"]["oracle_agrees_rejected"] == 0.0
    view = filter_view(records, NAMES, "per_class", 0.5, 0.4)  # the 2 least probable of each class go
    assert set(view["kept"]) == {"c0-i0", "c0-i1", "c0-i4", "c1-i2", "c1-i3", "c1-i1"}
    assert view["n_total"] == 10 and view["n_kept"] == 6
    assert filter_view(records, NAMES, "none", 0.5, 0.4)["n_kept"] == 10
    with pytest.raises(ValueError, match="reject_fraction"):
        filter_view(records, NAMES, "per_class", 0.5, 1.0)


@pytest.mark.slow
def test_scoring_writes_consistency_scores_and_a_view_the_datamodule_reads(recipe_paths, tmp_path):
    folder = tmp_path / "syn"
    shutil.copytree(recipe_paths["synthetic"], folder)
    tree = shrink(load_recipe(REPO / "configs/evaluate/score_synthetic.yaml"), {**recipe_paths, "out": tmp_path})
    tree["data"]["init_args"]["folder"] = str(folder)
    tree["model"]["init_args"].update(filter_mode="global", threshold=0.1)
    tree["trainer"].update(accelerator="cpu", default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    recipe = tmp_path / "score.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    cli_main(["predict", "-c", str(recipe)])

    _, records = read_manifest(folder)  # still a valid manifest
    assert len(records) == 20 and all({"oracle_label", "oracle_agrees", "oracle_prob", "clip_prob"} <= set(
        r["scores"]) for r in records)
    report = json.loads((folder / CONSISTENCY_FILE).read_text())
    oracle = ClassifierSystem.load_from_checkpoint(recipe_paths["oracle"], map_location="cpu", weights_only=True)
    expected = label_consistency(oracle, folder, image_size=16)  # the Python API, on the same images
    assert report["overall"] == pytest.approx(expected["overall"]) and report["n"] == 20
    assert [r["scores"]["oracle_label"] for r in records] == expected["predictions"]
    assert report["per_setting"] == pytest.approx(expected["per_setting"])

    view = json.loads((folder / VIEW_DIR / "clip_filtered.json").read_text())
    assert set(view["kept"]) == {r["id"] for r in records if r["scores"]["clip_prob"] >= 0.1}
    assert "| class |" in (folder / VIEW_DIR / "clip_filtered.md").read_text()
    data = SyntheticDataModule(str(folder), view="clip_filtered", image_size=16)
    assert len(data.records) == view["n_kept"] and {r["id"] for r in data.records} == set(view["kept"])
    with pytest.raises(FileNotFoundError, match="score the dataset first"):
        SyntheticDataModule(str(folder), view="other", image_size=16)
    view["n_total"] = 99  # a view of another state of the dataset
    (folder / VIEW_DIR / "clip_filtered.json").write_text(json.dumps(view))
    with pytest.raises(ValueError, match="another state"):
        SyntheticDataModule(str(folder), view="clip_filtered", image_size=16)


def test_scorer_refuses_nothing_to_score():
    from lbgen.models import ScoringSystem

    with pytest.raises(ValueError, match="Nothing to score"):
        ScoringSystem()
    with pytest.raises(ValueError, match="needs a CLIP judge"):
        ScoringSystem(oracle_checkpoint="x.ckpt", filter_mode="global")
