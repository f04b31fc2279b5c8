"""The int8 backbone: DINOv3 ViT linear layers with int8 weights and int8 activations, on a CPU.

Built with OpenVINO, chosen by measurement against torchao and ONNX Runtime on this CPU (figures
in BENCHMARKS.md, "Reduced precision"): the model is converted once to an OpenVINO graph
(``openvino.convert_model``, dynamic batch and window size), NNCF compresses every linear
layer's weights to int8 per output channel (symmetric), and OpenVINO's CPU plugin quantises the
activations entering those layers to int8 per token at run time (its dynamic quantisation with
a group as wide as the token) and runs the products on VNNI / AMX int8 instructions. Everything
else (attention, LayerNorm, GELU, RoPE) stays in floating point: bf16 where the CPU has native
bf16, else fp32. The final LayerNorm of returned layers runs in fp32 in torch, as at fp32.

The converted, compressed graph is cached on disk under a key made of the weights' content,
the chosen layers and the versions of OpenVINO and NNCF, so only the first run of a backbone
pays for conversion; within a process the compiled model is built once and shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from geodino.errors import ModelError

_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()
FORMAT = 1  # bump when the exported graph changes meaning
# OpenVINO reads "quantise activations in groups of this many input channels"; the largest
# value means one group per token (the whole row), i.e. per-token dynamic quantisation.
PER_TOKEN = np.iinfo(np.uint32).max


def cache_root() -> Path:
    """Where exported graphs live: $GEODINO_CACHE_DIR, else $XDG_CACHE_HOME/geodino, else ~/.cache/geodino."""
    if os.environ.get("GEODINO_CACHE_DIR"):
        return Path(os.environ["GEODINO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geodino"


def _libraries() -> tuple:
    try:
        import nncf
        import openvino
    except ImportError as e:
        raise ModelError(f"precision int8 needs OpenVINO and NNCF ({e.name} is not installed): "
                         "pip install openvino nncf, or use --precision fp32 / bf16") from None
    return openvino, nncf


def weights_key(model: torch.nn.Module, layers: tuple[int, ...]) -> str:
    """A content hash of the model (config and every tensor's bytes), the layers and the library versions."""
    openvino, nncf = _libraries()
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "openvino": openvino.get_version(), "nncf": nncf.__version__,
                         "layers": list(layers), "config": model.config.to_dict()}, sort_keys=True,
                        default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class _Outputs(torch.nn.Module):
    """The transformers model reduced to what the backbone reads: last state + chosen layers."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return (out.last_hidden_state, *(out.hidden_states[i + 1] for i in self.layers))


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs a table and draws a progress bar on stdout; stdout is geodino's (JSON, results).

    The table is dropped (NNCF's logger level, restored after); the bar goes to stderr with the
    rest of geodino's progress. This runs once per backbone, at load, before any worker threads.
    """
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_tracing():
    """Tracing a transformers model warns about things that do not apply to a frozen ViT
    (Python booleans in SDPA's causal check, deprecated training helpers, the loss type):
    silence them while converting, and restore transformers' verbosity afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def export(model: torch.nn.Module, layers: tuple[int, ...], target: Path) -> Path:
    """Convert, compress and save the int8 graph to ``target/model.xml`` (atomically)."""
    openvino, nncf = _libraries()
    print(f"geodino: converting the backbone to int8 once (cached in {target.parent})", file=sys.stderr, flush=True)
    example = torch.zeros(1, 3, 64, 64)
    wrapped = _Outputs(model, layers).eval()
    with torch.no_grad(), _quiet_tracing():
        graph = openvino.convert_model(wrapped, example_input=example,
                                       input=[openvino.PartialShape([-1, 3, -1, -1])])
    with _quiet_nncf():
        graph = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_SYM)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        openvino.save_model(graph, tmp / "model.xml", compress_to_fp16=False)
        (tmp / "geodino_int8.json").write_text(json.dumps({
            "format": FORMAT, "layers": list(layers), "openvino": openvino.get_version(), "nncf": nncf.__version__,
            "weights": "int8 symmetric per output channel (NNCF)", "activations": "int8 per token, at run time"}))
        try:
            os.replace(tmp, target)  # another process may have won the race: keep its copy
        except OSError:
            if not (target / "model.xml").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "model.xml"


def compile_int8(model: torch.nn.Module, layers: tuple[int, ...], threads: int):
    """The compiled OpenVINO model for this backbone (cached in the process and on disk)."""
    from geodino.precision import cpu_supports_bf16

    openvino, _ = _libraries()
    key = weights_key(model, layers)
    with _COMPILED_LOCK:
        if (key, threads) in _COMPILED:
            return _COMPILED[(key, threads)]
        folder = cache_root() / "int8" / key
        xml = folder / "model.xml"
        if not xml.exists():
            xml = export(model, layers, folder)
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if cpu_supports_bf16() else "f32",
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": int(PER_TOKEN), "INFERENCE_NUM_THREADS": int(threads),
                  "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        compiled = core.compile_model(core.read_model(xml), "CPU", config)
        _COMPILED[(key, threads)] = compiled
        return compiled


class Int8ViT:
    """Stands in for the transformers model inside a Backbone: same call, same output fields.

    ``hidden_states`` holds tensors only at the chosen layers (index ``i + 1`` for block ``i``),
    which is all the backbone reads; ``norm`` is the fp32 final LayerNorm of the original model.
    """

    training = False

    def __init__(self, compiled, model: torch.nn.Module, layers: tuple[int, ...]) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: calls from several threads take turns
        self.config = model.config
        self.norm = model.norm
        self.layers = layers
        self.depth = model.config.num_hidden_layers

    def eval(self) -> Int8ViT:
        return self

    def __call__(self, pixel_values: torch.Tensor, output_hidden_states: bool = True) -> SimpleNamespace:
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        with self.lock:
            result = self.request.infer({0: x}, share_inputs=False, share_outputs=False)
            outs = [torch.from_numpy(np.asarray(result[o])) for o in self.compiled.outputs]
        hidden: list[torch.Tensor | None] = [None] * (self.depth + 1)
        for i, tensor in zip(self.layers, outs[1:]):
            hidden[i + 1] = tensor
        return SimpleNamespace(last_hidden_state=outs[0], hidden_states=hidden)


def quantise_backbone(backbone) -> None:
    """Swap a loaded fp32 ViT backbone's model for its int8 graph, in place."""
    if backbone.info.arch != "vit":
        raise ModelError("precision int8 is for DINOv3 ViT backbones; run ConvNeXt at fp32 or bf16")
    if backbone.device.type != "cpu":
        raise ModelError("precision int8 runs on the CPU only; use --device cpu, or bf16 on a GPU")
    openvino, nncf = _libraries()
    model = backbone.model
    compiled = compile_int8(model, backbone.layers, torch.get_num_threads())
    backbone.model = Int8ViT(compiled, model, backbone.layers)
    inner = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16 else "fp32"
    backbone.precision_detail = (f"int8 linear layers (weights per channel, activations per token), {inner} "
                                 f"elsewhere; OpenVINO {openvino.get_version().split('-')[0]}, NNCF {nncf.__version__}")


__all__ = ["Int8ViT", "cache_root", "compile_int8", "export", "quantise_backbone", "weights_key"]
