"""AOTInductor packages of models that call tokred ops: build one, load one.

``torch._inductor.aoti_compile_and_package`` compiles a model into a ``.pt2`` package: a shared
library of generated kernels. The tokred ops are not compiled into it: the library calls each one
by name through the dispatcher (torch's proxy executor), and the loader looks every such name up
when it opens the package. So the process that loads a package must have tokred's kernels loaded
first: in Python by importing ``tokred_ext``, in C++ by linking ``libtokred``
(``find_package(tokred)``). Otherwise loading fails with "Could not find schema for
tokred::<op>".

    path = tokred_ext.compile_aoti(model, (images,), "model.pt2")   # dynamic batch axis
    runner = tokred_ext.load_aoti("model.pt2")                      # in any later process
    logits = runner(images)

``load_aoti`` also checks, before torch opens the package, that the file exists and is a
package, that it was built for a device this process can run, and that every tokred op it calls
is one this tokred_ext defines, and says which check failed. docs/export.md has the C++ side.
"""
import json
import os
import re
import zipfile
from typing import Any, Dict, Optional, Sequence, Set

import torch

from ._batch_axis import dynamic_batch_shapes
from ._build_info import build_info

__all__ = ["MODEL_NAME", "compile_aoti", "load_aoti", "package_contents"]

# What aoti_compile_and_package writes for a model: <archive>/data/aotinductor/<model>/<files>.
_MODEL_FILE = re.compile(r"(?:^|/)data/aotinductor/([^/]+)/([^/]+)$")
# aoti_compile_and_package names its one model "model"; aoti_load_package loads that name.
MODEL_NAME = "model"


def compile_aoti(model: torch.nn.Module, args: Sequence[torch.Tensor], path: str,
                 dynamic_batch: bool = True, inductor_configs: Optional[Dict[str, Any]] = None,
                 **export_kwargs) -> str:
    """``torch.export.export`` then ``aoti_compile_and_package`` into ``path`` (a ``.pt2``
    file), with a dynamic first axis on every input when ``dynamic_batch`` (the example batch
    must then be 2 or more). The package is for the device of ``args``. Returns the path. Load
    it with :func:`load_aoti`."""
    from torch._inductor import aoti_compile_and_package

    path = os.fspath(path)
    if not path.endswith(".pt2"):  # torch asserts this only after the export
        raise ValueError(f"compile_aoti: the package path must end in .pt2 (got {path!r})")
    if dynamic_batch and "dynamic_shapes" not in export_kwargs:
        if any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 for a in args):
            # torch.export specializes a size of 1 and then refuses the dynamic axis.
            raise ValueError("compile_aoti: the example batch must be 2 or more for a dynamic "
                             "batch axis (the package then runs any batch size); or pass "
                             "dynamic_batch=False for a package of batch 1 only")
        export_kwargs["dynamic_shapes"] = dynamic_batch_shapes(model, args)
    program = torch.export.export(model, tuple(args), **export_kwargs)
    return aoti_compile_and_package(program, package_path=path,
                                    inductor_configs=inductor_configs)


def package_contents(path: str) -> Dict[str, Dict[str, Any]]:
    """The models of a ``.pt2`` package: ``{name: {"device": "cpu" | "cuda" | None, "ops":
    set of "tokred::<op>" names its kernels call}}``, read from the archive without loading
    it. Raises FileNotFoundError or ValueError (not a package)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AOTInductor package {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not an AOTInductor package (a .pt2 zip archive written by "
                         "tokred_ext.compile_aoti or torch._inductor.aoti_compile_and_package)")
    models: Dict[str, Dict[str, Any]] = {}
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            found = _MODEL_FILE.search(entry)
            if not found:
                continue
            model = models.setdefault(found.group(1), {"device": None, "ops": set()})
            if found.group(2).endswith(".json"):
                _read_json(archive.read(entry), model)
    if not models:
        raise ValueError(f"{path!r} holds no AOTInductor model (no data/aotinductor/<model>/ "
                         "folder): it is not a package written by aoti_compile_and_package")
    return models


def _read_json(data: bytes, model: Dict[str, Any]) -> None:
    """Takes the device from a model's metadata file and the custom ops from its proxy-executor
    file (the nodes the kernels call through the dispatcher)."""
    try:
        content = json.loads(data)
    except ValueError:
        return
    if not isinstance(content, dict):
        return
    if "AOTI_DEVICE_KEY" in content:
        model["device"] = content["AOTI_DEVICE_KEY"]
    for node in content.get("nodes", ()):
        target = node.get("node", {}).get("target", "") if isinstance(node, dict) else ""
        if isinstance(target, str) and target.startswith("tokred::"):
            model["ops"].add(target)


def _device_fault(device: Optional[str]) -> Optional[str]:
    """Why a package built for ``device`` cannot run in this process, or None."""
    if device in (None, "cpu"):
        return None
    if device == "cuda":
        if not torch.cuda.is_available():
            return ("it was built for CUDA and this process has no CUDA device "
                    f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if not build_info()["cuda_kernels"]:
            return ("it was built for CUDA and this tokred_ext has no CUDA kernels "
                    "(tokred_ext.build_info()['cuda_kernels'] is False)")
        return None
    return f"it was built for {device!r}; tokred has CPU and CUDA kernels only"


def _missing_ops(ops: Set[str]) -> Set[str]:
    registered = set(build_info()["ops"])
    return {name for name in ops if name not in registered}


def load_aoti(path: str, run_single_threaded: bool = False, device_index: int = -1):
    """Loads a ``.pt2`` package written by :func:`compile_aoti` (or by
    ``torch._inductor.aoti_compile_and_package``) with the tokred ops registered; returns the
    callable ``torch._inductor.aoti_load_package`` returns. Raises FileNotFoundError for a
    missing file, and ValueError when the file is not a package, was built for a device this
    process cannot run (rebuild it on this device), or calls a tokred op this tokred_ext does not
    define (built by another version)."""
    from torch._inductor import aoti_load_package

    models = package_contents(path)
    if MODEL_NAME not in models:
        raise ValueError(f"{os.fspath(path)!r} has no model named {MODEL_NAME!r} (it holds "
                         f"{', '.join(sorted(models))})")
    model = models[MODEL_NAME]
    fault = _device_fault(model["device"])
    if fault:
        raise ValueError(f"cannot load AOTInductor package {os.fspath(path)!r}: {fault}. "
                         "Rebuild it with tokred_ext.compile_aoti on inputs of a device "
                         "this process has.")
    missing = _missing_ops(model["ops"])
    if missing:
        raise ValueError(f"cannot load AOTInductor package {os.fspath(path)!r}: it calls "
                         f"{', '.join(sorted(missing))}, which this tokred_ext does not define; "
                         "it was built with another tokred version. Rebuild it with this one.")
    return aoti_load_package(os.fspath(path), run_single_threaded=run_single_threaded,
                             device_index=device_index)
