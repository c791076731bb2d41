"""Classifier input pipeline: a synthetic dataset read from its shards (lbgen) vs the same images as PNG files
(torchvision ``ImageFolder``), same transforms, same batch size and workers.

    .venv/bin/python benchmarks/data_pipeline.py --out /tmp/lbgen-databench --dataset runs/synthetic/txt2img \\
        [--epochs 3] [--num-workers 0,2] [--batch-size 64] [--image-size 32] [--augmentation weak]
    .venv/bin/python benchmarks/data_pipeline.py --out /tmp/lbgen-databench [--generator DIR] \\
        [--images-per-class 100] [--steps 4]      # makes the dataset first with `lbgen predict`
    .venv/bin/python benchmarks/data_pipeline.py --out /tmp/lbgen-databench --native-size 256 --image-size 224
        # a dataset of 256 px PNGs from a random generator, read at 224 px (the ImageNet-scale case)

- lbgen: ``SyntheticDataModule`` (decodes every PNG once at set-up into one uint8 tensor; each epoch only
  augments), its own ``train_dataloader`` (seeded sampler, per-sample seeded augmentation);
- ImageFolder: ``lbgen export`` of the same dataset, ``torchvision.datasets.ImageFolder`` + ``DataLoader``
  (shuffle), PIL -> uint8 tensor, then the same ``augmentation_preset``; it decodes every PNG in every epoch.
Reported per loader: set-up seconds, images/s of each epoch, and the ratios lbgen / ImageFolder for the first epoch
(lbgen's set-up counted in) and for the later epochs (the steady state of a classifier run of many epochs).
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LARGE_IMAGE_GENERATOR, REPO, ensure_generator, ratio  # noqa: E402

from lbgen.datamodules.synthetic import SyntheticDataModule  # noqa: E402
from lbgen.datamodules.transforms import augmentation_preset  # noqa: E402
from lbgen.storage.dataset_format import export_image_folder, read_manifest  # noqa: E402


def make_dataset(generator: str, out: Path, images_per_class: int, steps: int, batch: int) -> Path:
    """A finished generation run (txt2img, the Fashion-MNIST classes) written by `lbgen predict`."""
    from lbgen.cli import cli_main

    cli_main(["predict", "-c", str(REPO / "configs/generate/fashion_txt2img.yaml"),
              f"--model.init_args.generator.init_args.model={generator}", f"--model.init_args.output_dir={out}",
              f"--model.init_args.num_inference_steps={steps}", f"--data.init_args.images_per_class={images_per_class}",
              f"--data.init_args.batch_size={batch}", "--trainer.enable_progress_bar=false",
              "--trainer.accelerator=cpu", "--trainer.logger=false",
              f"--trainer.default_root_dir={out.parent / ('logs-' + out.name)}"])
    return out


def time_epochs(loader: DataLoader, epochs: int) -> tuple[list[float], int]:
    """Seconds per epoch of iterating ``loader`` (touching every batch's images), and the images per epoch."""
    seconds, count = [], 0
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        count, checksum = 0, 0.0
        start = time.perf_counter()
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            count += images.shape[0]
            checksum += float(images[:, :, 0, 0].sum())  # the batch is really materialised
        seconds.append(time.perf_counter() - start)
    return seconds, count


def lbgen_loader(dataset: Path, image_size: int, batch: int, workers: int,
                 augmentation: str) -> tuple[float, DataLoader]:
    start = time.perf_counter()
    data = SyntheticDataModule(str(dataset), image_size=image_size, batch_size=batch, num_workers=workers,
                               augmentation=augmentation)
    data.setup("fit")
    loader = data.train_dataloader()
    return time.perf_counter() - start, loader


def image_folder_loader(folder: Path, image_size: int, batch: int, workers: int, augmentation: str,
                        native_size: int) -> tuple[float, DataLoader]:
    start = time.perf_counter()
    ops: list = [v2.PILToTensor()]
    if native_size != image_size:  # lbgen resizes once at decode; a folder pipeline resizes every time
        ops.insert(0, v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC))
    dataset = ImageFolder(str(folder), transform=v2.Compose([*ops, augmentation_preset(augmentation, image_size)]))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    return time.perf_counter() - start, loader


def summarize(lbgen: dict, folder: dict) -> dict:
    """Throughputs and the lbgen / ImageFolder ratios from two ``{"setup_s", "epoch_s", "images"}`` records."""
    n = lbgen["images"]
    first = (lbgen["setup_s"] + lbgen["epoch_s"][0], folder["setup_s"] + folder["epoch_s"][0])
    later = [sum(r["epoch_s"][1:]) / max(len(r["epoch_s"]) - 1, 1) if len(r["epoch_s"]) > 1 else float("nan")
             for r in (lbgen, folder)]
    return {"first_epoch_img_s": {"lbgen": n / first[0], "image_folder": n / first[1]},
            "later_epoch_img_s": {"lbgen": ratio(n, later[0]), "image_folder": ratio(n, later[1])},
            "ratio_first_epoch": ratio(first[1], first[0]), "ratio_later_epochs": ratio(later[1], later[0])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=None, help="a finished generation run; default: make one")
    parser.add_argument("--generator", default=None, help="for making the dataset; default: a small random one")
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4, help="sampler steps when making the dataset")
    parser.add_argument("--native-size", type=int, default=None,
                        help="make the dataset with a random generator of this output size (e.g. 256: PNGs as "
                             "large as real generated data); default: --generator's or the small random one")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", default="0", help="comma-separated, e.g. 0,2")
    parser.add_argument("--augmentation", default="weak", choices=["none", "weak", "strong"])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if dataset is None:
        dataset = args.out / f"dataset{args.native_size or ''}"
        if not (dataset / "manifest.jsonl").is_file():
            shutil.rmtree(dataset, ignore_errors=True)
            if args.native_size:
                generator = ensure_generator(None, args.out, f"random_generator{args.native_size}",
                                             image_size=args.native_size, **LARGE_IMAGE_GENERATOR)
            else:
                generator = ensure_generator(args.generator, args.out)
            make_dataset(generator, dataset, args.images_per_class, args.steps, 50 if not args.native_size else 10)
    pngs = args.out / "image_folder"
    shutil.rmtree(pngs, ignore_errors=True)
    export_image_folder(dataset, pngs)
    run, _ = read_manifest(dataset)
    native = run.get("image_size") or args.image_size
    result: dict = {"dataset": str(dataset), "image_size": args.image_size, "native_size": native,
                    "batch_size": args.batch_size, "augmentation": args.augmentation, "epochs": args.epochs,
                    "threads": torch.get_num_threads(), "workers": {}}
    for workers in (int(w) for w in args.num_workers.split(",")):
        records = {}
        for name, make in (("lbgen", lambda w=workers: lbgen_loader(dataset, args.image_size, args.batch_size, w,
                                                                     args.augmentation)),
                           ("image_folder", lambda w=workers: image_folder_loader(
                               pngs, args.image_size, args.batch_size, w, args.augmentation, native))):
            setup, loader = make()
            seconds, count = time_epochs(loader, args.epochs)
            records[name] = {"setup_s": setup, "epoch_s": seconds, "images": count}
            del loader  # ends persistent workers before the other loader is measured
        result["workers"][str(workers)] = {**records, **summarize(records["lbgen"], records["image_folder"])}
    (args.out / "data_pipeline_benchmark.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
