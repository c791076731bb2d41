"""Generation requests: (classes, images per class, method, base seed) expanded into per-image records.

Every request has a seed derived from (base seed, class, index) only, and requests are grouped into fixed chunks
in a canonical order (``request_order``), each chunk generated as one batch. So a request yields the same image
whatever the number of processes, and a resumed run recomputes exactly the chunks an uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lbgen.attributes.bank import AttributeBank, AttributeMode, template_uses_attributes
from lbgen.components.prompts import fill_caption
from lbgen.datamodules.base import ImageClassificationDataModule
from lbgen.datamodules.class_names import check_same_classes, read_class_names
from lbgen.storage.dataset_format import request_id, request_seed
from lbgen.storage.files import read_json

Method = Literal["txt2img", "img2img", "genie"]
RequestOrder = Literal["interleaved", "class"]
REQUEST_ORDERS = ("interleaved", "class")
"""``interleaved``: index-major (image 0 of every class, then image 1, ...): every chunk, so every process's
shards, spans many classes, as shard-level shuffling when streaming needs; ``class``: class-major (all images of
class 0, then class 1, ...), the order of every set written before ``request_order`` existed."""
DEFAULT_STRENGTH = {"txt2img": None, "img2img": 0.5, "genie": 0.8}
"""Each method's noise ratio r when ``strength`` is not given."""
RETIRED_METHODS = {"img2img_low": 0.3, "img2img_high": 0.7}
"""Former method names that were strength presets of img2img (manifests written with them still read)."""


def top_confused(confusion: np.ndarray, target: int, k: int) -> list[int]:
    """The k classes most often confused with ``target`` (rows: true class, columns: prediction), both ways."""
    scores = confusion[target, :] + confusion[:, target]
    scores = scores.astype(float)
    scores[target] = -np.inf
    return [int(c) for c in np.argsort(-scores, kind="stable")[:k]]


class RequestChunks(Dataset):
    """Chunks of requests; each item is one generation batch (a dict of lists, plus source images if any)."""

    def __init__(self, chunks: list[list[dict[str, Any]]], images: Any = None) -> None:
        self.chunks, self.images = chunks, images

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        records = self.chunks[i]
        batch: dict[str, Any] = {"records": records}
        if records and records[0]["source_position"] is not None:
            batch["source_images"] = torch.stack([
                self.images.load(r["source_position"]).float() / 255 for r in records])
        return batch


def _identity(batch: Any) -> Any:
    return batch


class GenerationRequestsDataModule(L.LightningDataModule):
    """What to generate, for ``lbgen predict`` with a generation system.

    Args:
        class_names: classes to generate for; default: those of ``source_data``.
        class_names_file: or a class file instead of ``class_names`` (``lbgen.datamodules.class_names.
            read_class_file``): one name per line, or a class map ``folder<TAB>name`` / JSON ``{folder: name}`` /
            ImageNet's ``LOC_synset_mapping.txt`` whose names are taken in sorted-folder order (the real
            ImageFolder's class order), e.g. ``configs/lbgen/imagenet_class_map.txt``.
        first_name_only: keep each name from ``class_names_file`` up to its first comma (``tench, Tinca tinca``).
        source_data: the real DataModule whose training split gives img2img / GeNIe sources.
        images_per_class: images per class (> 0).
        classes: generate only these class indices (default: all).
        method: ``txt2img`` (pure noise), ``img2img`` (same-class source), ``genie`` (source from another class,
            target-class prompt).
        strength: noise ratio r in (0, 1] for image-conditioned methods (default: img2img 0.5, GeNIe 0.8; the
            papers' Img2Img baselines use 0.3 and 0.7).
        base_seed: the seed every request's seed derives from.
        prompt_template: with ``{class}`` and optionally ``{superclass}``.
        superclass: filled into ``{superclass}``.
        negative_prompt: one negative prompt for all images.
        genie_sources: ``random`` other class, or ``confusion``: among the ``top_k`` classes most confused with the
            target in ``confusion_file`` (written by the classifier's ``test``).
        confusion_file: path of ``confusion_matrix.json``.
        top_k: how many most-confused classes to draw sources from.
        attribute_mode: BOB's attributes in the prompt: ``none`` (class prompt only), ``bob`` (background and
            pose of a real image drawn from the whole bank, independently of the class: marginalisation), or
            ``conditioned`` (drawn among the class's own real images).
        attribute_bank: attribute bank file (``AttributeExtractionSystem``); needed unless ``none``.
        descriptor: fills ``{descriptor}``; default the bank's.
        batch_size: requests per generation batch (fixed chunks; keep it when resuming a run).
        num_workers: DataLoader workers.
        request_order: the order requests are chunked in (``REQUEST_ORDERS``); seeds and ids do not depend on it.
            Recorded in ``run.json`` unless ``class`` (so sets written before keep their description and resume
            with ``request_order: class``).
    """

    def __init__(
        self,
        class_names: list[str] | None = None,
        class_names_file: str | None = None,
        first_name_only: bool = False,
        source_data: ImageClassificationDataModule | None = None,
        images_per_class: int = 100,
        classes: list[int] | None = None,
        method: Method = "txt2img",
        strength: float | None = None,
        base_seed: int = 0,
        prompt_template: str = "a photo of a {class}",
        superclass: str | None = None,
        negative_prompt: str | None = None,
        genie_sources: Literal["random", "confusion"] = "random",
        confusion_file: str | None = None,
        top_k: int = 3,
        attribute_mode: AttributeMode = "none",
        attribute_bank: str | None = None,
        descriptor: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        request_order: RequestOrder = "interleaved",
    ) -> None:
        super().__init__()
        if method in RETIRED_METHODS:
            raise ValueError(f"method {method!r} is now `method: img2img` with `strength: {RETIRED_METHODS[method]}` "
                             "(a strength preset, not a method); datasets generated with the old name still read.")
        if method not in DEFAULT_STRENGTH:
            raise ValueError(f"Unknown method {method!r}; choose one of {sorted(DEFAULT_STRENGTH)}.")
        if images_per_class <= 0:
            raise ValueError(f"images_per_class must be positive, got {images_per_class}: set it to the number of "
                             "images to generate for each class (1 or more).")
        strength = strength if strength is not None else DEFAULT_STRENGTH[method]
        if method == "txt2img" and strength is not None:
            raise ValueError("txt2img starts from pure noise and takes no strength; use img2img for a source image.")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength (noise ratio r) must be in (0, 1], got {strength}: use e.g. 0.3 (close to the "
                             "source), 0.8 (GeNIe) or 1.0 (the source only sets the layout), or leave it unset for "
                             f"the {method!r} preset.")
        if method != "txt2img" and source_data is None:
            raise ValueError(f"method {method!r} needs source images: set source_data to a real DataModule.")
        if class_names_file is not None:
            # one reader for every DataModule (it also refuses class_names given beside the file)
            class_names = read_class_names(class_names, class_names_file, first_name_only)
        if class_names is None:
            if source_data is None:
                raise ValueError("Give class_names, class_names_file or a source_data DataModule to take them from.")
            class_names = source_data.class_names
        if len(set(class_names)) != len(class_names):
            dup = sorted({n for n in class_names if class_names.count(n) > 1})
            raise ValueError(f"Duplicate class names {dup}: every class needs a distinct name for its prompt; rename "
                             "them (e.g. add a qualifier: 'crane (bird)', 'crane (machine)').")
        if source_data is not None:
            check_same_classes(source_data.class_names, list(class_names), "source_data", "class_names",
                               "leave class_names and class_names_file unset (they come from source_data).")
        if genie_sources == "confusion" and not confusion_file:
            raise ValueError("genie_sources='confusion' needs confusion_file (confusion_matrix.json of a test run).")
        if attribute_mode not in ("none", "bob", "conditioned"):
            raise ValueError(f"attribute_mode must be 'none', 'bob' or 'conditioned', got {attribute_mode!r}.")
        uses_attributes = template_uses_attributes(prompt_template)
        if attribute_mode != "none" and not (attribute_bank and uses_attributes):
            raise ValueError(f"attribute_mode={attribute_mode!r} needs attribute_bank and a prompt_template "
                             "with {background} and {pose} (configs/bob/generate.yaml).")
        if attribute_mode == "none" and uses_attributes:
            raise ValueError(f"prompt_template {prompt_template!r} uses attributes: set attribute_mode to 'bob' or "
                             "'conditioned' (and attribute_bank).")
        self.bank = AttributeBank.load(attribute_bank, list(class_names)) if attribute_mode != "none" else None
        self.attribute_mode, self.attribute_bank = attribute_mode, attribute_bank
        self.descriptor = descriptor or (self.bank.descriptor if self.bank else None) or "object"
        self.class_names, self.source_data = list(class_names), source_data
        self.classes = list(range(len(class_names))) if classes is None else list(classes)
        bad = [c for c in self.classes if not 0 <= c < len(class_names)]
        if bad:
            raise ValueError(f"classes {bad} out of range for {len(class_names)} classes.")
        self.images_per_class, self.method, self.strength = images_per_class, method, strength
        self.base_seed = base_seed
        self.prompt_template, self.superclass, self.negative_prompt = prompt_template, superclass, negative_prompt
        self.genie_sources, self.confusion_file, self.top_k = genie_sources, confusion_file, top_k
        self.batch_size, self.num_workers = batch_size, num_workers
        if request_order not in REQUEST_ORDERS:
            raise ValueError(f"request_order must be one of {list(REQUEST_ORDERS)}, got {request_order!r}.")
        self.request_order = request_order
        self._skip: set[str] = set()
        self.dataset: RequestChunks | None = None
        self._chunks: list[list[dict[str, Any]]] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        """What defines this set of requests; a resumed run must match it."""
        return {"class_names": self.class_names, "classes": self.classes, "images_per_class": self.images_per_class,
                "method": self.method, "strength": self.strength, "base_seed": self.base_seed,
                "prompt_template": self.prompt_template, "superclass": self.superclass,
                "negative_prompt": self.negative_prompt, "genie_sources": self.genie_sources,
                "top_k": self.top_k, "batch_size": self.batch_size, "attribute_mode": self.attribute_mode,
                "attribute_bank_sha256": self.bank.digest() if self.bank else None, "descriptor": self.descriptor,
                # absent for class-major: the description of every set written before the option stays the same
                **({"request_order": self.request_order} if self.request_order != "class" else {})}

    def skip(self, done_ids: set[str]) -> None:
        """Leave out chunks whose requests are all done (called by the dataset writer when resuming)."""
        self._skip = set(done_ids)

    def _confusion(self) -> np.ndarray:
        path = Path(self.confusion_file)
        if not path.is_file():
            raise FileNotFoundError(f"confusion_file {path} does not exist: run `lbgen test` of a classifier on these "
                                    "classes (it writes confusion_matrix.json into its run directory), or set "
                                    "genie_sources='random'.")
        record = read_json(path, "point confusion_file at the confusion_matrix.json written by `lbgen test`.")
        if not isinstance(record, dict) or "matrix" not in record:
            raise ValueError(f"confusion_file {path} has no 'matrix'; point it at the confusion_matrix.json written "
                             "by `lbgen test`.")
        if record.get("class_names") != self.class_names:
            raise ValueError(f"{path} is for classes {record.get('class_names')}, not {self.class_names}: use the "
                             "confusion_matrix.json of a classifier tested on these classes (same names, same "
                             "order), or set genie_sources='random'.")
        try:
            matrix = np.asarray(record["matrix"], dtype=float)
        except (TypeError, ValueError):  # ragged rows or non-numbers
            matrix = np.empty(0)
        n = len(self.class_names)
        if matrix.shape != (n, n):
            raise ValueError(f"{path}: the matrix has shape {matrix.shape}, expected ({n}, {n}) numbers for "
                             f"{n} classes; point it at the confusion_matrix.json written by `lbgen test`.")
        return matrix

    def requests(self) -> list[dict[str, Any]]:
        """All requests in canonical order: ``request_order``'s (each request the same in either order)."""
        sources = None
        if self.method != "txt2img":
            split = self.source_data.split  # loads the real pool
            pool, labels = self.source_data.pool
            sources = {c: split.train[labels[split.train] == c] for c in range(self.num_classes)}
            candidates = {c: [s for s in range(self.num_classes) if s != c and len(sources[s])]
                          for c in range(self.num_classes)}
            if self.method == "genie" and self.genie_sources == "confusion":
                confusion = self._confusion()
                candidates = {c: top_confused(confusion, c, self.top_k) for c in range(self.num_classes)}
        out = []
        for c in self.classes:
            for i in range(self.images_per_class):
                seed = request_seed(self.base_seed, c, i)
                source_class = source_position = source_id = None
                if sources is not None:
                    rng = np.random.default_rng(seed)
                    source_class = int(rng.choice(candidates[c])) if self.method == "genie" else c
                    if not len(sources[source_class]):
                        raise ValueError(f"No real training image of class {source_class} to use as a source.")
                    source_position = int(rng.choice(sources[source_class]))
                    source_id = pool.sample_id(source_position)
                # attributes draw from their own stream: adding them leaves GeNIe / img2img sources unchanged
                drawn = (self.bank.draw(np.random.default_rng([seed, 1]), c, self.attribute_mode)
                         if self.bank is not None else None)
                prompt = fill_caption(self.prompt_template, self.class_names[c],
                                           drawn["background"] if drawn else None, drawn["pose"] if drawn else None,
                                           self.descriptor, self.superclass)
                attributes = ({"background": drawn["background"], "pose": drawn["pose"],
                               "attributes_from": drawn["id"], "attribute_mode": self.attribute_mode}
                              if drawn else {})
                out.append({"id": request_id(c, i), "class_index": c, "class_name": self.class_names[c],
                            "index": i, "prompt": prompt, "negative_prompt": self.negative_prompt, "seed": seed,
                            "method": self.method, "strength": self.strength, "source_class": source_class,
                            "source_position": source_position, "source_id": source_id, **attributes})
        if self.request_order == "interleaved":
            out.sort(key=lambda r: r["index"])  # stable: within an index, the classes keep their order
        return out

    def setup(self, stage: str) -> None:
        requests = self.requests()
        self._chunks = [requests[i:i + self.batch_size] for i in range(0, len(requests), self.batch_size)]

    def predict_dataloader(self) -> DataLoader:
        # Filtered here, not in setup: Lightning sets the DataModule up before the dataset writer reads what a
        # killed run already finished (``skip``), and builds the dataloader after both.
        chunks = [c for c in self._chunks if not all(r["id"] in self._skip for r in c)]
        images = self.source_data.pool[0] if self.method != "txt2img" else None
        self.dataset = RequestChunks(chunks, images)
        return DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_identity)
