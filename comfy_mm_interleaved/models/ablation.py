"""MMFS ablation: switch the multi-modal feature synchronizer off on both sides of a model.

Two kinds of module honour an ``mmfs_enabled`` attribute in their forward (it is not a weight, so state dicts
and checkpoints are unchanged):

- :class:`~.llm.GatedMMFSCrossAttention` (every MMFS layer of the LLM): off, its contribution is exactly zero,
  as if ``tanh(gate) = 0``;
- :class:`~.unet_mmfs.MMFSNet` (the UNet side): off, it adds no residual to the skip tensors and the mid-block
  output, as if the UNet had no MMFSNet.

    with mmfs_ablation(model):      # every switch off, restored (to what it was) on exit
        ...

Anything that caches LLM states computed under one setting must not reuse them under the other (the
``InterleavedEngine`` keys its context cache by :func:`mmfs_state`). Projected MMFS values do not depend on the
switch (they are a function of the image features only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .llm import GatedMMFSCrossAttention
from .unet_mmfs import MMFSNet

SWITCHED_MODULES = (GatedMMFSCrossAttention, MMFSNet)


def mmfs_switches(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` with an MMFS switch (LLM MMFS blocks and the UNet's MMFSNet), in module order."""
    return [module for module in model.modules() if isinstance(module, SWITCHED_MODULES)]


def mmfs_state(switches: list[nn.Module]) -> tuple[bool, ...]:
    """The ``mmfs_enabled`` flag of each switch (a hashable key for caches)."""
    return tuple(bool(module.mmfs_enabled) for module in switches)


@contextmanager
def mmfs_ablation(model: nn.Module) -> Iterator[None]:
    """Within the block every MMFS of ``model`` is off; each switch gets its previous value back on exit, also
    when the block raises."""
    switches = mmfs_switches(model)
    if not switches:
        raise ValueError("the model has no MMFS (no LLM MMFS layer and no UNet MMFSNet): nothing to ablate")
    previous = mmfs_state(switches)
    try:
        for module in switches:
            module.mmfs_enabled = False
        yield
    finally:
        for module, state in zip(switches, previous):
            module.mmfs_enabled = state
