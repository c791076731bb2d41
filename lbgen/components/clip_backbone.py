"""CLIP's image tower as a classifier backbone (open_clip), with the class-name text embeddings of CLIP's zero-shot
head and LoRA on either tower (peft), as DataDream and BOB fine-tune their CLIP classifiers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from lbgen.components.clip import ClipScorer

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# the linear layers of a transformer block: attention (peft's MultiheadAttention wrapper adapts its fused q/k/v
# in_proj and its out_proj) and the two MLP layers; module names relative to the open_clip model
_BLOCK_LAYERS = r"transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"
IMAGE_LORA_TARGETS = rf"visual\.{_BLOCK_LAYERS}"
TEXT_LORA_TARGETS = rf"(text\.)?{_BLOCK_LAYERS}"  # CLIP's own text tower, or a CustomTextCLIP's `text`
MAX_LOGIT_SCALE = 100.0  # open_clip clamps the learnt temperature here in training


def check_templates(templates: list[str] | tuple[str, ...]) -> list[str]:
    """``templates`` as a list, each with exactly one ``{}`` for the class name."""
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"Text templates need exactly one '{{}}' for the class name each, e.g. 'a photo of a {{}}.'; "
                         f"fix {bad or templates}.")
    return templates


class ClipBackbone(nn.Module):
    """The image tower of an open_clip model as a classifier backbone; images in [0, 1] in, embeddings out.

    Loads exactly like ``ClipScorer`` (which it holds, with its resize / centre-crop / normalisation by the model's
    own mean and std): an architecture name and pretrained tag (``ViT-B-16-quickgelu`` + ``openai``: OpenAI's weights
    need QuickGELU; ``ViT-B-16`` + ``laion2b_s34b_b88k``), a checkpoint file as ``pretrained``, a saved folder
    (``local-dir:runs/embedded/clip``, what ``ClipSystem`` writes) or a ``model_config`` dict (tiny test models).
    Only the image tower trains by default; the text tower serves ``class_text_embeddings`` (the zero-shot head) and
    trains only with ``add_lora(text=True)``.

    Args:
        model_name: open_clip architecture or ``local-dir:FOLDER``.
        pretrained: open_clip pretrained tag or checkpoint file; None: random (or the ``local-dir`` folder's weights).
        model_config: an architecture as a dict instead of a name.
        normalize: L2-normalise the embeddings (needed for a text-initialised head, where logits are cosines).
        gradient_checkpointing: recompute the towers' blocks in backward (open_clip's ``set_grad_checkpointing``).
    """

    def __init__(self, model_name: str = "ViT-B-16-quickgelu", pretrained: str | None = "openai",
                 model_config: dict[str, Any] | None = None, normalize: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.clip = ClipScorer(model_name=model_name, pretrained=pretrained, model_config=model_config, freeze=False)
        self.model_name, self.normalize = self.clip.name, normalize
        model = self.clip.model
        model.requires_grad_(False)
        model.visual.requires_grad_(True)  # the text tower never reaches the loss unless it has LoRA: keep it frozen
        output_dim = getattr(model.visual, "output_dim", None)
        if output_dim is None:
            with torch.no_grad():
                output_dim = model.encode_image(torch.zeros(1, 3, self.clip.image_size, self.clip.image_size)).shape[-1]
        self.num_features: int = int(output_dim)
        if gradient_checkpointing:
            model.set_grad_checkpointing(True)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learnt temperature ``exp(logit_scale)`` (clamped at 100 as open_clip trains it; 100 without one)."""
        scale = getattr(self.clip.model, "logit_scale", None)
        if scale is None:
            return torch.tensor(MAX_LOGIT_SCALE, device=self.clip.mean.device)
        return scale.detach().exp().float().clamp(max=MAX_LOGIT_SCALE)

    def no_weight_decay(self) -> set[str]:
        """Parameters (names in this module) that timm-style training keeps from weight decay: open_clip's own list
        (the position embeddings, the class token), which ``lbgen.models.optim.param_groups`` reads."""
        own = getattr(self.clip.model, "no_weight_decay", None)
        return {f"clip.model.{name}" for name in own()} if callable(own) else set()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, num_features]`` of images in [0, 1] (L2-normalised with ``normalize``)."""
        return self.clip.model.encode_image(self.clip.preprocess(images), normalize=self.normalize)

    # --- the text side: CLIP's zero-shot classifier -----------------------------------------------------------
    def tokenize_classes(self, class_names: list[str], templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES
                         ) -> torch.Tensor:
        """Tokens ``[classes * templates, L]`` of every prompt, class-major (row ``c * T + t``: template t of c)."""
        templates = check_templates(templates)
        return self.clip.tokenizer([t.format(name) for name in class_names for t in templates])

    def encode_class_tokens(self, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Class text embeddings ``[classes, D]`` from ``tokenize_classes``' tokens: the prompts' normalised
        embeddings averaged over the templates and normalised again, as open_clip's ``build_zero_shot_classifier``
        (which runs under ``no_grad``; this one is differentiable, for a text tower trained with LoRA)."""
        embeddings = self.clip.model.encode_text(tokens.to(self.clip.mean.device), normalize=True)
        return F.normalize(embeddings.view(num_classes, -1, embeddings.shape[-1]).mean(1), dim=-1)

    def class_text_embeddings(self, class_names: list[str], templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES,
                              classes_per_batch: int = 64) -> torch.Tensor:
        """L2-normalised text embedding of each class ``[classes, D]``, averaged over ``templates``; encoded
        ``classes_per_batch`` classes at a time (1000 ImageNet classes x 80 templates at once would not fit)."""
        chunks = [class_names[i:i + classes_per_batch] for i in range(0, len(class_names), classes_per_batch)]
        return torch.cat([self.encode_class_tokens(self.tokenize_classes(chunk, templates), len(chunk))
                          for chunk in chunks])

    # --- fine-tuning ------------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None, dropout: float = 0.0, image: bool = True,
                 text: bool = False, init: bool | str = True) -> int:
        """Freeze the model and add LoRA (peft) to the attention and MLP layers of the image tower (and / or the
        text tower); returns the number of trainable (LoRA) parameters.

        Args:
            rank: LoRA rank.
            alpha: LoRA scaling numerator; default ``rank``.
            dropout: dropout on the LoRA input.
            image: adapt the image tower.
            text: adapt the text tower (then class text embeddings depend on trainable weights).
            init: peft's ``init_lora_weights`` (``False``: random non-zero B, for tests).
        """
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}.")
        targets = [t for t, on in ((IMAGE_LORA_TARGETS, image), (TEXT_LORA_TARGETS, text)) if on]
        if not targets:
            raise ValueError("add_lora needs image=True or text=True (a tower to adapt).")
        model = self.clip.model
        model.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights=init,
                            target_modules="|".join(f"(?:{t})" for t in targets))  # a string: a full-match regex
        try:
            inject_adapter_in_model(config, model)
        except ValueError as err:  # peft: no module matched
            raise ValueError(f"CLIP {self.model_name!r} has no transformer blocks that LoRA can adapt ({err}); its "
                             "towers are not open_clip ViT / text transformers (e.g. a ResNet or timm tower): use "
                             "finetune 'full' or 'linear'.") from err
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    @property
    def text_trainable(self) -> bool:
        """Whether the text tower has trainable weights (LoRA): class text embeddings then change as it trains."""
        return any(p.requires_grad for name, p in self.clip.model.named_parameters() if not name.startswith("visual."))
