"""lbGen on the embedded world: the loss ablations and backbone pre-training on the generated dataset.

    .venv/bin/python benchmarks/lbgen_embedded.py --run-dir ~/lbgen-runs/quickstart [--seeds 0 1 2]
        [--ablations full en_only in_only en_in] [--oracle ORACLE.ckpt] [--skip-transfer]

--run-dir is a quickstart folder (the embedded generator, CLIP and quality model under runs/embedded/ are reused;
missing ones are trained). For each ablation: fine-tune the LoRA (configs/lbgen/fashion.yaml + the ablation
overlay), generate 100 images per class, report the LoRA's training time, the embedded CLIP's agreement with the
prompted class, the label consistency judged by --oracle (a classifier trained on real data, e.g. a
fashion_full.yaml checkpoint), and 5-shot accuracy (real + generated) over --seeds. "none" is the embedded
generator without LoRA (plain txt2img). Transfer: pre-train resnet10t on a lbGen dataset only (no real training
image) and on the same number of steps of the real pool, then linear-probe and fine-tune on 5-shot labels, against
the same backbone from scratch. Every stage is an `lbgen` command, as a user runs it. Not a test: it takes about
an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LBGEN = str(Path(sys.executable).with_name("lbgen"))


def lbgen(run_dir: Path, *args: str, marker: Path | None = None) -> float:
    """One lbgen stage run in ``run_dir`` (skipped if ``marker`` exists); returns wall seconds."""
    if marker is not None and (run_dir / marker).exists():
        return float("nan")
    start = time.perf_counter()
    subprocess.run([LBGEN, *args, "--trainer.enable_progress_bar=false"], cwd=run_dir, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def accuracy(run_dir: Path, root: str) -> list[float]:
    """Top-1 % of every tested run under ``root`` (one folder per seed)."""
    return [100 * json.loads(p.read_text())["acc"] for p in sorted((run_dir / root).rglob("test_metrics.json"))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} ({len(values)})"


def clip_agreement(run_dir: Path, folder: str) -> float:
    """Share of generated images the embedded CLIP assigns (zero-shot) to the prompted class."""
    import torch

    from lbgen.components.clip import ClipScorer
    from lbgen.storage.dataset_format import load_images, read_manifest

    _, records = read_manifest(run_dir / folder)
    clip = ClipScorer(model_name=f"local-dir:{run_dir / 'runs/embedded/clip'}", pretrained=None)
    config = json.loads((run_dir / "runs/embedded/clip/open_clip_config.json").read_text())["lbgen"]
    with torch.no_grad():
        text = torch.stack([clip.encode_texts([t.format(name) for t in config["templates"]]).mean(0)
                            for name in config["class_names"]])
        text = torch.nn.functional.normalize(text, dim=-1)
        images = load_images(run_dir / folder, records, 32).float() / 255
        predicted = torch.cat([(clip.encode_images(chunk) @ text.T).argmax(-1) for chunk in images.split(500)])
    labels = torch.tensor([r["class_index"] for r in records])
    return float((predicted == labels).float().mean())


def oracle_consistency(oracle: Path, run_dir: Path, folder: str) -> float:
    from lbgen.evaluation.label_consistency import label_consistency
    from lbgen.models import ClassifierSystem

    model = ClassifierSystem.load_from_checkpoint(oracle, map_location="cpu", weights_only=True)
    return label_consistency(model, run_dir / folder, image_size=32)["overall"]


def oracle_metrics(checkpoint: Path) -> dict:
    metrics = checkpoint.parent.parent / "test_metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def classifiers(run_dir: Path, name: str, folder: str, seeds: list[int]) -> None:
    for seed in seeds:
        lbgen(run_dir, "fit", "-c", str(CONFIGS / "classifier/fashion_5shot.yaml"),
              "-c", str(CONFIGS / "classifier/fashion_5shot_plus_synthetic.yaml"),
              f"--data.init_args.synthetic.init_args.folder={folder}", f"--seed_everything={seed}",
              f"--data.init_args.real.init_args.split_seed={seed}",
              f"--trainer.default_root_dir=runs/bench/classifier/{name}/seed{seed}",
              marker=Path(f"runs/bench/classifier/{name}/seed{seed}/version_0/test_metrics.json"))


REAL_BACKBONE = "runs/bench/backbones/real.safetensors"


def real_pool_classifier(run: Path, steps: int) -> Path:
    """resnet10t trained on the real pool (fashion_full.yaml, ``steps`` steps): the oracle of label consistency and
    the "pre-trained on real data" backbone of the transfer table. Returns its checkpoint."""
    lbgen(run, "fit", "-c", str(CONFIGS / "classifier/fashion_5shot.yaml"), "-c",
          str(CONFIGS / "classifier/fashion_full.yaml"), f"--trainer.max_steps={steps}",
          f"--model.init_args.backbone_output={REAL_BACKBONE}", "--trainer.default_root_dir=runs/bench/pretrain/real",
          marker=Path(REAL_BACKBONE))
    return sorted((run / "runs/bench/pretrain/real").glob("version_*/checkpoints/*.ckpt"))[-1]


def ablations(args: argparse.Namespace) -> list[dict]:
    run, rows = args.run_dir, []
    for name in args.ablations:
        overlay = [] if name in ("full", "none") else ["-c", str(CONFIGS / f"lbgen/ablations/{name}.yaml")]
        lora = f"runs/bench/lbgen/{name}/lora"
        fit_s = float("nan")
        if name != "none":
            fit_s = lbgen(run, "fit", "-c", str(CONFIGS / "lbgen/fashion.yaml"), *overlay,
                          f"--model.init_args.output_dir={lora}", f"--trainer.default_root_dir=runs/bench/logs/{name}",
                          marker=Path(lora) / "pytorch_lora_weights.safetensors")
        folder = f"runs/bench/synthetic/{name}"
        generate = ["-c", str(CONFIGS / "generate/fashion_txt2img.yaml")]
        if name != "none":
            generate += ["-c", str(CONFIGS / "generate/fashion_lbgen.yaml"),
                         f"--model.init_args.generator.init_args.lora={lora}"]
        lbgen(run, "predict", *generate, f"--model.init_args.output_dir={folder}",
              marker=Path(folder) / "manifest.jsonl")
        classifiers(run, name, folder, args.seeds)
        rows.append({"ablation": name, "lora_fit_s": fit_s, "clip_agreement": clip_agreement(run, folder),
                     "oracle_consistency": oracle_consistency(args.oracle, run, folder),
                     "acc": accuracy(run, f"runs/bench/classifier/{name}")})
    return rows


def transfer(args: argparse.Namespace) -> list[dict]:
    run = args.run_dir
    # a bigger lbGen dataset for pre-training (class names only), from the "full" ablation's LoRA
    lora, folder = "runs/bench/lbgen/full/lora", "runs/bench/synthetic/pretrain"
    lbgen(run, "predict", "-c", str(CONFIGS / "generate/fashion_txt2img.yaml"), "-c",
          str(CONFIGS / "generate/fashion_lbgen.yaml"), f"--model.init_args.generator.init_args.lora={lora}",
          f"--model.init_args.output_dir={folder}", f"--data.init_args.images_per_class={args.pretrain_per_class}",
          marker=Path(folder) / "manifest.jsonl")
    lbgen_backbone, real_backbone = "runs/bench/backbones/lbgen.safetensors", REAL_BACKBONE
    lbgen(run, "fit", "-c", str(CONFIGS / "classifier/fashion_5shot.yaml"), "-c",
          str(CONFIGS / "classifier/fashion_5shot_plus_synthetic.yaml"), "-c",
          str(CONFIGS / "classifier/lbgen_pretrain.yaml"), f"--data.init_args.synthetic.init_args.folder={folder}",
          f"--model.init_args.backbone_output={lbgen_backbone}", "--trainer.default_root_dir=runs/bench/pretrain/lbgen",
          marker=Path(lbgen_backbone))
    settings = {"scratch": [], "lbgen_linear": ["-c", str(CONFIGS / "classifier/fashion_transfer_5shot.yaml"),
                                                f"--model.init_args.backbone.init_args.checkpoint_path={lbgen_backbone}"],
                "real_linear": ["-c", str(CONFIGS / "classifier/fashion_transfer_5shot.yaml"),
                                f"--model.init_args.backbone.init_args.checkpoint_path={real_backbone}"]}
    settings["lbgen_full"] = [*settings["lbgen_linear"], "--model.init_args.finetune=full",
                              "--model.init_args.optimizer.init_args.lr=0.002",
                              "--model.init_args.scheduler.init_args.max_lr=0.002"]
    rows = []
    for name, extra in settings.items():
        for seed in args.seeds:
            root = f"runs/bench/transfer/{name}/seed{seed}"
            lbgen(run, "fit", "-c", str(CONFIGS / "classifier/fashion_5shot.yaml"), *extra,
                  f"--seed_everything={seed}", f"--data.init_args.split_seed={seed}",
                  f"--trainer.default_root_dir={root}", marker=Path(root) / "version_0/test_metrics.json")
        rows.append({"setting": name, "acc": accuracy(run, f"runs/bench/transfer/{name}")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablations", nargs="+", default=["none", "full", "en_only", "in_only", "en_in"])
    parser.add_argument("--oracle", type=Path)
    parser.add_argument("--pretrain-per-class", type=int, default=300)
    parser.add_argument("--real-steps", type=int, default=600, help="steps of the real-pool classifier")
    parser.add_argument("--skip-transfer", action="store_true")
    args = parser.parse_args()
    args.run_dir = args.run_dir.expanduser().resolve()
    for marker, config in (("runs/embedded/vae/config.json", "foundation/fashion_vae.yaml"),
                           ("runs/embedded/generator/model_index.json", "foundation/fashion_generator.yaml"),
                           ("runs/embedded/clip/open_clip_config.json", "foundation/fashion_clip.yaml"),
                           ("runs/embedded/quality/quality_config.json", "foundation/fashion_quality.yaml")):
        lbgen(args.run_dir, "fit", "-c", str(CONFIGS / config), "--test_after_fit=no", marker=Path(marker))
    oracle = real_pool_classifier(args.run_dir, args.real_steps)
    if args.oracle is None:
        args.oracle = oracle
    print(f"oracle: {args.oracle} (test top-1 {oracle_metrics(args.oracle).get('acc')})")
    rows = ablations(args)
    print("\n| lbGen loss terms | LoRA fit s | CLIP agreement % | oracle label consistency % | 5-shot + 100/class "
          "top-1 % (mean ± std (runs)) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ablation']} | {r['lora_fit_s']:.0f} | {100 * r['clip_agreement']:.1f} | "
              f"{100 * r['oracle_consistency']:.1f} | "
              f"{mean_std(r['acc'])} |")
    result = {"ablations": rows}
    if not args.skip_transfer:
        result["transfer"] = transfer(args)
        print("\n| 5-shot transfer (resnet10t) | top-1 % (mean ± std (runs)) |\n|---|---:|")
        for r in result["transfer"]:
            print(f"| {r['setting']} | {mean_std(r['acc'])} |")
    (args.run_dir / "lbgen_benchmark.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
