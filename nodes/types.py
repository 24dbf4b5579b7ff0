"""The pack's socket types and its node category.

Custom sockets are plain type strings: any Python object travels through them. What travels:

* ``MMI_MODEL``: a :class:`~.loader.LoadedModel` (engine + ComfyUI model-management handle);
* ``MMI_CONTEXT``: a :class:`~.context.Context` (immutable: every append returns a new one);
* ``MMI_IMAGE_FEATURES``: an :class:`~.encode.EncodedImages` (images encoded once by one model).
"""

from __future__ import annotations

from collections.abc import Sequence

from comfy_api.latest import io

CATEGORY = "MM-Interleaved"

MMIModel = io.Custom("MMI_MODEL")
MMIContext = io.Custom("MMI_CONTEXT")
MMIImageFeatures = io.Custom("MMI_IMAGE_FEATURES")


def check_choice(value: object, options: Sequence[str]) -> bool | str:
    """``validate_inputs`` of one dropdown: True, or what is wrong (ComfyUI puts the input's name in front).

    ComfyUI 0.3.75 checks the options of classic combos only, not of V3 ones: without this, an API prompt or an old
    workflow with a value this version lacks would be queued and fail only when it runs. None means the value
    arrives through a link (checked when it runs). ComfyUI files the message under every input a validation
    function names, so each one names a single input."""
    if value is None or value in options:
        return True
    return f"{value!r} is not one of {list(options)}"
