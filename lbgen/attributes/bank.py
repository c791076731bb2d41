"""The attribute bank of BOB: class-agnostic background and pose of every real image, as a reviewable file.

A bank is written once by an extractor (``lbgen predict -c configs/bob/attributes.yaml``), can be read and edited
by a person, and is reused by the fine-tune (attribute captions) and by generation (marginalised attributes).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lbgen.storage.files import atomic_write, read_json

BANK_FORMAT = "lbgen-attribute-bank/1"
ATTRIBUTE_KEYS = ("background", "pose")
DEFAULT_CAPTION = "a {descriptor} photo of a {class} in the {background} background with the {pose} pose"
"""BOB's fine-tuning caption (METHODS.md)."""
MAX_ATTRIBUTE_CHARS = 200
AttributeMode = Literal["none", "bob", "conditioned"]


def class_name_parts(class_names: list[str]) -> list[str]:
    """Names a class is called by: the full name, its ``/``-separated parts ("T-shirt/top" -> T-shirt, top) and the
    words of a several-word name ("Ankle boot" -> Ankle, boot)."""
    parts = {n.strip() for name in class_names for n in [name, *name.split("/")] if n.strip()}
    parts |= {w for p in list(parts) if len(p.split()) > 1 for w in p.split() if len(w) >= 3}
    return sorted(parts, key=len, reverse=True)  # longest first: "Ankle boot" before "boot"


def _pattern(names: list[str]) -> re.Pattern[str] | None:
    if not names:
        return None
    # a plural is a mention too ("sneakers" names the class "Sneaker")
    return re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(n) for n in names) + r")(?:e?s)?(?![\w-])",
                      re.IGNORECASE)


def mentions_class(text: str, class_names: list[str]) -> list[str]:
    """The class names (or name parts, or their plurals) that ``text`` mentions as words, case-insensitively."""
    pattern = _pattern(class_name_parts(class_names))
    return sorted({m.group(0) for m in pattern.finditer(text)}) if pattern else []


def scrub_class_names(text: str, class_names: list[str], descriptor: str) -> str:
    """Replace every mention of a class name (or a part of one) by the generic ``descriptor``."""
    pattern = _pattern(class_name_parts(class_names))
    return pattern.sub(descriptor, text) if pattern else text


def check_vocabulary(words: list[str], class_names: list[str], what: str) -> None:
    """Refuse an attribute vocabulary that names a class: the attribute would leak the label."""
    leaks = {w: mentions_class(w, class_names) for w in words}
    leaks = {w: m for w, m in leaks.items() if m}
    if leaks:
        raise ValueError(f"The {what} vocabulary names classes {leaks}: attributes must be class-agnostic; "
                         "reword or remove these entries.")


def template_uses_attributes(template: str) -> bool:
    return any("{" + k + "}" in template for k in ATTRIBUTE_KEYS)


@dataclass
class AttributeBank:
    """Background and pose of real images, keyed by sample id, with the extractor that produced them.

    Attributes:
        records: one dict per image: ``id``, ``class_index``, ``class_name``, ``background``, ``pose``,
            ``extractor``.
        class_names: the classes of the dataset (index = ``class_index``).
        descriptor: the generic word the extractor used for the object ("garment").
        extractor: id of the extractor.
        meta: anything else worth recording (dataset, split seed, vocabularies).
    """

    records: list[dict[str, Any]]
    class_names: list[str]
    descriptor: str
    extractor: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        self._by_id = {r["id"]: r for r in self.records}
        labels = np.array([r["class_index"] for r in self.records], dtype=np.int64)
        self._by_class = {c: np.flatnonzero(labels == c) for c in range(len(self.class_names))}

    def validate(self, source: str = "attribute bank") -> None:
        """Check types, classes, duplicates, lengths, and that no attribute names a class."""
        if not self.records:
            raise ValueError(f"{source} holds no records.")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{source}: duplicate class names in {self.class_names}.")
        seen: set[str] = set()
        for i, r in enumerate(self.records):
            where = f"{source}, record {i}"
            missing = [k for k in ("id", "class_index", *ATTRIBUTE_KEYS) if k not in r]
            if missing:
                raise ValueError(f"{where} lacks {missing}.")
            if not isinstance(r["id"], str) or not r["id"]:
                raise ValueError(f"{where}: id must be a non-empty string, got {r['id']!r}.")
            if r["id"] in seen:
                raise ValueError(f"{where}: duplicate id {r['id']!r}.")
            seen.add(r["id"])
            c = r["class_index"]
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < len(self.class_names):
                raise ValueError(f"{where}: class_index {c!r} is not in 0..{len(self.class_names) - 1}.")
            if r.get("class_name", self.class_names[c]) != self.class_names[c]:
                raise ValueError(f"{where}: class_name {r['class_name']!r} does not match class {c} "
                                 f"({self.class_names[c]!r}).")
            for key in ATTRIBUTE_KEYS:
                value = r[key]
                if not isinstance(value, str) or not value.strip() or len(value) > MAX_ATTRIBUTE_CHARS:
                    raise ValueError(f"{where}: {key} must be a non-empty string of at most {MAX_ATTRIBUTE_CHARS} "
                                     f"characters, got {value!r}.")
                leaked = mentions_class(value, self.class_names)
                if leaked:
                    raise ValueError(f"{where}: {key} {value!r} names class(es) {leaked}; attributes must be "
                                     "class-agnostic (edit the file or re-extract).")

    # --- access ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def get(self, sample_id: str) -> dict[str, Any]:
        try:
            return self._by_id[sample_id]
        except KeyError:
            raise KeyError(f"The attribute bank has no record for sample {sample_id!r}; extract attributes for "
                           "this split (same dataset and split_seed) or pass the matching bank.") from None

    def draw(self, rng: np.random.Generator, class_index: int, mode: AttributeMode) -> dict[str, Any] | None:
        """One record: ``bob`` from all images whatever the class, ``conditioned`` from the class's own images."""
        if mode == "none":
            return None
        if mode == "bob":
            return self.records[int(rng.integers(len(self.records)))]
        if mode == "conditioned":
            rows = self._by_class.get(class_index)
            if rows is None or not len(rows):
                raise ValueError(f"The attribute bank has no image of class {class_index} "
                                 f"({self.class_names[class_index]!r}) to condition on; use attribute_mode 'bob'.")
            return self.records[int(rows[int(rng.integers(len(rows)))])]
        raise ValueError(f"Unknown attribute_mode {mode!r}; choose 'none', 'bob' or 'conditioned'.")

    def digest(self) -> str:
        """SHA-256 of the records: a resumed generation must draw from the same bank."""
        return hashlib.sha256(json.dumps(self.records, sort_keys=True).encode()).hexdigest()

    def counts(self, key: str) -> dict[str, int]:
        """How often each value of an attribute occurs (for a person reviewing the bank)."""
        values, counts = np.unique([r[key] for r in self.records], return_counts=True)
        return {str(v): int(n) for v, n in zip(values, counts, strict=True)}

    def agreement(self, reference: AttributeBank) -> dict[str, Any]:
        """How often this bank's words equal ``reference``'s (e.g. a real extractor's against the exact records),
        over the images both describe: ``background``, ``pose`` and ``both`` as shares, and ``n``. A bank of another
        split shares no image: refused, since a share over nothing means nothing."""
        theirs = {r["id"]: r for r in reference.records}
        common = [r for r in self.records if r["id"] in theirs]
        if not common:
            raise ValueError("The two attribute banks describe no image in common: extract both from the same "
                             "dataset and split (same split_seed).")
        same = {k: np.array([r[k] == theirs[r["id"]][k] for r in common]) for k in ATTRIBUTE_KEYS}
        return {"n": len(common), **{k: float(v.mean()) for k, v in same.items()},
                "both": float(np.logical_and.reduce(list(same.values())).mean())}

    # --- files -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": BANK_FORMAT, "extractor": self.extractor, "descriptor": self.descriptor,
                "class_names": self.class_names, "meta": self.meta,
                "summary": {k: self.counts(k) for k in ATTRIBUTE_KEYS}, "records": self.records}

    def save(self, path: str | Path) -> Path:
        """Write the bank as indented JSON (atomically: a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path, class_names: list[str] | None = None) -> AttributeBank:
        """Read and validate a bank; with ``class_names``, refuse a bank made for other classes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Attribute bank {path} does not exist; write one with "
                                    "`lbgen predict -c configs/bob/attributes.yaml` (see the README, BOB).")
        data = read_json(path, "the attribute bank is damaged: fix it by hand or extract it again.")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise ValueError(f"{path} is not an lbgen attribute bank (format {BANK_FORMAT!r} expected).")
        if not isinstance(data.get("records"), list) or not isinstance(data.get("class_names"), list):
            raise ValueError(f"Attribute bank {path} lacks its records or class_names lists.")
        if class_names is not None and list(data["class_names"]) != list(class_names):
            raise ValueError(f"Attribute bank {path} was made for classes {data['class_names']}, not {class_names}.")
        try:
            return cls(records=data["records"], class_names=list(data["class_names"]),
                       descriptor=str(data.get("descriptor", "")), extractor=str(data.get("extractor", "")),
                       meta=dict(data.get("meta") or {}))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
