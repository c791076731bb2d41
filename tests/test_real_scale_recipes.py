"""The real-scale (SD 1.5 / 2.1) recipes: each fine-tune agrees with the generation recipe that uses its LoRA, and the
chain fine-tune -> generate -> classify runs at real resolution on the SD-shaped tiny generator."""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lbgen.components.prompts import fill_caption
from lbgen.datamodules.class_names import read_class_names
from lbgen.datamodules.fashion_mnist import CLASS_NAMES as FASHION_CLASS_NAMES

from .conftest import REPO, load_recipe

CONFIGS = REPO / "configs"

# The generators the recipes name, their native side and their own scheduler (what a generation recipe without
# `sampler:` runs): the hub's scheduler_config.json of each, and the embedded generator's recipe.
SD15, SD21 = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1-base"
GENERATORS = {SD15: (512, "pndm"), SD21: (512, "pndm"), "stabilityai/stable-diffusion-2-1": (768, "ddim")}

# (fine-tune recipe, generation recipe that reads its LoRA): real scale first, then the embedded world's pairs
PAIRS = [
    ("finetune/sd15_datadream.yaml", "generate/sd15_datadream.yaml"),
    ("bob/sd21_finetune.yaml", "bob/sd21_generate.yaml"),
    ("lbgen/sd15_imagenet.yaml", "generate/sd15_lbgen_imagenet.yaml"),
    ("finetune/datadream.yaml", "bob/generate_datadream.yaml"),
    ("bob/finetune.yaml", "bob/generate.yaml"),
    ("lbgen/fashion.yaml", "generate/fashion_lbgen.yaml"),
]


def arguments(node: dict) -> dict[str, Any]:
    """A ``class_path`` node's arguments: its class's defaults, overridden by the recipe's ``init_args``."""
    module, _, name = node["class_path"].rpartition(".")
    signature = inspect.signature(getattr(importlib.import_module(module), name))
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **(node.get("init_args") or {})}


def embedded_generator() -> dict[str, Any]:
    """The embedded generator's ``NewGenerator`` arguments, as its recipe builds it."""
    return arguments(load_recipe(CONFIGS / "foundation/fashion_generator.yaml")["model"]["init_args"]["generator"])


def native(model: str) -> tuple[int, str]:
    """(side in pixels, own scheduler) of a generator a recipe names."""
    if model == "runs/embedded/generator":
        built = embedded_generator()
        return built["image_size"], built["scheduler"]
    return GENERATORS[model]


def class_source(data: dict) -> Any:
    """Where a DataModule's class names come from: the names themselves where the recipe fixes them, else the
    folder (and class map) they are read from at run time."""
    name, args = data["class_path"].rsplit(".", 1)[-1], arguments(data)
    if name == "AttributeCaptionedDataModule":
        return class_source(args["data"])
    if name in ("GenerationRequestsDataModule", "ClassNamesDataModule"):
        if args.get("class_names") is None and args.get("class_names_file") is None:
            return class_source(args["source_data"])
        file = args.get("class_names_file") and str(REPO / args["class_names_file"])
        return read_class_names(args.get("class_names"), file, args.get("first_name_only", False))
    if name == "ImageFolderDataModule":
        return ("folder", args["train_dir"], args.get("class_names_file"), args.get("first_name_only"))
    if name == "FashionMNISTDataModule":
        return list(FASHION_CLASS_NAMES)
    raise AssertionError(f"no class source known for {name}")


def fill(template: str, superclass: str | None, descriptor: str | None) -> str:
    # both sides filled with the same class and attributes: equal strings = the same caption for every image
    return fill_caption(template, "CLASS", "BACKGROUND", "POSE", descriptor or "DESCRIPTOR", superclass)


def finetune_view(tree: dict) -> dict[str, Any]:
    """What a fine-tune recipe fixes that its generation must repeat."""
    model, data = arguments(tree["model"]), tree["data"]
    generator = arguments(model["generator"])
    view = {"model": generator["model"], "lora": model["output_dir"], "classes": class_source(data)}
    if tree["model"]["class_path"].endswith("LbGenSystem"):
        # lbGen samples while it trains: the generation must sample the same way, at the generator's own side
        view.update(caption=fill(model["prompt_template"], None, None), sampler=model["sampler"],
                    steps=model["num_inference_steps"], guidance=model["guidance_scale"],
                    image_size=native(generator["model"])[0])
        return view
    data_args = arguments(data)
    if data["class_path"].endswith("AttributeCaptionedDataModule"):
        caption = fill(data_args["caption_template"], data_args["superclass"], data_args["descriptor"])
        data_args = arguments(data_args["data"])
    else:
        caption = fill(model["prompt_template"], model["superclass"], None)
    view.update(caption=caption, image_size=data_args["image_size"])
    return view


def generation_view(tree: dict) -> dict[str, Any]:
    """The same quantities, as a generation recipe sets them."""
    model, data = arguments(tree["model"]), arguments(tree["data"])
    generator = arguments(model["generator"])
    side, own = native(generator["model"])
    return {"model": generator["model"], "lora": generator["lora"], "classes": class_source(tree["data"]),
            "caption": fill(data["prompt_template"], data["superclass"], data["descriptor"]),
            "sampler": model.get("sampler") or own, "steps": model["num_inference_steps"],
            "guidance": model["guidance_scale"], "image_size": model["image_size"] or side}


def short(value: Any) -> Any:
    return f"{len(value)} names: {value[:3]}..." if isinstance(value, list) and len(value) > 5 else value


@pytest.mark.parametrize(("finetune", "generate"), PAIRS, ids=[g for _, g in PAIRS])
def test_generation_recipe_repeats_its_finetune(finetune, generate):
    trained, used = finetune_view(load_recipe(CONFIGS / finetune)), generation_view(load_recipe(CONFIGS / generate))
    differ = {k: (short(v), short(used[k])) for k, v in trained.items() if v != used[k]}
    assert not differ, f"{generate} does not generate as {finetune} trained: (fine-tune, generation) = {differ}"


@pytest.mark.slow
def test_datadream_chain_at_real_resolution(recipe_paths, tmp_path):
    """Fine-tune (DataDream LoRA, 2 steps) -> generate (2 images per class, 2 steps, 256 px) -> CLIP classifier at
    224 px, on non-square photos: each stage the real-scale recipe, through the CLI, on the SD-shaped tiny generator."""
    from lbgen.components.lora import lora_hash
    from lbgen.storage.dataset_format import read_manifest

    from .conftest import PHOTO_CLASSES, SD_SIDE, run_recipe

    stages = {name: tmp_path / name for name in ("finetune", "generate", "classify")}
    for folder in stages.values():
        folder.mkdir()
    # 3 steps: the recipe's one-cycle schedule warms up over half of them, and needs more than one step to do so
    cli = run_recipe(CONFIGS / "finetune/sd15_datadream.yaml", {**recipe_paths, "out": stages["finetune"]},
                     "--trainer.max_steps=3")
    assert cli.trainer.global_step == 3 and cli.datamodule.image_size == SD_SIDE
    lora = stages["finetune"] / "TextToImageSystem"
    assert lora_hash(lora) is not None

    # generation reads the LoRA the fine-tune wrote (not the fixture's)
    run_recipe(CONFIGS / "generate/sd15_datadream.yaml", {**recipe_paths, "out": stages["generate"], "sd_lora": lora})
    synthetic = stages["generate"] / "GenerationSystem"
    run, records = read_manifest(synthetic)
    assert len(records) == 2 * len(PHOTO_CLASSES)
    assert {r["prompt"] for r in records} == {f"a photo of a {c}, a type of aircraft" for c in PHOTO_CLASSES}
    assert {r["image_size"] for r in records} == {SD_SIDE}
    assert {r["lora_hash"] for r in records} == {lora_hash(lora)}

    # the CLIP classifier of DataDream / BOB on 5 real photos + the generated images, at 224 px
    tree = {"trainer": {"max_steps": 2, "check_val_every_n_epoch": 1}, "data": {"init_args": {
        "real": {"init_args": {"train_dir": str(recipe_paths["photos"] / "train"), "class_names_file": None,
                               "test_dir": str(recipe_paths["photos"] / "test"), "image_size": 224, "shots": 5,
                               "val_per_class": 1, "batch_size": 4, "eval_batch_size": 4}},
        "synthetic": {"init_args": {"folder": str(synthetic), "image_size": 224}}}}}
    overlay = stages["classify"] / "real_resolution.yaml"
    overlay.write_text(yaml.safe_dump(tree))
    cli = run_recipe(CONFIGS / "classifier/clip_vitb16_5shot.yaml", {**recipe_paths, "out": stages["classify"]}, "-c",
                     str(overlay))
    assert cli.trainer.global_step == 2
    assert cli.datamodule.real.image_size == 224 and cli.datamodule.class_names == PHOTO_CLASSES
    (version,) = stages["classify"].glob("version_*")
    matrix = json.loads((version / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == 3 * len(PHOTO_CLASSES)  # every test photo once


SD_GENERATION = sorted([*CONFIGS.glob("generate/sd15_*.yaml"), *CONFIGS.glob("bob/sd21_generate*.yaml")])


@pytest.mark.parametrize("config_path", SD_GENERATION, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_real_scale_generation_reads_sources_at_the_generators_side(config_path):
    # a 32-px default source would be upsampled into a blob, and generation refuses a source of another side
    model, data = arguments(load_recipe(config_path)["model"]), arguments(load_recipe(config_path)["data"])
    side = model["image_size"] or native(arguments(model["generator"])["model"])[0]
    assert data["source_data"] is not None or data["method"] == "txt2img"
    if data["source_data"] is not None:
        assert arguments(data["source_data"])["image_size"] == side
    assert model["num_inference_steps"] == 50 and model["guidance_scale"] == 2.0  # the papers' (DataDream, lbGen, BOB)


def plain(value: Any) -> Any:
    """A config value as JSON reads it (diffusers keeps lists as tuples)."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("version", ["1.5", "2.1"])
def test_sd_like_generator_has_sd_architecture(version, sd_generators):
    """The SD-shaped tiny generator differs from SD (configs/scale/, SD 1.5's own config files) only in widths and
    depth; loaded from its folder it generates at 256 px."""
    from lbgen.components.diffusion import load_generator

    pipe = load_generator(str(sd_generators[version]))
    sd = {name: json.loads((CONFIGS / "scale" / f"sd15_{name}.json").read_text())
          for name in ("unet", "vae", "scheduler", "text_encoder")}
    unet, vae = pipe.unet.config, pipe.vae.config
    for key in ("down_block_types", "up_block_types", "in_channels", "out_channels", "act_fn", "flip_sin_to_cos",
                "freq_shift", "downsample_padding", "mid_block_scale_factor"):
        assert plain(unet[key]) == sd["unet"][key], key
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn" and unet.use_linear_projection == (version == "2.1")
    assert len(vae.block_out_channels) == len(sd["vae"]["block_out_channels"]) and pipe.vae_scale_factor == 8
    for key in ("down_block_types", "up_block_types", "latent_channels", "scaling_factor"):
        assert plain(vae[key]) == sd["vae"][key], key
    assert type(pipe.scheduler).__name__ == sd["scheduler"]["_class_name"]
    keys = ("beta_start", "beta_end", "beta_schedule", "steps_offset", "skip_prk_steps", "clip_sample")
    assert {k: pipe.scheduler.config.get(k) for k in keys} == {k: sd["scheduler"][k] for k in keys}
    text = pipe.text_encoder.config
    assert text.max_position_embeddings == 77 and text.vocab_size == sd["text_encoder"]["vocab_size"]
    assert text.hidden_size == unet.cross_attention_dim and unet.sample_size * 8 == 256
    image = pipe("a photo of a DC-3", num_inference_steps=1, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 256, 256, 3) and np.isfinite(image).all()


def test_sd_like_refuses_other_layouts():
    from lbgen.components.diffusion import build_sd_like

    with pytest.raises(ValueError, match="version"):
        build_sd_like("2.0")
    with pytest.raises(ValueError, match="4 UNet"):
        build_sd_like(unet_channels=(32, 64))
    with pytest.raises(ValueError, match="multiple of 64"):
        build_sd_like(image_size=200)


def real_split(data: dict) -> tuple:
    """(shots, split seed) of the real images a DataModule reads (through a caption or mixing wrapper)."""
    args = arguments(data)
    for wrapper in ("data", "real", "source_data"):
        if isinstance(args.get(wrapper), dict):
            return real_split(args[wrapper])
    return args["shots"], args["split_seed"]


def test_few_shot_recipes_see_the_classifiers_real_shots_only():
    # the generator of a k-shot method may learn from (or start from) the classifier's k real images and no other
    classifier = real_split(load_recipe(CONFIGS / "classifier/clip_vitb16_5shot.yaml")["data"])
    assert classifier == (5, 0)
    for name in ("finetune/sd15_datadream.yaml", "bob/sd21_attributes.yaml", "bob/sd21_finetune.yaml",
                 "bob/sd21_generate.yaml", "generate/sd15_genie.yaml", "generate/sd15_img2img.yaml"):
        assert real_split(load_recipe(CONFIGS / name)["data"]) == classifier, name
