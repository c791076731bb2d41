"""The quality / compute frontier of generation: label consistency vs UNet calls, FLOPs and wall time per image.

    .venv/bin/python benchmarks/frontier.py --out /tmp/lbgen-frontier --generator DIR --oracle CKPT \\
        [--images-per-class 100] [--samplers ...] [--steps ...] [--scales ...] [--modes ...] [--dry-run] [--quick]

For every setting (sampler x steps x guidance scale x guidance mode) the same requests (prompts and per-image
seeds: paired across settings) go through `lbgen predict` (configs/generate/fashion_txt2img.yaml, in this process)
with ``--model.init_args.sampler`` / ``num_inference_steps`` / ``guidance_scale`` / ``guidance_interval``; then the
set is scored by `lbgen predict -c configs/evaluate/score_synthetic.yaml --model.init_args.oracle_checkpoint CKPT`
(no CLIP). Per setting: label consistency with its 95% Wilson interval, the paired difference to the best setting
(same seeds, 95% t-interval of the per-image differences), UNet calls per image (a guided step counts 2), FLOPs per
image counted for the generator and for SD 1.5's architecture (``benchmarks/flops.py``), wall time per image (the
predict loop, and the whole command). Guidance modes: ``full`` (every step), ``truncated`` ([0, 0.5]: the first half,
from pure noise), ``interval`` ([0.2, 0.8]). Sampler ``pipeline`` = the generator's own scheduler.

The default grid (``default_grid``) is every sampler at 5-50 steps with full guidance at scale 4 (the recipes'),
plus dpmpp_2m / unipc / ddim at 10, 15, 20 steps x scales 2, 4 x truncated / interval guidance, dpmpp_2m / unipc
at those steps with full guidance at scale 2, and the plain loop's default (the pipeline's scheduler, 50 steps,
full guidance): 92 settings, about 3050 UNet calls per paired image, about 2.6 h of generation at 1000 images each
on one thread of this CPU (``--dry-run`` prints the grid and its estimate). The recommended setting is the cheapest
(fewest UNet calls per image) whose consistency lies inside the best setting's 95% interval (``cheapest_within_best``).
Each setting's result is kept in ``OUT/settings/NAME/result.json``: a rerun skips finished settings (the datasets
stay there too, for classifier runs on the best ones). Writes ``OUT/frontier.json``, ``OUT/frontier.md`` and
``OUT/frontier.png`` (consistency vs UNet calls per image, one line per sampler and guidance setting).
``--quick``: 2 settings x 20 images, a random generator and an oracle trained for 1 step when none is given (checks
the script, measures nothing). Without ``--oracle`` (and without ``--quick``) consistency is not measured.
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, ensure_generator, markdown_table  # noqa: E402
from flops import architecture_flops, flops_per_image, folder_configs, per_call, sd15_configs  # noqa: E402

GUIDANCE_MODES: dict[str, tuple[float, float] | None] = {"full": None, "truncated": (0.0, 0.5),
                                                         "interval": (0.2, 0.8)}
PIPELINE = "pipeline"  # the generator's own scheduler (``sampler: null``)


def line_name(sampler: str, guidance: float, mode: str) -> str:
    """A plot line: one sampler, guidance scale and mode, over steps."""
    return f"{sampler}, g {guidance:g}, {mode}"


@dataclass(frozen=True)
class Setting:
    """One point of the grid: sampler (``pipeline``: the generator's own), steps, guidance scale and mode."""

    sampler: str
    steps: int
    guidance: float
    mode: str = "full"

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {sorted(GUIDANCE_MODES)}, got {self.mode!r}.")

    @property
    def interval(self) -> tuple[float, float] | None:
        return GUIDANCE_MODES[self.mode]

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.steps}-g{self.guidance:g}-{self.mode}"

    @property
    def line(self) -> str:
        """The plot's line this setting belongs to (steps vary along it)."""
        return line_name(self.sampler, self.guidance, self.mode)

    def flags(self) -> list[str]:
        """``lbgen predict`` overrides besides steps and guidance scale."""
        flags = [] if self.sampler == PIPELINE else [f"--model.init_args.sampler={self.sampler}"]
        if self.interval is not None:
            flags.append(f"--model.init_args.guidance_interval=[{self.interval[0]},{self.interval[1]}]")
        return flags


def parse_setting(name: str) -> Setting:
    """The setting a ``Setting.name`` names: ``SAMPLER-STEPS-gSCALE-MODE``, e.g. ``dpmpp_2m-15-g4-truncated``."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].startswith("g"):
        raise ValueError(f"a setting is SAMPLER-STEPS-gSCALE-MODE (e.g. dpmpp_2m-15-g4-full), got {name!r}.")
    try:
        guidance = float(parts[2][1:])
    except ValueError:
        raise ValueError(f"guidance scale {parts[2][1:]!r} of setting {name!r} is not a number.") from None
    return Setting(parts[0], int(parts[1]), guidance, parts[3])


def product_grid(samplers: Sequence[str], steps: Sequence[int], scales: Sequence[float],
                 modes: Sequence[str]) -> list[Setting]:
    """Every combination, in that order."""
    return [Setting(s, n, g, m) for s in samplers for n in steps for g in scales for m in modes]


def default_grid() -> list[Setting]:
    """The full run's grid (see the module docstring): 92 settings, about 3050 UNet calls per paired image."""
    from lbgen.components.sampling import SAMPLERS

    grid = product_grid(sorted(SAMPLERS), [5, 8, 10, 15, 20, 30, 50], [4.0], ["full"])
    grid += product_grid(["dpmpp_2m", "unipc", "ddim"], [10, 15, 20], [2.0, 4.0], ["truncated", "interval"])
    grid += product_grid(["dpmpp_2m", "unipc"], [10, 15, 20], [2.0], ["full"])
    grid.append(Setting(PIPELINE, 50, 4.0, "full"))  # the plain diffusers loop's default
    return list(dict.fromkeys(grid))


QUICK_GRID = [Setting(PIPELINE, 10, 4.0, "full"), Setting("dpmpp_2m", 5, 4.0, "truncated")]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}.")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}.")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[int], b: Sequence[int], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired images (same seeds) and its 95% normal interval: ``(mean, low, high)``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must be non-empty and of equal length, got {len(a)} and {len(b)}.")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    half = z * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return mean, mean - half, mean + half


def cheapest_within_best(rows: Sequence[dict[str, Any]], cost: str = "unet_calls_per_image") -> dict[str, Any]:
    """The cheapest row (lowest ``cost``; ties: higher consistency) whose consistency lies inside the 95% interval
    of the most consistent row (rows need ``consistency``, ``ci_low``, ``ci_high`` and ``cost``)."""
    scored = [r for r in rows if r.get("consistency") is not None]
    if not scored:
        raise ValueError("no row has a measured consistency: pass --oracle.")
    best = max(scored, key=lambda r: (r["consistency"], -r[cost]))
    inside = [r for r in scored if best["ci_low"] <= r["consistency"] <= best["ci_high"]]
    return min(inside, key=lambda r: (r[cost], -r["consistency"]))


def sampler_calls(folder: str, setting: Setting) -> int:
    """UNet calls along one trajectory: the scheduler's timesteps (PNDM makes steps + 1)."""
    from flops import scheduler_calls

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    return scheduler_calls(config, setting.steps, None if setting.sampler == PIPELINE else setting.sampler)


def score(folder: Path, oracle: str, image_size: int) -> list[int]:
    """`lbgen predict` with the scoring recipe (oracle only); the per-image agreement, in request-id order."""
    from lbgen.cli import cli_main
    from lbgen.storage.dataset_format import read_manifest

    cli_main(["predict", "-c", str(REPO / "configs/evaluate/score_synthetic.yaml"),
              f"--model.init_args.oracle_checkpoint={oracle}", "--model.init_args.clip=null",
              "--model.init_args.filter_mode=none", f"--data.init_args.folder={folder}",
              f"--data.init_args.image_size={image_size}", "--trainer.enable_progress_bar=false",
              "--trainer.accelerator=cpu", "--trainer.logger=false",
              f"--trainer.default_root_dir={folder.parent / 'logs-score'}"])
    _, records = read_manifest(folder)
    # by request id: the same position means the same prompt and seed in every setting (paired comparisons)
    return [int(r["scores"]["oracle_agrees"]) for r in sorted(records, key=lambda r: r["id"])]


def smoke_oracle(out: Path) -> str:
    """A classifier checkpoint after 1 training step (for ``--quick``: checks the scoring path, means nothing)."""
    found = sorted((out / "smoke_oracle").glob("version_*/checkpoints/last.ckpt"))
    if not found:
        subprocess.run([str(Path(sys.executable).with_name("lbgen")), "fit", "-c",
                        str(REPO / "configs/classifier/fashion_5shot.yaml"), "--trainer.max_steps=1",
                        "--test_after_fit=no", "--trainer.enable_progress_bar=false",
                        f"--trainer.default_root_dir={out / 'smoke_oracle'}"], check=True, env=child_env(1),
                       cwd=REPO, stdout=subprocess.DEVNULL)
        found = sorted((out / "smoke_oracle").glob("version_*/checkpoints/last.ckpt"))
    return str(found[-1])


def run_setting(setting: Setting, folder: str, out: Path, args: argparse.Namespace, oracle: str | None,
                counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Generate (and score) one setting, or read its earlier result."""
    from generation import lbgen_predict

    from lbgen.components.sampling import unet_calls_per_image

    where = out / "settings" / setting.name
    done = where / "result.json"
    n_images = args.images_per_class * 10
    if done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("images") == n_images:
            if oracle is not None and kept.get("agrees") is None:  # generated earlier without an oracle
                kept["agrees"] = score(where / "dataset", oracle, args.image_size)
                done.write_text(json.dumps(kept))
            return kept
    shutil.rmtree(where, ignore_errors=True)  # a half-made run would resume and time only its rest
    where.mkdir(parents=True)
    wall, loop = lbgen_predict(folder, where / "dataset", args.images_per_class, args.batch_size, setting.steps,
                               setting.guidance, setting.flags())
    calls = sampler_calls(folder, setting)
    row: dict[str, Any] = {**asdict(setting), "name": setting.name, "interval": setting.interval,
                           "images": n_images, "sampler_calls": calls,
                           "unet_calls_per_image": unet_calls_per_image(calls, setting.guidance, setting.interval),
                           "wall_s": wall, "predict_s": loop, "s_per_image": loop / n_images,
                           "wall_s_per_image": wall / n_images}
    for arch, c in counts.items():
        row[f"{arch}_gflop_per_image"] = flops_per_image(calls, setting.guidance, setting.interval, per_call(c),
                                                         c["vae_decode"], c["text_encoder"]) / 1e9
    row["agrees"] = score(where / "dataset", oracle, args.image_size) if oracle else None
    done.write_text(json.dumps(row))
    return row


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Consistency, intervals and the paired difference to the best row; the recommended row."""
    for r in rows:
        bits = r.get("agrees")
        if bits:
            r["consistency"] = sum(bits) / len(bits)
            r["ci_low"], r["ci_high"] = wilson_interval(sum(bits), len(bits))
        else:
            r["consistency"] = r["ci_low"] = r["ci_high"] = None
    scored = [r for r in rows if r["consistency"] is not None]
    if not scored:
        return rows, None
    best = max(scored, key=lambda r: (r["consistency"], -r["unet_calls_per_image"]))
    for r in scored:
        if len(r["agrees"]) == len(best["agrees"]):
            r["diff_vs_best"] = paired_difference(r["agrees"], best["agrees"])
    return rows, cheapest_within_best(scored)


def table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = []
    for r in sorted(rows, key=lambda r: (r["sampler"], r["guidance"], r["mode"], r["steps"])):
        ci = "-" if r["consistency"] is None else f"{pct(r['ci_low'])}-{pct(r['ci_high'])}"
        diff = r.get("diff_vs_best")
        diff_text = "-" if diff is None else f"{100 * diff[0]:+.1f} ({100 * diff[1]:+.1f}, {100 * diff[2]:+.1f})"
        mark = " **chosen**" if chosen is not None and r["name"] == chosen["name"] else ""
        lines.append([r["sampler"] + mark, r["steps"], f"{r['guidance']:g}", r["mode"], r["unet_calls_per_image"],
                      r["embedded_gflop_per_image"], r["sd15_gflop_per_image"] / 1e3, 1e3 * r["s_per_image"],
                      pct(r["consistency"]), ci, diff_text])
    return markdown_table(["sampler", "steps", "guidance", "mode", "UNet calls / image", "GFLOP / image",
                           "SD 1.5 TFLOP / image", "ms / image", "consistency %", "95% CI",
                           "vs best, paired (95% CI)"], lines)


def plot(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Path) -> None:
    """Label consistency vs UNet calls per image, one line per sampler / guidance setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["consistency"] is not None]
    if not scored:
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for line in sorted({line_name(r["sampler"], r["guidance"], r["mode"]) for r in scored}):
        own = sorted((r for r in scored if line_name(r["sampler"], r["guidance"], r["mode"]) == line),
                     key=lambda r: r["unet_calls_per_image"])
        x = [r["unet_calls_per_image"] for r in own]
        y = [100 * r["consistency"] for r in own]
        err = [[100 * (r["consistency"] - r["ci_low"]) for r in own], [100 * (r["ci_high"] - r["consistency"])
                                                                       for r in own]]
        ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, linewidth=1, label=line)
    if chosen is not None:
        ax.scatter([chosen["unet_calls_per_image"]], [100 * chosen["consistency"]], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=5, label=f"chosen: {chosen['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("UNet calls per image (a guided step counts 2)")
    ax.set_ylabel("oracle label consistency % (95% Wilson interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lbgen.components.sampling import SAMPLERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generator", default=None, help="diffusers folder; default: a small random one")
    parser.add_argument("--oracle", default=None, help="classifier checkpoint (configs/classifier/fashion_oracle)")
    parser.add_argument("--images-per-class", type=int, default=100, help="10 classes: 100 -> 1000 paired images")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=32, help="the side the oracle reads")
    parser.add_argument("--samplers", nargs="+", default=None, help=f"{sorted(SAMPLERS)} or {PIPELINE}")
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 8, 10, 15, 20, 30, 50])
    parser.add_argument("--scales", nargs="+", type=float, default=[4.0])
    parser.add_argument("--modes", nargs="+", default=["full"], choices=sorted(GUIDANCE_MODES))
    parser.add_argument("--settings", nargs="+", default=None,
                        help="an explicit list of settings by name (SAMPLER-STEPS-gSCALE-MODE), instead of a grid")
    parser.add_argument("--quick", action="store_true", help="2 settings x 20 images: checks the script")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and its estimated duration")
    parser.add_argument("--ms-per-unet-row", type=float, default=3.1,
                        help="for the estimate: ms per UNet call per image (embedded generator, 1 CPU thread)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images_per_class, args.batch_size = 2, 10
        grid = QUICK_GRID
    elif args.settings:
        grid = [parse_setting(name) for name in args.settings]
    elif args.samplers:
        unknown = sorted(set(args.samplers) - set(SAMPLERS) - {PIPELINE})
        if unknown:
            parser.error(f"unknown samplers {unknown}; choose from {sorted(SAMPLERS)} or {PIPELINE}")
        grid = product_grid(args.samplers, args.steps, args.scales, args.modes)
    else:
        grid = default_grid()
    from lbgen.components.sampling import unet_calls_per_image

    rows_per_image = sum(unet_calls_per_image(s.steps, s.guidance, s.interval) for s in grid)
    estimate_s = rows_per_image * args.images_per_class * 10 * args.ms_per_unet_row / 1e3
    print(f"[frontier] {len(grid)} settings, {rows_per_image} UNet calls per paired image, "
          f"{args.images_per_class * 10} images each: about {estimate_s / 60:.0f} min of generation", flush=True)
    if args.dry_run:
        print("\n".join(s.name for s in grid))
        return {"settings": [s.name for s in grid], "estimate_s": estimate_s}
    args.out.mkdir(parents=True, exist_ok=True)
    folder = ensure_generator(args.generator, args.out)
    oracle = args.oracle or (smoke_oracle(args.out) if args.quick else None)
    counts = {"embedded": architecture_flops(*folder_configs(folder)), "sd15": architecture_flops(*sd15_configs())}
    started, rows = time.perf_counter(), []
    for i, setting in enumerate(grid):
        t = time.perf_counter()
        rows.append(run_setting(setting, folder, args.out, args, oracle, counts))
        print(f"[frontier] {i + 1}/{len(grid)} {setting.name}: {time.perf_counter() - t:.0f} s", flush=True)
    rows, chosen = summarise(rows)
    text = table(rows, chosen)
    (args.out / "frontier.md").write_text(text + "\n")
    plot(rows, chosen, args.out / "frontier.png")
    result = {"generator": args.generator or "random (embedded architecture)", "oracle": oracle,
              "smoke_oracle": args.oracle is None and args.quick, "images": args.images_per_class * 10,
              "total_s": time.perf_counter() - started, "chosen": chosen and chosen["name"],
              "rows": [{k: v for k, v in r.items() if k != "agrees"} for r in rows]}
    (args.out / "frontier.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
