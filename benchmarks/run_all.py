"""All speed and memory benchmarks, each in its own process, summarised as one markdown table of ratios.

    .venv/bin/python benchmarks/run_all.py --out /tmp/lbgen-bench [--quick] [--generator DIR]

Without ``--generator`` a random generator of the embedded one's architecture is built (so it runs on a fresh
checkout, before the quickstart trained anything); the quickstart's is ``~/lbgen-runs/quickstart/runs/embedded/
generator``. Every ratio is measured side by side inside one child run (see each script's docstring):
- ``generation.py``: `lbgen predict` vs the plain `StableDiffusionPipeline` loop; pure model compute vs its wall;
- ``data_pipeline.py``: classifier input from the shards vs from an ImageFolder of the exported PNGs, for the
  generator's images (32 px for the embedded one) and for 256 px PNGs read at 224 px (ImageNet-like sizes);
- ``writer_overlap.py``: PNG encoding + shard writing inline vs in the writer's background thread (512 px
  images, a simulated device);
- ``generation_ddp.py``: `lbgen predict` on 2 processes (DDP, gloo) vs 1;
- ``lbgen_step.py``: one lbGen step's peak memory with vs without gradient checkpointing.
- ``time_to_n.py``: time to N images, `lbgen predict` at its default setting (``--lbgen-setting``: sampler, steps,
  guidance scale and mode) vs the plain diffusers loop at its own defaults (the pipeline's scheduler, 50 steps,
  guidance on every step), beside the ratio of counted FLOPs per image and, with ``--oracle``, both label
  consistencies (1000 images then);
- ``flops.py``: counted FLOPs per UNet call and VAE decode (embedded generator, SD 1.5 at 512 px, meta device);
- ``host_overhead.py``: lbgen's own work per sampler step and per image written, with zero-cost UNet and VAE.
``--quick`` shrinks every measurement (about 5 minutes on 2 CPU cores); the full run takes about 16 minutes there
(about 22 with ``--oracle``: 1000 images through each side).
Children run with ``--threads`` intra-op threads (default 1: the machine may be shared). Writes
``OUT/results.json`` and ``OUT/results.md``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, run_json  # noqa: E402
from time_to_n import DEFAULT_LBGEN_SETTING  # noqa: E402

BENCH = REPO / "benchmarks"

SETTINGS = {
    "quick": {"generation": ["--images-per-class=5", "--batch-size=25", "--steps=10", "--rounds=1"],
              "data": ["--images-per-class=30", "--steps=2", "--epochs=3", "--num-workers=0"],
              "data_large": ["--native-size=256", "--image-size=224", "--images-per-class=20", "--steps=1",
                             "--epochs=3", "--num-workers=0"],
              "writer": ["--images=32", "--rounds=1"],
              "ddp": ["--images-per-class=4", "--batch-size=10", "--steps=10", "--rounds=1"],
              "step": ["--ks=5", "--batch=4", "--steps=10", "--repeats=2"],
              "time_to_n": ["--images-per-class=2", "--batch-size=10", "--rounds=1"],
              "time_to_n_oracle": ["--images-per-class=2", "--batch-size=10", "--rounds=1"],
              "host_overhead": ["--quick"]},
    "full": {"generation": ["--images-per-class=10", "--batch-size=50", "--steps=20", "--rounds=3",
                            "--variants=default,no_prompt_cache,inline_writer,channels_last"],
             "data": ["--images-per-class=100", "--steps=4", "--epochs=3", "--num-workers=0,2"],
             "data_large": ["--native-size=256", "--image-size=224", "--images-per-class=100", "--steps=2",
                            "--epochs=3", "--num-workers=0,2"],
             "writer": ["--images=64", "--rounds=2"],
             "ddp": ["--images-per-class=10", "--batch-size=10", "--steps=20", "--rounds=2"],
             "step": ["--ks=5", "--batch=10", "--steps=20", "--repeats=3"],
             "time_to_n": ["--images-per-class=10", "--batch-size=50", "--rounds=2"],
             # 1000 paired images: a 95% interval of about +-2.5 points on the consistency
             "time_to_n_oracle": ["--images-per-class=100", "--batch-size=50", "--rounds=1"],
             "host_overhead": ["--batches", "1", "4", "16", "64", "--images=64", "--repeats=3"]},
}


def failure(value: Any) -> str:
    """A table cell for a part that did not give results: its error's last line, short, on one line."""
    if not value:
        return "not run"
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return "failed: " + (lines[-1] if lines else "?")[:160].replace("|", "/")


def summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    """The table's rows ``[measurement, ratio, goal, verdict]`` from the children's JSON results.

    A missing or failed part gives a row saying so, so one failure does not hide the other results.
    """
    rows: list[list[Any]] = []

    def verdict(value: float, goal: float, higher_is_better: bool = True, note: str = "") -> str:
        if value != value:  # NaN: not measured
            return "not measured"
        met = value >= goal if higher_is_better else value <= goal
        return ("met" if met else "missed") + (f" ({note})" if note else "")

    rows += speed_to_dataset_rows(results, verdict)
    gen = results.get("generation")
    if isinstance(gen, dict) and "default" in gen:
        d = gen["default"]
        pixels = d.get("vs_plain_pixels", {})
        same = f"{pixels.get('identical', '?')}/{pixels.get('compared', '?')} images identical"
        rows.append([f"generation img/s: `lbgen predict` / plain `StableDiffusionPipeline` loop ({same})",
                     d["speedup_vs_plain"], ">= 1.3 (GPU)", verdict(d["speedup_vs_plain"], 1.3, note="CPU run")])
        rows.append(["generation: pure UNet + VAE compute / `lbgen predict` wall", d["compute_share_of_wall"],
                     ">= 0.95", verdict(d["compute_share_of_wall"], 0.95)])
        if "compute_share_of_predict_loop" in d:
            rows.append(["generation: pure UNet + VAE compute / its `trainer.predict` (no argument parsing, no "
                         "loading)", d["compute_share_of_predict_loop"], ">= 0.95",
                         verdict(d["compute_share_of_predict_loop"], 0.95)])
        for variant in ("no_prompt_cache", "inline_writer", "channels_last", "compile"):
            if variant in gen:
                rows.append([f"generation wall: `{variant}` / default", gen[variant]["wall_s"] / d["wall_s"], "-",
                             "-"])
    else:
        rows.append(["generation", float("nan"), "", failure(gen)])
    for key in ("data_pipeline", "data_pipeline_large"):
        data = results.get(key)
        if isinstance(data, dict) and data.get("workers"):
            size = f"{data['native_size']} px PNGs read at {data['image_size']} px"
            for workers, r in data["workers"].items():
                rows.append([f"input img/s, later epochs: shards / PNG ImageFolder ({size}, {workers} workers)",
                             r["ratio_later_epochs"], ">= 3", verdict(r["ratio_later_epochs"], 3.0)])
                rows.append([f"input img/s, first epoch incl. lbgen's one decode: shards / PNG ImageFolder ({size}, "
                             f"{workers} workers)", r["ratio_first_epoch"], "-", "-"])
        else:
            rows.append([f"input pipeline ({key})", float("nan"), "", failure(data)])
    writer = results.get("writer_overlap")
    if isinstance(writer, dict) and "speedup" in writer:
        rows.append([f"generation wall, PNG + shards inline / in the background thread ({writer['size']} px, "
                     f"simulated device {writer['device_ms_per_image']:.0f} ms/image, PNG "
                     f"{writer['png_encode_ms_per_image']:.0f} ms/image)", writer["speedup"], "-", "-"])
    else:
        rows.append(["background writer", float("nan"), "", failure(writer)])
    ddp = results.get("generation_ddp")
    if isinstance(ddp, dict) and "speedup_2_vs_1" in ddp:
        rows.append([f"`lbgen predict` wall, 1 / 2 processes (DDP gloo, {ddp['threads_per_process']} thread each; "
                     f"same images: {ddp['same_images']})", ddp["speedup_2_vs_1"], "-",
                     "a 2-core shared CPU cannot show GPU scaling"])
    else:
        rows.append(["`lbgen predict` 1 vs 2 processes", float("nan"), "", failure(ddp)])
    step = results.get("lbgen_step")
    if isinstance(step, dict) and step.get("rows"):
        by = {(r["k"], r["checkpointing"]): r for r in step["rows"]}
        for k in sorted({r["k"] for r in step["rows"]}):
            if (k, False) in by and (k, True) in by:
                plain, ckpt = by[(k, False)], by[(k, True)]
                memory = ckpt["peak_mib"] / plain["peak_mib"]
                rows.append([f"lbGen step peak memory, checkpointing / plain (K = {k})", memory, "<= 0.5",
                             verdict(memory, 0.5, higher_is_better=False)])
                rows.append([f"lbGen step time, checkpointing / plain (K = {k})", ckpt["step_s"] / plain["step_s"],
                             "-", "-"])
    else:
        rows.append(["lbGen step", float("nan"), "", failure(step)])
    return rows


def speed_to_dataset_rows(results: dict[str, Any], verdict) -> list[list[Any]]:
    """Issue 21's rows: time to N images vs the plain loop, beside the FLOP ratio, consistency, host overhead."""
    rows: list[list[Any]] = []
    ttn = results.get("time_to_n")
    if isinstance(ttn, dict) and "speedup" in ttn:
        lb, plain = ttn["per_image"]["lbgen"], ttn["per_image"]["plain"]
        quality = ttn.get("equal_quality")
        note = {None: "consistency not measured", True: "at equal consistency", False: "consistency lower"}[quality]
        rows.append([f"time to {ttn['images']} images: plain diffusers loop ({plain['setting']}) / `lbgen predict` "
                     f"({lb['setting']})", ttn["speedup"], ">= 2.5",
                     verdict(ttn["speedup"], 2.5, note=note) if quality is not False else f"missed ({note})"])
        rows.append([f"counted FLOPs per image, plain / lbgen ({plain['gflop_per_image']:.2f} / "
                     f"{lb['gflop_per_image']:.2f} GFLOP; UNet calls {plain['unet_calls_per_image']} / "
                     f"{lb['unet_calls_per_image']})", ttn["flop_ratio"], "-", "-"])
        follows = abs(ttn["speedup_over_flop_ratio"] - 1) <= 0.15
        rows.append(["wall-time ratio / FLOP ratio", ttn["speedup_over_flop_ratio"], "0.85-1.15",
                     "met" if follows else "missed"])
        if "plain_consistency" in ttn:
            p, q = ttn["plain_consistency"], ttn["lbgen_consistency"]
            rows.append([f"label consistency, lbgen / plain loop ({100 * q['consistency']:.1f}% "
                         f"[{100 * q['ci_low']:.1f}, {100 * q['ci_high']:.1f}] vs {100 * p['consistency']:.1f}% "
                         f"[{100 * p['ci_low']:.1f}, {100 * p['ci_high']:.1f}], {p['n']} images)",
                         q["consistency"] / p["consistency"] if p["consistency"] else float("nan"),
                         "within 1 point or the plain loop's 95% interval", "met" if quality else "missed"])
    else:
        rows.append(["time to N images vs the plain loop", float("nan"), "", failure(ttn)])
    host = results.get("host_overhead")
    if isinstance(host, dict) and host.get("loop"):
        for r in host["loop"]:
            if r["shape"] == "sd15" and r["sampler"] == host["loop"][0]["sampler"]:
                rows.append([f"host ms per sampler step, zero-cost UNet + VAE (SD 1.5 shapes, {r['sampler']}, batch "
                             f"{r['batch']}; the SD 1.5 guided call at 40% of an H100: "
                             f"{r['sd15_guided_call_ms_at_40pct_h100']:.1f} ms)", r["ms_per_step"], "<= 2 ms",
                             verdict(r["ms_per_step"], 2.0, higher_is_better=False)])
        for r in host.get("predict", []):
            if r["shape"] == "sd15":
                rows.append([f"host ms per image written beyond the steps, whole `trainer.predict` (SD 1.5 shapes, "
                             f"512 px, batch {r['batch']})", r["ms_per_image_written"], "-", "-"])
    else:
        rows.append(["host overhead", float("nan"), "", failure(host)])
    flops = results.get("flops")
    if isinstance(flops, dict) and "architectures" in flops:
        sd = flops["architectures"]["sd15"]
        rows.append(["SD 1.5 UNet call, batch 1, counted TFLOP (FlopCounterMode, meta device) / reference 0.80",
                     flops["sd15_vs_reference"]["unet_call_b1"], "-", f"{sd['unet_call_b1'] / 1e12:.3f} TFLOP"])
        rows.append(["SD 1.5 VAE decode 512 px, counted TFLOP / reference 2.5",
                     flops["sd15_vs_reference"]["vae_decode"], "-", f"{sd['vae_decode'] / 1e12:.3f} TFLOP"])
    else:
        rows.append(["FLOP counts", float("nan"), "", failure(flops)])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generator", default=None, help="diffusers folder; default: a small random one")
    parser.add_argument("--quick", action="store_true", help="small measurements, a few minutes")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each child")
    parser.add_argument("--lbgen-setting", default=DEFAULT_LBGEN_SETTING,
                        help="lbgen's default for the time-to-N comparison: SAMPLER-STEPS-gSCALE-MODE (frontier.py)")
    parser.add_argument("--oracle", default=None, help="classifier checkpoint: label consistency of both sets")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS["quick" if args.quick else "full"]
    generator_arg = [f"--generator={args.generator}"] if args.generator else []
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {platform.system()}, python "
                               f"{platform.python_version()}", "quick": args.quick, "threads": args.threads,
                               "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()

    def child(name: str, argv_child: list[str]) -> None:
        print(f"[run_all] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            results[name] = run_json(argv_child, threads=args.threads)
        except Exception as err:  # one broken part must not hide the others' results
            results[name] = f"{type(err).__name__}: {str(err)[-500:]}"
        print(f"[run_all] {name} done in {time.perf_counter() - t:.0f} s", flush=True)

    child("generation", [str(BENCH / "generation.py"), f"--out={args.out / 'generation'}", *generator_arg,
                         *settings["generation"]])
    # the other parts reuse the generator the first one used (built there when none was given)
    generator = args.generator or str(args.out / "generation" / "random_generator")
    if not (Path(generator) / "model_index.json").is_file():
        raise SystemExit(f"No generator at {generator}: the generation benchmark failed first:\n"
                         f"{results['generation']}")
    child("data_pipeline", [str(BENCH / "data_pipeline.py"), f"--out={args.out / 'data'}",
                            f"--generator={generator}", *settings["data"]])
    child("data_pipeline_large", [str(BENCH / "data_pipeline.py"), f"--out={args.out / 'data'}",
                                  *settings["data_large"]])
    child("writer_overlap", [str(BENCH / "writer_overlap.py"), f"--out={args.out / 'writer'}", *settings["writer"]])
    child("generation_ddp", [str(BENCH / "generation_ddp.py"), f"--out={args.out / 'ddp'}",
                             f"--generator={generator}", *settings["ddp"]])
    child("lbgen_step", [str(BENCH / "lbgen_step.py"), f"--generator={generator}", "--json", *settings["step"]])
    oracle_arg = [f"--oracle={args.oracle}"] if args.oracle else []
    child("time_to_n", [str(BENCH / "time_to_n.py"), f"--out={args.out / 'time_to_n'}", f"--generator={generator}",
                        f"--lbgen-setting={args.lbgen_setting}", *oracle_arg,
                        *settings["time_to_n_oracle" if args.oracle else "time_to_n"]])
    child("flops", [str(BENCH / "flops.py"), f"--generator={generator}"])
    child("host_overhead", [str(BENCH / "host_overhead.py"), *settings["host_overhead"]])
    results["total_s"] = time.perf_counter() - started
    table = markdown_table(["measurement", "value", "goal", "verdict"], summary_rows(results))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
