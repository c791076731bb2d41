"""BOB's captioner: a transformers captioner or vision-language model describes each image's background and pose."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from lbgen.attributes.bank import check_vocabulary
from lbgen.attributes.extractors import AttributeExtractor
from lbgen.storage.files import looks_local

CAPTION_PROMPTS = {"background": "a photo of a {descriptor} in front of", "pose": "a photo of a {descriptor} seen from"}
"""Caption prefixes (``task="image-to-text"``) the model completes ("... in front of a white wall")."""
VLM_PROMPTS = {"background": "In a few words, describe the background behind the {descriptor}.",
               "pose": "In a few words, describe the pose or orientation of the {descriptor}."}
"""Questions for chat vision-language models (``task="image-text-to-text"``)."""
MAX_WORDS = 10
MAX_CHARS = 120  # the bank accepts 200; leaves room for scrubbing class names into the descriptor
_SENTENCE_END = re.compile(r"[.!?;\n]")
_EDGE = string.punctuation + string.whitespace


def clean_answer(text: str, prompt: str = "") -> str:
    """The generated attribute: echoed prompt removed, first sentence, at most ``MAX_WORDS`` words, lowercase."""
    text = text.strip()
    if prompt and text.lower().startswith(prompt.strip().lower()):
        text = text[len(prompt.strip()):]
    text = _SENTENCE_END.split(text.strip(_EDGE), maxsplit=1)[0]
    text = " ".join(text.split()[:MAX_WORDS])[:MAX_CHARS]
    return text.strip(_EDGE).lower() or "plain"


class CaptionerAttributeExtractor(AttributeExtractor):
    """Asks a transformers captioner / vision-language model two prompts per image: the background and the pose of
    the object, named only by the generic ``descriptor``.

    With ``task="image-to-text"`` the prompts are caption prefixes the model completes (BLIP-style captioners; in
    transformers 5 this runs the ``image-text-to-text`` pipeline, which replaced ``image-to-text``). With
    ``task="image-text-to-text"`` the prompts are questions, sent as a chat when the model's processor has a chat
    template. The pipeline is built on the images' device at the first ``describe``.

    Args:
        model: hub id (e.g. "Salesforce/blip-image-captioning-large") or a local ``save_pretrained`` folder.
        task: "image-to-text" (caption prefixes) or "image-text-to-text" (questions to a vision-language model).
        descriptor: generic word for the object in the prompts ("garment").
        background_prompt: prompt with ``{descriptor}``; default ``CAPTION_PROMPTS`` or ``VLM_PROMPTS`` by task.
        pose_prompt: prompt with ``{descriptor}``; default as for ``background_prompt``.
        max_new_tokens: generated tokens per answer.
        batch_size: images per generation call.
        trust_remote_code: run the model repository's own code (off unless you trust it).
        local_files_only: never download (None: transformers' default, e.g. ``HF_HUB_OFFLINE``).
    """

    def __init__(self, model: str, task: Literal["image-to-text", "image-text-to-text"] = "image-to-text",
                 descriptor: str = "object", background_prompt: str | None = None, pose_prompt: str | None = None,
                 max_new_tokens: int = 20, batch_size: int = 8, trust_remote_code: bool = False,
                 local_files_only: bool | None = None) -> None:
        super().__init__(descriptor)
        if task not in ("image-to-text", "image-text-to-text"):
            raise ValueError(f"task must be 'image-to-text' or 'image-text-to-text', got {task!r}.")
        if not str(model).strip():
            raise ValueError("model must be a hub id or a local model folder.")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}.")
        defaults = CAPTION_PROMPTS if task == "image-to-text" else VLM_PROMPTS
        self.prompts: dict[str, str] = {}
        for key, prompt in (("background", background_prompt), ("pose", pose_prompt)):
            prompt = defaults[key] if prompt is None else prompt
            try:
                self.prompts[key] = prompt.format(descriptor=descriptor)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"The {key} prompt {prompt!r} may only use {{descriptor}} ({err}).") from None
            if not self.prompts[key].strip():
                raise ValueError(f"The {key} prompt is empty.")
        self.model_name, self.task = str(model), task
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.trust_remote_code, self.local_files_only = bool(trust_remote_code), local_files_only
        self._pipe: Any = None

    @property
    def extractor_id(self) -> str:
        return f"captioner:{self.model_name}"

    def prepare(self, class_names: list[str]) -> None:
        """Refuse prompts (or a descriptor) that name a class: the model would be told the label."""
        check_vocabulary([self.descriptor, *self.prompts.values()], class_names, "captioner prompt")

    def _pipeline(self, device: torch.device) -> Any:
        if self._pipe is not None:
            return self._pipe
        import transformers
        from transformers.pipelines import SUPPORTED_TASKS

        path = Path(self.model_name).expanduser()
        if looks_local(self.model_name) and not path.is_dir():
            raise FileNotFoundError(f"Captioner model folder {self.model_name!r} does not exist: point `model` at a "
                                    "folder written by save_pretrained (model and processor), or at a hub id such as "
                                    "'Salesforce/blip-image-captioning-large'.")
        # transformers 5 removed "image-to-text"; "image-text-to-text" is its replacement (same captioners)
        task = self.task if self.task in SUPPORTED_TASKS else "image-text-to-text"
        kwargs = {} if self.local_files_only is None else {"local_files_only": self.local_files_only}
        offline = self.local_files_only
        if offline is None:  # read now: huggingface_hub reads HF_HUB_OFFLINE only when it is imported
            offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                          for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        try:
            source = str(path) if path.is_dir() else self.model_name
            if offline and not path.is_dir():  # resolve in the cache first: transformers' pipeline still asks the hub
                from huggingface_hub import snapshot_download  # for adapters even with local_files_only (5.23)

                source = snapshot_download(self.model_name, local_files_only=True)
            self._pipe = transformers.pipeline(task, model=source, trust_remote_code=self.trust_remote_code,
                                               device=device, **kwargs)
        except OSError as err:
            raise OSError(f"Cannot load the captioner model {self.model_name!r}: {err}\nWithout internet, download it "
                          f"beforehand (`hf download {self.model_name}`, then run with HF_HUB_OFFLINE=1) or save it to "
                          "a local folder with save_pretrained and pass that folder as `model`.") from err
        return self._pipe

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """``[N, 3, H, W]`` (or 1-channel) floats in [0, 1] to RGB uint8 PIL images."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}.")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        return [Image.fromarray(a) for a in arrays.permute(0, 2, 3, 1).cpu().numpy()]

    def _ask(self, pipe: Any, images: list[Image.Image], prompt: str) -> list[str]:
        gen = {"max_new_tokens": self.max_new_tokens}
        if pipe.task == "image-to-text":  # transformers 4.x captioning pipeline: the prefix is `prompt`
            out = pipe(images, prompt=prompt, batch_size=len(images), **gen)
        elif self.task == "image-text-to-text" and getattr(pipe.processor, "chat_template", None):
            chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": prompt}]}]
                     for im in images]
            out = pipe(text=chats, batch_size=len(images), return_full_text=False, **gen)
        else:  # one call, one padded batch: every image gets the same prompt
            out = pipe(images=images, text=[prompt] * len(images), return_full_text=False, **gen)
        out = [o[0] if isinstance(o, list) else o for o in out]
        if len(out) != len(images):
            raise RuntimeError(f"{self.extractor_id} answered {len(out)} of {len(images)} images.")
        return [clean_answer(str(o["generated_text"]), prompt) for o in out]

    def describe(self, images: torch.Tensor) -> list[dict[str, str]]:
        pipe = self._pipeline(images.device)
        pils = self.to_pil(images)
        out: list[dict[str, str]] = []
        for start in range(0, len(pils), self.batch_size):
            chunk = pils[start:start + self.batch_size]
            answers = {key: self._ask(pipe, chunk, prompt) for key, prompt in self.prompts.items()}
            out += [{key: answers[key][i] for key in self.prompts} for i in range(len(chunk))]
        return out
