"""ComfyUI V3 nodes of the MM-Interleaved pack (thin wrappers over ``comfy_mm_interleaved``).

Imported only relatively, from the pack's root ``__init__.py``; never importable as a bare ``nodes``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class MMInterleavedExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
