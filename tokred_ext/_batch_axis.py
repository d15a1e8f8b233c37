"""The dynamic batch axis that tokred's exporters (ONNX, AOTInductor) give a model's inputs."""
import inspect
from typing import Any, Sequence

import torch

__all__ = ["dynamic_batch_shapes"]


def dynamic_batch_shapes(model: torch.nn.Module, args: Sequence[Any]):
    """``dynamic_shapes`` for ``torch.export``: one symbolic first axis, shared by every input
    (the batch). Every k, r and token count stays a constant, as in the eager model."""
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in args)
    params = list(inspect.signature(model.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*args)
        return {params[0].name: shapes}
    return shapes
