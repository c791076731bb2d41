"""What the background shard writer buys at SD image size: PNG encoding + shard writing overlapped with generation.

    .venv/bin/python benchmarks/writer_overlap.py --out /tmp/lbgen-writerbench [--images 64] [--batch 8] \\
        [--device-ms-per-image 150] [--size 512] [--rounds 2]

The generator is simulated, the writer is real: ``trainer.predict`` of a stand-in system whose ``predict_step``
waits ``--device-ms-per-image`` per image (the host waiting for a GPU, as ``.cpu()`` at the end of a batch does)
and returns a 512 px photograph (scikit-image's astronaut, shifted per image) per request; ``SyntheticDatasetWriter``
encodes the PNGs and writes the shards, inline (``max_pending_batches=0``, as before) or in its background thread.
Rounds alternate the two; the best wall time of each counts. Also reported: the PNG encoding time per image alone.
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ratio  # noqa: E402

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter  # noqa: E402
from lbgen.datamodules import GenerationRequestsDataModule  # noqa: E402
from lbgen.storage.dataset_format import png_bytes  # noqa: E402


def photograph(size: int) -> torch.Tensor:
    from skimage.data import astronaut

    image = torch.from_numpy(astronaut()).permute(2, 0, 1)
    return torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                           antialias=True)[0].round().clamp(0, 255).to(torch.uint8)


class SimulatedGenerator(L.LightningModule):
    """Returns shifted copies of one photograph after waiting as long as a device would take."""

    def __init__(self, image: torch.Tensor, seconds_per_image: float) -> None:
        super().__init__()
        self.image, self.seconds_per_image = image, seconds_per_image

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        records = batch["records"]
        time.sleep(self.seconds_per_image * len(records))
        images = torch.stack([torch.roll(self.image, r["index"] + 7 * r["class_index"], dims=2) for r in records])
        return {"images": images, "records": records}


def run(out: Path, image: torch.Tensor, images: int, batch: int, seconds_per_image: float, queue: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    data = GenerationRequestsDataModule(class_names=[f"class {i}" for i in range(8)],
                                        images_per_class=max(images // 8, 1), batch_size=batch)
    writer = SyntheticDatasetWriter(out, shard_size=4 * batch, generator_record={"generator_id": "simulated"},
                                    max_pending_batches=queue)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[writer], default_root_dir=str(out.parent))
    start = time.perf_counter()
    trainer.predict(SimulatedGenerator(image, seconds_per_image), data, return_predictions=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device-ms-per-image", type=float, default=150.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image = photograph(args.size)
    start = time.perf_counter()
    for i in range(8):
        png_bytes(torch.roll(image, i, dims=2))
    encode_ms = (time.perf_counter() - start) / 8 * 1000
    times: dict[str, list[float]] = {"inline": [], "background": []}
    for _ in range(args.rounds):
        for name, queue in (("inline", 0), ("background", 4)):
            times[name].append(run(args.out / name, image, args.images, args.batch,
                                   args.device_ms_per_image / 1000, queue))
    inline, background = min(times["inline"]), min(times["background"])
    result = {"images": args.images, "batch": args.batch, "size": args.size, "png_encode_ms_per_image": encode_ms,
              "device_ms_per_image": args.device_ms_per_image, "rounds": times, "inline_s": inline,
              "background_s": background, "speedup": ratio(inline, background),
              "device_only_s": args.images * args.device_ms_per_image / 1000}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
