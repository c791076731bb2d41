"""Filling prompt and caption templates: one rule for every prompt lbgen writes (generation, fine-tuning, CLIP)."""

from __future__ import annotations

FIELDS = ("class", "superclass", "descriptor", "background", "pose")


def fill_caption(template: str, class_name: str, background: str | None = None, pose: str | None = None,
                 descriptor: str = "", superclass: str | None = None) -> str:
    """Fill a caption template: ``{class}``, ``{superclass}``, ``{descriptor}``, ``{background}``, ``{pose}``.

    E.g. ``fill_caption("a photo of a {class}", "sandal")``. A template that asks for a background or pose that is
    not given, or names an unknown field, is refused with the fields it may use.
    """
    fields = {"class": class_name, "superclass": superclass or "", "descriptor": descriptor}
    for key, value in (("background", background), ("pose", pose)):
        if "{" + key + "}" in template and value is None:
            raise ValueError(f"Caption template {template!r} needs a {key} but none was given (attribute bank?).")
        fields[key] = value or ""
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as err:
        raise ValueError(f"Caption template {template!r} has an unknown field {err}; use "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}.") from None
