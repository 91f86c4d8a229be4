"""MONAI networks by name (imports torch: use it in workers and thread pools)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def build(name: str, arguments: Mapping[str, Any]) -> torch.nn.Module:
    from monai.networks import nets

    network = getattr(nets, name)
    model = network(**arguments)
    assert isinstance(model, torch.nn.Module)
    return model


def output_channels(
    model: torch.nn.Module, arguments: Mapping[str, Any], image_size: Sequence[int]
) -> int:
    """The channels of the network's output, found by running one small input through it."""
    channels = int(arguments.get("in_channels", arguments.get("n_input_channels", 1)))
    model.eval()
    with torch.no_grad():
        # Small enough for any node: the channel count does not depend on the size.
        out = model(torch.zeros(1, channels, *(min(size, 128) for size in image_size)))
    return int(out.shape[1])


def output_shape(
    model: torch.nn.Module, arguments: Mapping[str, Any], image_size: Sequence[int]
) -> tuple[int, ...]:
    """The shape of the network's output for one image of `image_size`, batch axis left out
    (a segmenter's output must lie on its input's grid, so the real size is used)."""
    channels = int(arguments.get("in_channels", 1))
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, channels, *image_size))
    return tuple(int(size) for size in out.shape[1:])
