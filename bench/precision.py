"""Windows per second at fp32, bf16 and int8: the backbone alone and `geodino run` end to end.

    python bench/precision.py [--archs vits16,vitb16] [--windows 4] [--size 1024]
    python bench/precision.py --libraries [--archs vits16]     # the int8 candidates compared

Random-weight DINOv3 ViTs (bench/_common.py ARCHS) at 512 x 512 windows. Each figure comes
as wall-clock windows/s and as CPU-seconds per window (process time): on a machine shared with
other jobs the second is the one that measures the precision rather than the neighbours. Backbone alone:
batches of ``--batch`` windows through ``Backbone`` (what the pipeline calls), after one
warm-up batch. End to end: ``geodino run`` (build_run + write_scene) on a synthetic scene
with a 7-class head, windows/s from its report. Precisions run interleaved, each once, and
the JSON carries the load average: the machine is shared, so compare ratios within a run.

``--libraries`` measures the int8 candidates the choice was made between, on the backbone
alone, each against fp32 in the same process: torchao (Int8DynamicActivationInt8Weight, eager),
torch's own dynamic quantisation (torch.ao quantize_dynamic), ONNX Runtime (quantize_dynamic,
per-channel int8 weights), OpenVINO + NNCF (geodino's int8). A library that is not installed
is reported as such. Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_model, machine, synthetic_scene

PRECISIONS = ("fp32", "bf16", "int8")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn, n: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call."""
    fn()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n


def backbone_alone(arch: str, precision: str, windows: int, batch: int) -> dict:
    from geodino.backbone import load_backbone

    backbone_dir, _, layers = benchmark_model(arch)
    t0 = time.perf_counter()
    bb = load_backbone(backbone_dir, precision=precision, layers=layers)
    load_s = time.perf_counter() - t0
    x = torch.randn(batch, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        wall, cpu = _timed(lambda: bb(x), max(1, windows // batch))
    return {"windows_per_s": round(batch / wall, 3), "s_per_window": round(wall / batch, 3),
            "cpu_s_per_window": round(cpu / batch, 3), "load_s": round(load_s, 1), "detail": bb.precision_detail}


def end_to_end(arch: str, precision: str, size: int) -> dict:
    from geodino.pipeline import RunOptions, build_run, write_scene

    backbone_dir, head_dir, layers = benchmark_model(arch)
    opts = RunOptions(backbone=str(backbone_dir), landcover_head=str(head_dir), layers=layers, profile="reflectance",
                      polygons=False, precision=precision, batch_size=4)
    with tempfile.TemporaryDirectory() as out:
        run = build_run(str(synthetic_scene(size)), opts)  # loads (and for int8 converts) the model first
        cpu = time.process_time()
        report = write_scene(run, out, quiet=True)
        cpu = time.process_time() - cpu
    return {"windows": report["windows"], "seconds": report["seconds"], "windows_per_s": report["windows_per_second"],
            "cpu_s_per_window": round(cpu / report["windows"], 3)}


def speed(args) -> dict:
    out = {"benchmark": "precision", "machine": machine(), "threads": torch.get_num_threads(), "window": 512,
           "batch": args.batch, "windows_timed": args.windows, "e2e_scene": f"synthetic {args.size}^2, window 512/64"}
    for arch in args.archs.split(","):
        res = {"backbone": {}, "end_to_end": {}}
        for p in PRECISIONS:
            res["backbone"][p] = backbone_alone(arch, p, args.windows, args.batch) | {"load_avg": _load()}
            print(json.dumps({arch: {"backbone": {p: res["backbone"][p]}}}), file=sys.stderr, flush=True)
        if args.size:
            for p in PRECISIONS:
                res["end_to_end"][p] = end_to_end(arch, p, args.size) | {"load_avg": _load()}
                print(json.dumps({arch: {"end_to_end": {p: res["end_to_end"][p]}}}), file=sys.stderr, flush=True)
        for part in ("backbone", "end_to_end"):
            base = res[part].get("fp32")
            if base:
                ps = [p for p in PRECISIONS if p in res[part]]
                res[part]["speedup_vs_fp32"] = {p: round(res[part][p]["windows_per_s"] / base["windows_per_s"], 2)
                                                for p in ps}
                res[part]["cpu_speedup_vs_fp32"] = {p: round(base["cpu_s_per_window"] / res[part][p]["cpu_s_per_window"], 2)
                                                    for p in ps}
        out[arch] = res
    return out


# --------------------------------------------------------------------------------------
# the int8 candidates


class _Outputs(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        o = self.model(pixel_values=x, output_hidden_states=True)
        return (o.last_hidden_state, *o.hidden_states[1:])


def _cos(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a[:, 5:].reshape(-1, a.shape[-1]).double(), b[:, 5:].reshape(-1, b.shape[-1]).double()
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"mean": round(float(c.mean()), 5), "p1": round(float(torch.quantile(c, 0.01)), 5)}


def _candidate(name: str, wrapped: torch.nn.Module, x: torch.Tensor, work: Path):
    """A callable x -> last_hidden_state for one int8 library, or a string saying why not."""
    threads = torch.get_num_threads()
    if name == "torchao":
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            return "torchao not installed"
        m = copy.deepcopy(wrapped)
        quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        return lambda: m(x)[0]
    if name == "torch.ao":
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(wrapped), {torch.nn.Linear}, dtype=torch.qint8)
        return lambda: m(x)[0]
    if name == "onnxruntime":
        try:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError:
            return "onnxruntime not installed"
        fp, q = work / "m.onnx", work / "m.int8.onnx"
        torch.onnx.export(wrapped, (x[:1],), fp, input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False,
                          opset_version=17)
        quantize_dynamic(fp, q, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        return lambda: torch.from_numpy(sess.run(None, {"x": xn})[0])
    if name == "openvino":
        from geodino.int8 import compile_int8

        compiled = compile_int8(wrapped.model, tuple(range(wrapped.model.config.num_hidden_layers)), threads)
        xn = x.numpy()
        return lambda: torch.from_numpy(compiled(xn)[0])
    raise ValueError(name)


def libraries(args) -> dict:
    out = {"benchmark": "precision_int8_libraries", "machine": machine(), "threads": torch.get_num_threads(),
           "batch": args.batch}
    for arch in args.archs.split(","):
        out[arch] = _libraries_on(arch, args.batch, max(1, args.windows // args.batch))
    return out


def _libraries_on(arch: str, batch: int, repeats: int) -> dict:
    from transformers import DINOv3ViTModel

    backbone_dir, _, _ = benchmark_model(arch)
    wrapped = _Outputs(DINOv3ViTModel.from_pretrained(backbone_dir).eval()).eval()
    x = torch.randn(batch, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    res = {}
    with torch.inference_mode():
        ref = wrapped(x)[0]
        fp32_wall, fp32_cpu = _timed(lambda: wrapped(x), repeats)
        res["fp32 (torch)"] = {"windows_per_s": round(batch / fp32_wall, 3), "cpu_s_per_window": round(fp32_cpu / batch, 3)}
        for name in ("torchao", "torch.ao", "onnxruntime", "openvino"):
            with tempfile.TemporaryDirectory() as work:
                t0 = time.perf_counter()
                fn = _candidate(name, wrapped, x, Path(work))
                if isinstance(fn, str):
                    res[name] = {"skipped": fn}
                    continue
                prep = time.perf_counter() - t0
                got = fn()
                wall, cpu = _timed(fn, repeats)
            again, _ = _timed(lambda: wrapped(x), 1)  # fp32 right after: the load on a shared machine drifts
            res[name] = {"windows_per_s": round(batch / wall, 3), "cpu_s_per_window": round(cpu / batch, 3),
                         "speedup_vs_fp32_same_time": round(again / wall, 2), "prepare_s": round(prep, 1),
                         "patch_cosine_vs_fp32": _cos(got, ref), "load_avg": _load()}
            print(json.dumps({arch: {name: res[name]}}), file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="vits16,vitb16")
    ap.add_argument("--windows", type=int, default=4, help="windows timed per precision (after a warm-up batch)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024, help="end-to-end scene size (0: skip end to end)")
    ap.add_argument("--libraries", action="store_true", help="compare the int8 candidate libraries instead")
    ap.add_argument("--threads", type=int, default=0,
                    help="compute threads (0: all cores). On a shared machine 1 thread and CPU-seconds per window "
                         "measure the kernels; wall-clock windows/s measure the neighbours too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["GEODINO_TORCH_THREADS"] = str(args.threads)  # what ModelBundle gives torch and OpenVINO
    print(json.dumps(libraries(args) if args.libraries else speed(args), indent=2))


if __name__ == "__main__":
    main()
