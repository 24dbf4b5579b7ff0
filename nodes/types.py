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


def check_choices(**choices: tuple[object, Sequence[str]]) -> bool | str:
    """``validate_inputs`` of a node's dropdowns: ``name=(value, options)`` -> True, or what is wrong.

    ComfyUI 0.3.75 checks the options of classic combos only, not of V3 ones: without this, an API prompt or an old
    workflow with a value this version lacks would be queued and fail only when it runs. None means the value
    arrives through a link (checked when it runs)."""
    bad = [
        f"{name} {value!r} is not one of {list(options)}"
        for name, (value, options) in choices.items()
        if value is not None and value not in options
    ]
    return "; ".join(bad) if bad else True
