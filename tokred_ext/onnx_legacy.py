"""The legacy TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``) refuses tokred
ops in one clear sentence.

tokred's ONNX translations (``tokred_ext.onnx``) are written for the dynamo exporter. Without this
module the legacy exporter stops at the first tokred op with "unrecognized namespace tokred",
which reads as a missing registration. Each op gets a symbolic that raises instead, naming the op
and the exporter that works. Registered when tokred_ext is imported: users reach the legacy
exporter through ``torch.onnx.export`` without touching ``tokred_ext.onnx``.
"""
import torch

MESSAGE = ("{op} cannot be exported by the legacy TorchScript ONNX exporter (dynamo=False). "
           "Export with torch.onnx.export(..., dynamo=True, custom_translation_table="
           "tokred_ext.onnx.TRANSLATIONS), or simply tokred_ext.onnx.export(model, args, path) "
           "(docs/export.md).")


def _refusal(op_name: str):
    def symbolic(g, *args, **kwargs):
        raise torch.onnx.errors.OnnxExporterError(MESSAGE.format(op=op_name))
    return symbolic


def register() -> None:
    """Install the refusing symbolic for every ``tokred::`` op (no-op on a torch whose legacy
    exporter is gone)."""
    register_symbolic = getattr(torch.onnx, "register_custom_op_symbolic", None)
    if register_symbolic is None:  # pragma: no cover - a future torch without the legacy exporter
        return
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if name.startswith("tokred::"):
            register_symbolic(name, _refusal(name), 1)
