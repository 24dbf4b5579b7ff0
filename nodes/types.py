"""The pack's socket types and its node category.

Custom sockets are plain type strings: any Python object travels through them. What travels:

* ``MMI_MODEL``: a :class:`~.loader.LoadedModel` (engine + ComfyUI model-management handle);
* ``MMI_CONTEXT``: a :class:`~.context.Context` (immutable: every append returns a new one);
* ``MMI_IMAGE_FEATURES``: an :class:`~.encode.EncodedImages` (images encoded once by one model).
"""

from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "MM-Interleaved"

MMIModel = io.Custom("MMI_MODEL")
MMIContext = io.Custom("MMI_CONTEXT")
MMIImageFeatures = io.Custom("MMI_IMAGE_FEATURES")
