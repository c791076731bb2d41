"""Bad input gets a clear error: the message names the offending value and says what to do, the exit code is
non-zero, and nothing that already exists is overwritten. Weights, checkpoints, manifests and attribute banks are
loaded safely (no unpickled code, no model code unless asked for) and validated when read.

Every test uses real files and real tiny models: a cut PNG, an empty folder, a pickled ``.pt`` whose payload would
create a file, a LoRA saved for another UNet, a generated dataset written by a real (tiny) generation run.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lbgen.attributes.bank import AttributeBank
from lbgen.cli import cli_main
from lbgen.components import PretrainedGenerator, TimmBackbone, build_generator, load_generator, load_state_dict
from lbgen.components.lora import add_lora, save_lora
from lbgen.datamodules import (
    BadImageError,
    FashionMNISTDataModule,
    GenerationRequestsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    read_manifest,
)
from lbgen.models import ClassifierSystem, GenerationSystem
from lbgen.storage.dataset_format import MANIFEST_FILE, RUN_FILE, SHARD_DIR, export_image_folder

from ..conftest import REPO

# names that would escape or hide a folder if they were ever used as paths
UNSAFE_NAMES = ["T-shirt/top", "..", ".hidden", "Café ☕", "../../escape"]
TINY = {"image_size": 16, "vae_channels": (16, 32), "unet_channels": (16, 32), "cross_attention_dim": 16,
        "attention_head_dim": 4, "text_layers": 1, "text_heads": 2, "max_prompt_length": 16, "seed": 0}


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def generate(generator: Path, out: Path, data: GenerationRequestsDataModule) -> Path:
    model = GenerationSystem(PretrainedGenerator(str(generator)), output_dir=str(out), num_inference_steps=1,
                               shard_size=8)
    _trainer().predict(model, data, return_predictions=False)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was written, moved or deleted."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synthetic_run(tiny_generator, tmp_path_factory) -> Path:
    """A finished generation run (txt2img, 1 image per class) whose class names are unsafe as paths."""
    data = GenerationRequestsDataModule(class_names=UNSAFE_NAMES, images_per_class=1, batch_size=8, base_seed=0)
    return generate(tiny_generator, tmp_path_factory.mktemp("runs") / "synthetic", data)


@pytest.fixture(scope="module")
def other_run(tiny_generator, tmp_path_factory) -> Path:
    """The same requests with another base seed: another run, with images and seeds of its own."""
    data = GenerationRequestsDataModule(class_names=UNSAFE_NAMES, images_per_class=1, batch_size=8, base_seed=1)
    return generate(tiny_generator, tmp_path_factory.mktemp("runs") / "other", data)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# --- images and class folders -----------------------------------------------------------------------------------
def test_truncated_and_non_image_files_are_named_with_the_fix(tmp_path):
    root = write_image_folder(tmp_path / "train")
    png = (root / "dog" / "1.png").read_bytes()
    (root / "dog" / "1.png").write_bytes(png[: len(png) // 2])  # a truncated PNG
    (root / "cat" / "notes.jpg").write_text("not an image, just named like one")
    with pytest.raises(BadImageError) as bad:
        ImageFolderDataModule(str(root), image_size=16).setup("fit")
    message = str(bad.value)
    assert re.search(r"cat/notes\.jpg|dog/1\.png", message) and "skip_bad_images" in message
    assert "truncated or not an image" in message and "Replace or delete it" in message

    data = ImageFolderDataModule(str(root), image_size=16, skip_bad_images=True)
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        data.setup("fit")
    assert len(data.train_dataset) == 5  # 3 + 3 readable images minus the truncated one

    for path in (root / "dog").iterdir():  # every image of a class unreadable: refuse, do not drop the class
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"No readable image left in class folder\(s\) .*train/dog.*add readable"):
        ImageFolderDataModule(str(root), image_size=16, skip_bad_images=True).setup("fit")


def test_empty_class_folders_are_named(tmp_path):
    root = write_image_folder(tmp_path / "train")
    (root / "bird").mkdir()
    (root / "fish").mkdir()
    (root / "fish" / "README.txt").write_text("a file that is not an image does not make a class")
    with pytest.raises(ValueError) as empty:
        ImageFolderDataModule(str(root))
    message = str(empty.value)
    assert str(root / "bird") in message and str(root / "fish") in message
    assert "Add images or remove the folder" in message
    with pytest.raises(ValueError, match=r"has no class sub-folders; expected .*<class name>"):
        ImageFolderDataModule(str((tmp_path / "flat").mkdir() or tmp_path / "flat"))


def test_unsafe_class_names_never_become_paths(synthetic_run, tmp_path):
    _, records = read_manifest(synthetic_run)
    assert [r["class_name"] for r in records] == UNSAFE_NAMES
    # inside the dataset: ids and shard names only
    assert all(re.fullmatch(r"c\d{4}-i\d{6}", r["id"]) for r in records)
    inside = [p.relative_to(synthetic_run).as_posix() for p in synthetic_run.rglob("*")]
    assert not any(name in path for name in ("escape", "hidden", "Caf", "top") for path in inside)

    out = tmp_path / "export" / "plain"
    export_image_folder(synthetic_run, out)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["0000_T-shirt_top", "0001_class", "0002_hidden", "0003_Caf", "0004_escape"]
    assert all(re.fullmatch(r"\d{4}_[A-Za-z0-9_-]+", f) for f in folders)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["plain"]  # nothing written beside it
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["class_name"] for r in lines) == sorted(UNSAFE_NAMES)  # the real names stay as data
    for line in lines:
        assert (out / line["file_name"]).resolve().is_relative_to(out.resolve())

    # a manifest edited so that an id would climb out of the export folder is refused before anything is written
    tampered = tmp_path / "tampered"
    shutil.copytree(synthetic_run, tampered)
    text = (tampered / MANIFEST_FILE).read_text()
    (tampered / MANIFEST_FILE).write_text(text.replace('"id": "c0004-i000000"', '"id": "../../../pwned"'))
    with pytest.raises(ValueError, match=r"id '\.\./\.\./\.\./pwned' is not a plain file name.*regenerate"):
        export_image_folder(tampered, tmp_path / "export2")
    assert not (tmp_path / "export2").exists() and not list(tmp_path.rglob("pwned*"))


def test_duplicate_class_names_are_refused(synthetic_run, tmp_path):
    with pytest.raises(ValueError) as duplicate:
        GenerationRequestsDataModule(class_names=["cat", "dog", "cat"])
    assert "Duplicate class names ['cat']" in str(duplicate.value) and "rename them" in str(duplicate.value)
    # a dataset whose run.json names a class twice is refused when it is read
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_run, copy)
    run = json.loads((copy / RUN_FILE).read_text())
    run["requests"]["class_names"] = ["a", "b", "a", "c", "d"]
    (copy / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"names classes \['a'\] more than once.*distinct class_names"):
        SyntheticDataModule(str(copy))


# --- the command line -------------------------------------------------------------------------------------------
def _cli_error(capsys, *args: str) -> str:
    """Run ``lbgen`` with ``args``; it must exit non-zero; return what it printed to stderr."""
    with pytest.raises(SystemExit) as done:
        cli_main(list(args))
    assert done.value.code not in (0, None)
    return capsys.readouterr().err


def _recipe(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load((REPO / "configs/classifier/fashion_5shot.yaml").read_text())
    edit(config)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def previous_run(tmp_path) -> Path:
    root = tmp_path / "runs"
    (root / "version_0").mkdir(parents=True)
    (root / "version_0" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    return root


def test_unknown_or_misspelled_config_keys_are_named(tmp_path, capsys, previous_run):
    before = snapshot(previous_run)
    recipe = str(REPO / "configs/classifier/fashion_5shot.yaml")
    root = f"--trainer.default_root_dir={previous_run}"
    err = _cli_error(capsys, "fit", "-c", recipe, root, "--data.init_args.shotz=5")
    assert "Option 'shotz' is not accepted" in err and "--help" in err
    err = _cli_error(capsys, "fit", "-c", recipe, root, "--model.init_args.backbone.init_args.model_nam=resnet18")
    assert "Option 'model_nam' is not accepted" in err
    typo = _recipe(tmp_path, lambda c: c["trainer"].update(max_stepz=3))
    err = _cli_error(capsys, "fit", "-c", str(typo), root)
    assert "does not accept option 'trainer.max_stepz'" in err and "fit --help" in err
    typo = _recipe(tmp_path, lambda c: c["data"]["init_args"].update(val_per_clas=3))
    assert "Option 'val_per_clas' is not accepted" in _cli_error(capsys, "fit", "-c", str(typo), root)
    # argparse's abbreviations would read a truncated key as the full one, silently
    assert "unrecognized arguments: --trainer.max_step=3" in _cli_error(capsys, "fit", "-c", recipe, root,
                                                                        "--trainer.max_step=3")
    assert snapshot(previous_run) == before  # nothing written, nothing replaced


def test_wrong_types_are_named(tmp_path, capsys, previous_run):
    before = snapshot(previous_run)
    recipe = str(REPO / "configs/classifier/fashion_5shot.yaml")
    root = f"--trainer.default_root_dir={previous_run}"
    err = _cli_error(capsys, "fit", "-c", recipe, root, "--data.init_args.shots=five")
    assert 'Parser key "shots"' in err and "Expected a <class 'int'>" in err and "five" in err
    wrong = _recipe(tmp_path, lambda c: c["data"]["init_args"].update(image_size="big"))
    err = _cli_error(capsys, "fit", "-c", str(wrong), root)
    assert 'Parser key "image_size"' in err and "Expected a <class 'int'>. Got value: big" in err
    wrong = _recipe(tmp_path, lambda c: c["model"]["init_args"].update(finetune="partial"))
    err = _cli_error(capsys, "fit", "-c", str(wrong), root)
    assert 'Parser key "finetune"' in err and "partial" in err and "full" in err and "linear" in err
    assert snapshot(previous_run) == before


# --- generator, LoRA, confusion matrix ----------------------------------------------------------------------------
def test_model_path_that_does_not_exist_or_is_not_a_diffusers_folder(tiny_generator, tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        load_generator("runs/embedded/no_such_generator")
    assert "runs/embedded/no_such_generator does not exist" in str(missing.value)
    assert "fashion_generator.yaml" in str(missing.value) and "'namespace/name'" in str(missing.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PretrainedGenerator(str(tmp_path / "nowhere"))()
    for not_a_pipeline in (tiny_generator / "vae", tiny_generator / "model_index.json"):  # a component, a file
        with pytest.raises(FileNotFoundError) as wrong:
            load_generator(str(not_a_pipeline))
        assert f"{not_a_pipeline} is not a diffusers pipeline folder (no model_index.json)" in str(wrong.value)
        assert "save_pretrained" in str(wrong.value)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_generator, damaged)
    (damaged / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON.*copy it again"):
        load_generator(str(damaged))


@pytest.fixture(scope="module")
def loras(tiny_generator, tmp_path_factory) -> dict[str, Path]:
    """LoRAs saved for the tiny generator's UNet, a wider UNet and a deeper one (real peft + diffusers files)."""
    root = tmp_path_factory.mktemp("loras")
    fits = load_generator(str(tiny_generator)).unet
    add_lora(fits, 4, None, ["to_q", "to_v"], init=False)  # another rank than any default: ranks do fit
    wide = build_generator(**{**TINY, "unet_channels": (32, 64), "vae_channels": (32, 64),
                              "cross_attention_dim": 32}).unet
    add_lora(wide, 2, None, ["to_q", "to_k", "to_v"], init=False)
    deep = build_generator(**{**TINY, "unet_channels": (16, 32, 32), "image_size": 32}).unet
    add_lora(deep, 2, None, ["to_q", "to_k"], init=False)
    return {name: save_lora(root / name, unet).parent for name, unet in
            (("fits", fits), ("wide", wide), ("deep", deep))}


def test_lora_that_does_not_fit_the_unet_is_refused(tiny_generator, loras, tmp_path):
    pipe = load_generator(str(tiny_generator), lora=str(loras["fits"]))
    assert any("lora_" in name for name, _ in pipe.unet.named_parameters())
    with pytest.raises(ValueError) as wide:  # same modules, other widths: shapes differ
        load_generator(str(tiny_generator), lora=str(loras["wide"]))
    assert f"LoRA {loras['wide']} does not fit" in str(wide.value) and "size mismatch" in str(wide.value)
    assert "use it with the generator it was trained on" in str(wide.value)
    with pytest.raises(ValueError) as deep:  # modules this UNet does not have: diffusers alone would load part of it
        load_generator(str(tiny_generator), lora=str(loras["deep"]))
    assert re.search(rf"LoRA {re.escape(str(loras['deep']))} does not fit this generator: only 32 of its 56 weights",
                     str(deep.value))
    with pytest.raises(FileNotFoundError, match=r"LoRA .*no_lora does not exist: point `lora` at the folder"):
        load_generator(str(tiny_generator), lora=str(tmp_path / "no_lora"))


def _confusion_file(path: Path, class_names: list[str]) -> Path:
    """A ``confusion_matrix.json`` as ``ClassifierSystem.test`` writes it."""
    matrix = (np.eye(len(class_names), dtype=int) * 5 + 1).tolist()
    path.write_text(json.dumps({"class_names": class_names, "rows": "true class", "columns": "predicted class",
                                "matrix": matrix}, indent=1))
    return path


def test_confusion_matrix_for_other_classes_is_refused(fmnist_fixture, tiny_generator, synthetic_run, tmp_path):
    source = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=16)
    names = source.class_names
    wrong = _confusion_file(tmp_path / "confusion_matrix.json", names[::-1])
    data = GenerationRequestsDataModule(source_data=source, method="genie", images_per_class=1, batch_size=8,
                                        genie_sources="confusion", confusion_file=str(wrong))
    output = tmp_path / "existing_run"
    shutil.copytree(synthetic_run, output)  # a finished run in the output folder must survive the failure
    before = snapshot(output)
    with pytest.raises(ValueError) as mismatch:
        generate(tiny_generator, output, data)
    message = str(mismatch.value)
    assert str(wrong) in message and f"is for classes {names[::-1]}" in message
    assert "tested on these classes" in message and "genie_sources='random'" in message
    assert snapshot(output) == before

    small = _confusion_file(tmp_path / "small.json", names)
    record = json.loads(small.read_text())
    record["matrix"] = record["matrix"][:3]
    small.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"the matrix has shape \(3, 10\), expected \(10, 10\)"):
        GenerationRequestsDataModule(source_data=source, method="genie", genie_sources="confusion",
                                     confusion_file=str(small)).requests()
    with pytest.raises(FileNotFoundError, match=r"missing.json does not exist: run `lbgen test`"):
        GenerationRequestsDataModule(source_data=source, method="genie", genie_sources="confusion",
                                     confusion_file=str(tmp_path / "missing.json")).requests()


@pytest.mark.parametrize("images_per_class", [0, -3])
def test_images_per_class_must_be_positive(images_per_class):
    with pytest.raises(ValueError) as bad:
        GenerationRequestsDataModule(class_names=["cat", "dog"], images_per_class=images_per_class)
    assert f"images_per_class must be positive, got {images_per_class}" in str(bad.value)
    assert "1 or more" in str(bad.value)


@pytest.mark.parametrize(("method", "strength"), [("img2img", 0.0), ("img2img", -0.1), ("genie", 1.5)])
def test_noise_ratio_outside_zero_one(fmnist_fixture, method, strength):
    source = FashionMNISTDataModule(root=str(fmnist_fixture), shots=2, image_size=16)
    with pytest.raises(ValueError) as bad:
        GenerationRequestsDataModule(source_data=source, method=method, strength=strength)
    assert f"must be in (0, 1], got {strength}" in str(bad.value)
    assert "leave it unset" in str(bad.value) and "0.8" in str(bad.value)
    GenerationRequestsDataModule(source_data=source, method=method, strength=1.0)  # r = 1 is allowed


# --- the classifier's input size ----------------------------------------------------------------------------------
def _vit(img_size: int) -> TimmBackbone:
    """A one-block ViT with a fixed input size, as ``model_kwargs: {img_size: ...}`` builds it."""
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs={"img_size": img_size, "depth": 1, "embed_dim": 32,
                                                              "num_heads": 2})


def test_generator_image_size_the_classifier_cannot_take(synthetic_run):
    # the generated images are 16 px; the DataModule delivers image_size, the ViT takes only 32
    classifier = ClassifierSystem(_vit(32), num_classes=len(UNSAFE_NAMES))
    data = SyntheticDataModule(str(synthetic_run), image_size=16, batch_size=4)
    with pytest.raises(ValueError) as bad:
        _trainer(fast_dev_run=True).fit(classifier, data)
    message = str(bad.value)
    assert "'vit_tiny_patch16_224' cannot take 16x16 images, the data's image_size (it expects (32, 32))" in message
    assert "Set the DataModule's image_size" in message and "{img_size: 16}" in message
    assert classifier.global_step == 0  # failed before any step
    # asking the DataModule for the classifier's size works: the 16 px images are resized to 32
    data = SyntheticDataModule(str(synthetic_run), image_size=32, batch_size=4)
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(ClassifierSystem(_vit(32), num_classes=len(UNSAFE_NAMES)), data)
    assert trainer.state.finished and data.train_dataset[0]["image"].shape == (3, 32, 32)


# --- generated datasets -----------------------------------------------------------------------------------------
def test_manifest_from_another_run_is_refused(synthetic_run, other_run, tiny_generator, tmp_path):
    # another run's manifest alone: its shards are not here
    mixed = tmp_path / "mixed"
    shutil.copytree(synthetic_run, mixed)
    shutil.copy(other_run / MANIFEST_FILE, mixed / MANIFEST_FILE)
    with pytest.raises(ValueError, match=r"line 1: its shard .* is missing: the manifest is from another run.*"
                                         r"Keep the whole dataset folder"):
        SyntheticDataModule(str(mixed))
    # another run's manifest and shards, beside this run's run.json: the seeds give it away
    for shard in (other_run / SHARD_DIR).iterdir():
        shutil.copy(shard, mixed / SHARD_DIR / shard.name)
    with pytest.raises(ValueError) as other:
        read_manifest(mixed)
    assert "(id 'c0000-i000000') does not belong to the run described in" in str(other.value)
    assert "seed (not derived from run.json's base_seed)" in str(other.value)
    assert "keep each dataset folder's run.json, manifest.jsonl and shards/ together" in str(other.value)
    # generating into a finished run's folder with other settings is refused, and the run is left as it was
    before = snapshot(synthetic_run)
    data = GenerationRequestsDataModule(class_names=UNSAFE_NAMES, images_per_class=1, batch_size=8, base_seed=7)
    with pytest.raises(ValueError, match=r"holds a generation run with other settings \(differs in \['requests'\]\)"):
        generate(tiny_generator, synthetic_run, data)
    assert snapshot(synthetic_run) == before


def test_manifest_is_validated_when_read(synthetic_run, tmp_path):
    def damaged(edit) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(synthetic_run, copy)
        lines = (copy / MANIFEST_FILE).read_text().splitlines()
        (copy / MANIFEST_FILE).write_text("\n".join(edit(lines)) + "\n")
        return copy

    cut = damaged(lambda lines: [*lines[:2], lines[2][:40]])
    with pytest.raises(ValueError, match=rf"{MANIFEST_FILE}, line 3 is not valid JSON.*rerun the same `lbgen predict`"):
        read_manifest(cut)
    lacking = damaged(lambda lines: [json.dumps({k: v for k, v in json.loads(lines[0]).items() if k != "seed"})])
    with pytest.raises(ValueError, match=r"line 1 \(id 'c0000-i000000'\) lacks \['seed'\].*regenerate"):
        read_manifest(lacking)
    twice = damaged(lambda lines: [lines[0], lines[0]])
    with pytest.raises(ValueError, match=r"line 2: image 'c0000-i000000' appears twice"):
        read_manifest(twice)
    negative = damaged(lambda lines: [lines[0].replace('"class_index": 0', '"class_index": -1')])
    with pytest.raises(ValueError, match=r"class_index -1 is not a non-negative integer"):
        read_manifest(negative)


# --- safe loading -----------------------------------------------------------------------------------------------
class _CreatesAFile:
    """Unpickling this object calls ``open(path, "w")``: the file appears only if the pickle's code runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_checkpoints_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    for name, payload in (("evil.ckpt", {"state_dict": {"w": torch.zeros(1)}, "hook": _CreatesAFile(marker)}),
                          ("module.pt", torch.nn.Linear(2, 2))):  # a whole pickled module, not its state dict
        path = tmp_path / name
        torch.save(payload, path)
        with pytest.raises(ValueError) as refused:
            TimmBackbone("test_resnet", checkpoint_path=str(path))
        message = str(refused.value)
        assert str(path) in message and "could run arbitrary code, so it is refused" in message
        assert "safetensors.torch.save_file" in message
    assert "(Unsupported global: GLOBAL torch.nn.modules.linear.Linear)" in message  # what the file holds
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": _CreatesAFile(marker)}))
    with pytest.raises(ValueError, match="not a plain weights file that can be loaded safely"):
        load_state_dict(path)
    assert not marker.exists()

    from safetensors.torch import save_file

    good = tmp_path / "backbone.safetensors"
    save_file(TimmBackbone("test_resnet").state_dict(), good)
    TimmBackbone("test_resnet", checkpoint_path=str(good))  # the safe formats load
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"backbone.safetensors is not a readable safetensors file.*truncated"):
        TimmBackbone("test_resnet", checkpoint_path=str(good))
    with pytest.raises(FileNotFoundError, match="no_such.safetensors does not exist"):
        load_state_dict(tmp_path / "no_such.safetensors")


def test_model_code_runs_only_with_trust_remote_code(tiny_generator, tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "generator_with_code"
    shutil.copytree(tiny_generator, folder)
    (folder / "unet" / "custom_unet.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from diffusers import UNet2DConditionModel\n\n\nclass CustomUNet(UNet2DConditionModel):\n    pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["custom_unet", "CustomUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as refused:
        PretrainedGenerator(str(folder))()
    assert "ships its own code (unet/custom_unet.py)" in str(refused.value)
    assert "set `trust_remote_code: true` on PretrainedGenerator only if you trust it" in str(refused.value)
    assert not marker.exists()
    pipe = PretrainedGenerator(str(folder), trust_remote_code=True)()  # the user's explicit choice
    assert type(pipe.unet).__name__ == "CustomUNet" and marker.exists()


def test_captioner_model_code_is_not_run_by_default(tmp_path):
    from lbgen.attributes.captioner import CaptionerAttributeExtractor

    marker = tmp_path / "code_ran"
    folder = tmp_path / "captioner"
    folder.mkdir()
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lbgen_custom", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}}))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        CaptionerAttributeExtractor(str(folder), task="image-text-to-text")._pipeline(torch.device("cpu"))
    assert not marker.exists()


def test_attribute_bank_is_validated_when_read(tmp_path):
    names = ["T-shirt/top", "Trouser"]
    records = [{"id": f"train:{i}", "class_index": i % 2, "class_name": names[i % 2], "background": "white wall",
                "pose": "front view"} for i in range(4)]
    path = AttributeBank(records=records, class_names=names, descriptor="garment", extractor="test").save(
        tmp_path / "attributes.json")
    assert len(AttributeBank.load(path, names)) == 4

    def edited(edit) -> Path:
        data = json.loads(path.read_text())
        edit(data)
        out = tmp_path / f"edited{len(list(tmp_path.iterdir()))}.json"
        out.write_text(json.dumps(data))
        return out

    with pytest.raises(ValueError, match=r"attributes.json was made for classes .*'T-shirt/top'.*not \['a', 'b'\]"):
        AttributeBank.load(path, ["a", "b"])
    with pytest.raises(ValueError, match="is not an lbgen attribute bank"):
        AttributeBank.load(edited(lambda d: d.update(format="other")))
    leak = edited(lambda d: d["records"][1].update(background="a pile of trousers"))
    with pytest.raises(ValueError, match=r"record 1: background 'a pile of trousers' names class.*class-agnostic"):
        AttributeBank.load(leak)
    out_of_range = edited(lambda d: d["records"][0].update(class_index=7))
    with pytest.raises(ValueError, match=r"record 0: class_index 7 is not in 0..1"):
        AttributeBank.load(out_of_range)
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="is not valid JSON"):
        AttributeBank.load(tmp_path / "cut.json")
    with pytest.raises(FileNotFoundError, match="configs/bob/attributes.yaml"):
        GenerationRequestsDataModule(class_names=names, attribute_mode="bob", attribute_bank=str(tmp_path / "no"),
                                     prompt_template="a {class} in front of a {background}, {pose}")
