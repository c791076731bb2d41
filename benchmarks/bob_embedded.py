"""BOB and DataDream on the embedded worlds: plain Fashion-MNIST and the contextual benchmark at high bias.

    .venv/bin/python benchmarks/bob_embedded.py --run-dir ~/lbgen-runs/quickstart [--seeds 0 1 2]
        [--worlds plain contextual] [--ablations]

--run-dir is a quickstart folder: the embedded generator and CLIP (plain world) and the contextual VAE and generator
(configs/foundation/contextual_*.yaml) under runs/embedded/ are reused, missing ones are trained. Per world and
split seed: extract the attribute bank of the 5-shot split (plain: embedded CLIP zero-shot; contextual: the
benchmark's exact records), fine-tune a BOB LoRA (attribute captions) and a DataDream LoRA (class captions),
generate 100 images per class from each (BOB: marginalised attributes), and train 5-shot classifiers on real only,
real + DataDream, real + BOB (seed = split seed). --ablations adds, for the first seed: BOB's LoRA with attributes
drawn from the class's own images ("conditioned") and with plain class prompts ("conditioning only"), and
DataDream's LoRA with marginalised attribute prompts ("marginalisation only"). Every stage is an `lbgen` command as
a user runs it, cached by its output. Not a test: about 10 minutes per world and seed on 2 CPU cores.
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


def c(*names: str) -> list[str]:
    return [arg for name in names for arg in ("-c", str(CONFIGS / name))]


WORLDS = {
    "plain": {"attributes": c("bob/attributes.yaml"), "finetune": c("bob/finetune.yaml"),
              "generate": c("generate/fashion_txt2img.yaml", "bob/generate.yaml"),
              "real": c("classifier/fashion_5shot.yaml"),
              "mixed": c("classifier/fashion_5shot.yaml", "classifier/fashion_5shot_plus_synthetic.yaml"),
              "foundation": [("runs/embedded/vae/config.json", "foundation/fashion_vae.yaml"),
                             ("runs/embedded/generator/model_index.json", "foundation/fashion_generator.yaml"),
                             ("runs/embedded/clip/open_clip_config.json", "foundation/fashion_clip.yaml")]},
    "contextual": {"attributes": c("bob/attributes.yaml", "bob/contextual_attributes.yaml"),
                   "finetune": c("bob/finetune.yaml", "bob/contextual_finetune.yaml"),
                   "generate": c("generate/fashion_txt2img.yaml", "bob/generate.yaml", "bob/contextual_generate.yaml"),
                   "real": [*c("classifier/fashion_5shot.yaml", "classifier/fashion_contextual_5shot.yaml"),
                            "--data.init_args.image_size=32"],
                   "mixed": c("classifier/fashion_5shot.yaml", "classifier/fashion_5shot_plus_synthetic.yaml",
                              "classifier/fashion_contextual_5shot_plus_synthetic.yaml"),
                   "foundation": [("runs/embedded/contextual/vae/config.json", "foundation/fashion_vae.yaml",
                                   "foundation/contextual_vae.yaml"),
                                  ("runs/embedded/contextual/generator/model_index.json",
                                   "foundation/fashion_generator.yaml", "foundation/contextual_generator.yaml")]},
}
TIMES: dict[str, float] = {}


def lbgen(run_dir: Path, name: str, *args: str, marker: str) -> None:
    """One lbgen stage run in ``run_dir``, skipped if ``marker`` exists; its wall time goes into TIMES."""
    if (run_dir / marker).exists():
        return
    start = time.perf_counter()
    subprocess.run([LBGEN, *args, "--trainer.enable_progress_bar=false"], cwd=run_dir, check=True,
                   stdout=subprocess.DEVNULL)
    TIMES[name] = time.perf_counter() - start
    print(f"  {name}: {TIMES[name]:.0f} s", flush=True)


def accuracy(run_dir: Path, root: str) -> float | None:
    path = run_dir / root / "version_0/test_metrics.json"
    return 100 * json.loads(path.read_text())["acc"] if path.is_file() else None


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} ({len(values)})"


def save_grid(folder: Path, per_class: int = 8) -> Path:
    """A PNG of the first ``per_class`` generated images of every class (one row per class), for a person."""
    from PIL import Image
    from torchvision.utils import make_grid

    from lbgen.storage.dataset_format import load_images, read_manifest

    _, records = read_manifest(folder)
    chosen = [r for c in sorted({r["class_index"] for r in records})
              for r in [r for r in records if r["class_index"] == c][:per_class]]
    grid = make_grid(load_images(folder, chosen, 32), nrow=per_class, padding=2)
    path = folder.with_suffix(".png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def one_seed(run: Path, world: str, seed: int, ablations: bool) -> dict[str, float | None]:
    w, base = WORLDS[world], f"runs/bench/bob/{world}/seed{seed}"
    bank, split = f"{base}/attributes.json", str(seed)
    lbgen(run, f"{world}/{seed}/attributes", "predict", *w["attributes"], f"--data.init_args.split_seed={split}",
          f"--model.init_args.output={bank}", f"--trainer.default_root_dir={base}/logs/attributes", marker=bank)
    loras = {"bob": f"{base}/bob_lora", "datadream": f"{base}/datadream_lora"}
    for method, lora in loras.items():
        extra = c("finetune/datadream.yaml") if method == "datadream" else [f"--data.init_args.attribute_bank={bank}"]
        lbgen(run, f"{world}/{seed}/finetune_{method}", "fit", *w["finetune"], *extra,
              f"--data.init_args.data.init_args.split_seed={split}", f"--model.init_args.output_dir={lora}",
              f"--trainer.default_root_dir={base}/logs/{method}", "--test_after_fit=no",
              marker=f"{lora}/pytorch_lora_weights.safetensors")
    # method -> (LoRA, generation overrides)
    plain_prompt = ["--data.init_args.attribute_mode=none", "--data.init_args.attribute_bank=null",
                    "--data.init_args.prompt_template=a photo of a {class}"]
    generations = {"bob": ("bob", [f"--data.init_args.attribute_bank={bank}"]),
                   "datadream": ("datadream", c("bob/generate_datadream.yaml"))}
    if ablations:
        generations.update({
            "bob_conditioned": ("bob", [f"--data.init_args.attribute_bank={bank}",
                                        "--data.init_args.attribute_mode=conditioned"]),
            "conditioning_only": ("bob", plain_prompt),
            "marginalisation_only": ("datadream", [f"--data.init_args.attribute_bank={bank}"])})
    acc = {}
    root = f"{base}/classifier/real_only"
    lbgen(run, f"{world}/{seed}/classifier_real", "fit", *w["real"], f"--seed_everything={seed}",
          f"--data.init_args.split_seed={split}", f"--trainer.default_root_dir={root}",
          marker=f"{root}/version_0/test_metrics.json")
    acc["real_only"] = accuracy(run, root)
    for method, (lora, overrides) in generations.items():
        folder = f"{base}/synthetic/{method}"
        lbgen(run, f"{world}/{seed}/generate_{method}", "predict", *w["generate"], *overrides,
              f"--model.init_args.generator.init_args.lora={loras[lora]}", f"--model.init_args.output_dir={folder}",
              f"--data.init_args.base_seed={seed}", f"--trainer.default_root_dir={base}/logs/generate",
              marker=f"{folder}/manifest.jsonl")
        if not (run / folder).with_suffix(".png").exists():
            save_grid(run / folder)
        root = f"{base}/classifier/{method}"
        lbgen(run, f"{world}/{seed}/classifier_{method}", "fit", *w["mixed"], f"--seed_everything={seed}",
              f"--data.init_args.real.init_args.split_seed={split}",
              f"--data.init_args.synthetic.init_args.folder={folder}", f"--trainer.default_root_dir={root}",
              marker=f"{root}/version_0/test_metrics.json")
        acc[method] = accuracy(run, root)
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--worlds", nargs="+", choices=sorted(WORLDS), default=["plain", "contextual"])
    parser.add_argument("--ablations", action="store_true")
    args = parser.parse_args()
    run = args.run_dir.expanduser().resolve()
    run.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list]] = {}
    for world in args.worlds:
        for marker, *configs in WORLDS[world]["foundation"]:  # base recipe, then its overlay (if any)
            config = configs[-1]
            lbgen(run, f"{world}/foundation/{config}", "fit", *c(*configs), "--test_after_fit=no",
                  f"--trainer.default_root_dir=runs/logs/{Path(config).stem}", marker=marker)
        for i, seed in enumerate(args.seeds):
            print(f"{world}, seed {seed}", flush=True)
            for method, value in one_seed(run, world, seed, args.ablations and i == 0).items():
                results.setdefault(world, {}).setdefault(method, []).append(value)
    out = run / "bob_benchmark.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**previous, "accuracy": {**previous.get("accuracy", {}), **results},
                               "stage_seconds": {**previous.get("stage_seconds", {}), **TIMES}}, indent=1))
    print("\n| world | method | 5-shot (+ 100/class) top-1 % (mean ± std (runs)) |\n|---|---|---:|")
    for world, methods in results.items():
        for method, values in methods.items():
            print(f"| {world} | {method} | {mean_std(values)} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
