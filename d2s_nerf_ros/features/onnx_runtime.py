"""ONNX Runtime for a feature network's dense part: backend choice, export cache, sessions.

The ONNX file is exported here, on first use, from the weights that are installed with the
package; nothing is downloaded. It lives in a local cache (``$D2S_NERF_ROS_CACHE``, else
``$XDG_CACHE_HOME/d2s_nerf_ros``, else ``~/.cache/d2s_nerf_ros``) under a key that covers
everything the exported graph depends on: the weights' hash, the model, the input size, the
torch and opset versions and the restructure's own version. Files are written atomically
(temporary file, then rename) with a sidecar holding their SHA-256, so a truncated or
corrupted entry is detected on load and exported again.

Onboard module: onnxruntime is optional; without it ``auto`` falls back to torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from d2s_nerf_ros.map_bundle import sha256_file

BACKEND_CHOICES = ("auto", "torch", "onnxruntime")
# ONNX DeformConv exists from opset 19; onnxruntime runs it on the CPU from version 1.25.
ONNX_OPSET = 19
MIN_ONNXRUNTIME = (1, 25)

log = logging.getLogger(__name__)


def onnxruntime_problem() -> str | None:
    """Why onnxruntime cannot run our graphs here, or None when it can."""
    try:
        import onnxruntime
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    try:
        version = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    except ValueError:
        return None  # a development build: let the session tell
    if version < MIN_ONNXRUNTIME:
        return (f"onnxruntime {onnxruntime.__version__} cannot run DeformConv on the CPU "
                f"(needs >= {'.'.join(map(str, MIN_ONNXRUNTIME))})")
    return None


def resolve_backend(requested: str, device: torch.device, supports_onnxruntime: bool, what: str) -> str:
    """``torch`` or ``onnxruntime`` for ``requested`` (auto | torch | onnxruntime) on ``device``.

    ``auto`` takes onnxruntime on the CPU when the network has an ONNX path and onnxruntime
    is usable (else torch, with a log line saying why), and torch on CUDA. An explicit
    ``onnxruntime`` that cannot be honoured is an error, never a silent fallback.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"extractor backend must be one of {', '.join(BACKEND_CHOICES)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "onnxruntime":
        if not supports_onnxruntime:
            raise ValueError(f"extractor {what!r} has no onnxruntime backend; use extractor_backend auto or torch")
        if device.type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on the CPU, but device {device.type!r} was chosen; "
                             "use device cpu, or extractor_backend torch on CUDA")
        problem = onnxruntime_problem()
        if problem:
            raise RuntimeError(f"extractor backend onnxruntime was requested but {problem}")
        return "onnxruntime"
    if not supports_onnxruntime or device.type != "cpu":
        return "torch"
    problem = onnxruntime_problem()
    if problem:
        log.warning("extractor backend auto: %s; using torch", problem)
        return "torch"
    return "onnxruntime"


def cache_dir() -> Path:
    explicit = os.environ.get("D2S_NERF_ROS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "d2s_nerf_ros"


def cache_key(parts: dict[str, Any]) -> str:
    """A short hash of everything an exported graph depends on."""
    described = dict(parts, torch=torch.__version__, opset=ONNX_OPSET)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache is shared like any other
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached_onnx_model(name: str, key: str, export: Callable[[io.BytesIO], None]) -> Path:
    """The cached ONNX file ``name``-``key``.onnx, exported with ``export`` when absent or corrupt."""
    path = cache_dir() / f"{name}-{key}.onnx"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file():
        expected = sidecar.read_text().strip()
        if sha256_file(path) == expected:
            return path
        log.warning("cached ONNX model %s does not match its checksum (corrupted?); exporting it again", path)
    buffer = io.BytesIO()
    export(buffer)
    data = buffer.getvalue()
    # The model first, then its checksum: a crash between the two leaves no sidecar, which
    # reads as "not cached" next time.
    _write_atomically(path, data)
    _write_atomically(sidecar, (hashlib.sha256(data).hexdigest() + "\n").encode())
    log.info("exported %s to %s", name, path)
    return path


def make_session(path: Path, num_threads: int = 0):
    """A CPU inference session; ``num_threads`` > 0 fixes ORT's intra- and inter-op pools."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads > 0:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = int(num_threads)
    # ORT's pool threads otherwise spin for a while after each run, taking the cores from the
    # torch code that follows (detection and description). In-process at 640x480 on 2 idle
    # cores description took 80 ms with spinning and 47 ms without (2 pairs of runs); through
    # the node the end-to-end p50 moved within its noise (312 -> 314 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def load_session(name: str, key: str, export: Callable[[io.BytesIO], None], num_threads: int = 0):
    """Session on the cached model; an entry that ORT cannot load is exported again once."""
    path = cached_onnx_model(name, key, export)
    try:
        return make_session(path, num_threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        log.warning("onnxruntime could not load cached %s (%s); exporting it again", path, exc)
        path.with_suffix(".sha256").unlink(missing_ok=True)
        return make_session(cached_onnx_model(name, key, export), num_threads)


# -- torchvision deform_conv2d -> ONNX DeformConv --------------------------------------------

def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                            dil_h, dil_w, n_weight_grps, n_offset_grps, use_mask):
    from torch.onnx import symbolic_helper

    def const(value, name):
        return symbolic_helper._get_const(value, "i", name)

    stride = [const(stride_h, "stride_h"), const(stride_w, "stride_w")]
    pad = [const(pad_h, "pad_h"), const(pad_w, "pad_w")]
    dilation = [const(dil_h, "dil_h"), const(dil_w, "dil_w")]
    inputs = [input, weight, offset, bias]
    if symbolic_helper._maybe_get_const(use_mask, "b"):
        inputs.append(mask)
    return g.op("DeformConv", *inputs, dilations_i=dilation, group_i=const(n_weight_grps, "groups"),
                offset_group_i=const(n_offset_grps, "offset_groups"), pads_i=pad + pad, strides_i=stride)


_registered = False


def register_deform_conv_symbolic() -> None:
    """torchvision ships no ONNX rule for deform_conv2d; ONNX has DeformConv since opset 19."""
    global _registered
    if not _registered:
        import torchvision  # noqa: F401 - registers the torchvision::deform_conv2d operator

        torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_symbolic, ONNX_OPSET)
        _registered = True


def export_onnx(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str],
                output_names: list[str], out: io.BytesIO, dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Export with torch's TorchScript-based exporter: the one that takes custom symbolics.

    ``dynamic_axes`` default: the batch (first) axis of every input and output.
    """
    import warnings

    if dynamic_axes is None:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    register_deform_conv_symbolic()
    with warnings.catch_warnings(), _without_onnxscript_functions():
        # Shape arithmetic traced into constants: intended, the graph is exported per input size.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), examples, out, input_names=input_names, output_names=output_names,
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True, dynamic_axes=dynamic_axes)


@contextlib.contextmanager
def _without_onnxscript_functions():
    """Let the TorchScript exporter run without the ``onnx`` package.

    Its last step parses the finished model with ``onnx`` only to insert onnxscript custom
    functions, and fails when ``onnx`` is absent even if there are none. We register no
    onnxscript functions (DeformConv is a standard ONNX operator), so the serialised model
    is final already; the step is skipped only while ``onnx`` cannot be imported.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    original = onnx_proto_utils._add_onnxscript_fn

    def unchanged(model_bytes: bytes, custom_opsets) -> bytes:
        if custom_opsets:
            raise RuntimeError("custom opsets need the onnx package, which is not installed")
        return model_bytes

    onnx_proto_utils._add_onnxscript_fn = unchanged
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = original
