"""Class maps: folders named by ids (ImageNet's WordNet ids) get human names, in the real data's folder order."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
from PIL import Image

from lbgen.datamodules import (
    ClassNamesDataModule,
    EpisodeDataModule,
    GenerationRequestsDataModule,
    ImageFolderDataModule,
    MixedDataModule,
)
from lbgen.datamodules.class_names import class_list_difference, names_for_folders, read_class_file, read_class_names

from .conftest import REPO

# ImageNet's first classes, deliberately not in sorted order in the map files below
WNIDS = {"n01443537": "goldfish, Carassius auratus", "n01440764": "tench, Tinca tinca",
         "n01484850": "great white shark, white shark, man-eater"}
SORTED_NAMES = ["tench", "goldfish", "great white shark"]


def write_folder(root: Path, classes, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def loc_synset_mapping(path: Path, entries: dict[str, str] = WNIDS) -> Path:
    """ImageNet's LOC_synset_mapping.txt format: 'wnid name, synonym, ...' separated by a space."""
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in entries.items()))
    return path


def test_every_format_reads_to_the_same_names_in_sorted_folder_order(tmp_path):
    short = {wnid: name.split(",")[0] for wnid, name in WNIDS.items()}
    (tmp_path / "map.json").write_text(json.dumps(short))
    (tmp_path / "map.tsv").write_text("# folder<TAB>name\n\n" + "".join(f"{k}\t{v}\n" for k, v in short.items()))
    loc_synset_mapping(tmp_path / "LOC_synset_mapping.txt")
    (tmp_path / "names.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    for name in ("map.json", "map.tsv"):
        assert read_class_file(tmp_path / name) == short
        assert read_class_names(None, str(tmp_path / name)) == SORTED_NAMES
    assert read_class_file(tmp_path / "LOC_synset_mapping.txt") == WNIDS  # whole names, synonyms included
    assert read_class_names(None, str(tmp_path / "LOC_synset_mapping.txt"), first_name_only=True) == SORTED_NAMES
    assert read_class_names(None, str(tmp_path / "names.txt")) == SORTED_NAMES  # a plain list: as written
    # a plain list of multi-word names is not mistaken for a space-separated map
    assert read_class_file(tmp_path / "names.txt") == SORTED_NAMES


def test_malformed_class_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n01440764": "tench", "n01440764": "tinca"}')
    with pytest.raises(ValueError, match=r"lists folder\(s\) 'n01440764' more than once"):
        read_class_file(bad)
    bad.write_text('{"n01440764": ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_class_file(bad)
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("n01440764\ttench\nn01443537 goldfish\n")
    with pytest.raises(ValueError, match=r"line\(s\) \[2\] have no TAB"):
        read_class_file(mixed)
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\n")
    with pytest.raises(ValueError, match="is a list of names, not a class map"):
        read_class_file(names, need_map=True)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_class_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="exactly one of class_names"):
        read_class_names(["a", "b"], str(names))


def test_image_folder_of_wordnet_ids_gets_human_names(tmp_path):
    root = write_folder(tmp_path / "train", WNIDS)
    mapping = loc_synset_mapping(tmp_path / "LOC_synset_mapping.txt")
    data = ImageFolderDataModule(str(root), class_names_file=str(mapping), first_name_only=True, image_size=8)
    assert data.class_names == SORTED_NAMES
    assert data.class_folders == sorted(WNIDS)  # the folders stay the keys
    data.setup("fit")
    assert data.split_record()["train"][0].startswith("n01440764/")
    # what a generation run records (run.json's requests.class_names) and prompts: the human names
    requests = GenerationRequestsDataModule(source_data=data, images_per_class=1)
    assert requests.describe()["class_names"] == SORTED_NAMES
    assert {r["prompt"] for r in requests.requests()} == {f"a photo of a {n}" for n in SORTED_NAMES}


def test_a_map_that_does_not_fit_the_folders_names_the_offenders(tmp_path):
    root = write_folder(tmp_path / "train", ["n01440764", "n01443537", "n09999999"])
    mapping = loc_synset_mapping(tmp_path / "map.txt")  # no n09999999; names n01484850, which is no folder
    with pytest.raises(ValueError) as raised:
        ImageFolderDataModule(str(root), class_names_file=str(mapping))
    message = str(raised.value)
    assert "no name for folder(s) 'n09999999'" in message
    assert "names folder(s) 'n01484850' that do not exist" in message
    duplicate = loc_synset_mapping(tmp_path / "dup.txt", {"n01440764": "crane", "n01443537": "crane",
                                                          "n09999999": "tench"})
    with pytest.raises(ValueError, match=r"Duplicate class names \['crane'\].*'crane' for n01440764, n01443537"):
        ImageFolderDataModule(str(root), class_names_file=str(duplicate))
    plain = tmp_path / "names.txt"
    plain.write_text("tench\ngoldfish\nshark\n")
    with pytest.raises(ValueError, match="not a class map"):
        ImageFolderDataModule(str(root), class_names_file=str(plain))


def test_class_names_and_generation_requests_read_the_same_maps(tmp_path):
    mapping = loc_synset_mapping(tmp_path / "LOC_synset_mapping.txt")
    assert ClassNamesDataModule(class_names_file=str(mapping), first_name_only=True).class_names == SORTED_NAMES
    requests = GenerationRequestsDataModule(class_names_file=str(mapping), first_name_only=True, images_per_class=1)
    assert requests.class_names == SORTED_NAMES
    assert requests.requests()[0]["prompt"] in {f"a photo of a {n}" for n in SORTED_NAMES}
    with pytest.raises(ValueError, match="exactly one of class_names"):
        GenerationRequestsDataModule(class_names=["a", "b"], class_names_file=str(mapping))
    # a list in another order than the real folders': the first differing position and both names
    real = ImageFolderDataModule(str(write_folder(tmp_path / "train", WNIDS)), class_names_file=str(mapping),
                                 first_name_only=True)
    with pytest.raises(ValueError, match=r"first difference at position 0: source_data 'tench', class_names "
                                         r"'goldfish'"):
        GenerationRequestsDataModule(class_names=["goldfish", "tench", "great white shark"], source_data=real)


def test_mixed_and_episode_class_checks_name_the_first_difference(tmp_path):
    real = ImageFolderDataModule(str(write_folder(tmp_path / "train", ["cat", "dog", "fox"])))
    synthetic = SimpleNamespace(class_names=["cat", "fox", "dog"], dataset_name="synthetic:run", image_size=32,
                                predict_split="train")
    with pytest.raises(ValueError, match=r"position 1: real 'dog', synthetic \(synthetic:run\) 'fox'"):
        MixedDataModule(real, synthetic)
    with pytest.raises(ValueError, match=r"position 1: real 'dog', synthetic 'fox'"):
        EpisodeDataModule(real, synthetic)
    assert class_list_difference(["a", "b"], ["a", "b", "c"], "x", "y") == (
        "2 vs 3 classes; first difference at position 2: x (no class), y 'c'")
    assert class_list_difference(["a"], ["a"], "x", "y") == ""


def test_shipped_imagenet_map_is_the_wordnet_order_of_the_names_list():
    shipped = read_class_file(REPO / "configs/lbgen/imagenet_class_map.txt")
    info = Path(timm.__file__).parent / "data" / "_info"
    wnids = (info / "imagenet_synsets.txt").read_text().split()
    names = (REPO / "configs/lbgen/imagenet_classes.txt").read_text().splitlines()
    assert list(shipped) == wnids == sorted(wnids) and len(wnids) == 1000
    assert list(shipped.values()) == names  # the names list is in WordNet-id order: both files agree
    assert read_class_names(None, str(REPO / "configs/lbgen/imagenet_class_map.txt")) == names
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    differ = {w: shipped[w] for w in wnids if lemmas[w].split(",")[0].strip().lower() != shipped[w].lower()}
    assert differ == {"n02012849": "crane (bird)", "n03126707": "crane (machine)",
                      "n03710637": "maillot (leotard)", "n03710721": "maillot (tank suit)"}
    # LOC_synset_mapping.txt read with first_name_only repeats crane and maillot: refused, pointing at the shipped map
    with pytest.raises(ValueError, match=r"Duplicate class names \['crane', 'maillot'\].*imagenet_class_map"):
        names_for_folders({w: lemmas[w].split(",")[0] for w in wnids}, wnids, "LOC_synset_mapping.txt")
