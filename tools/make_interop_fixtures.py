"""Make the interop fixtures under tests/data/interop/ with the other tools' own code (run once, by hand).

The tests compare viva_tensor's readers and writers with files that bitsandbytes, AutoAWQ and
compressed-tensors wrote themselves. Those oracles need torch, which the library and its test suite never
import, so this script runs in a separate environment and its output is committed:

    python3 -m venv /tmp/oracle && . /tmp/oracle/bin/activate
    pip install torch==2.13.0 bitsandbytes==0.50.2 compressed-tensors==0.20.1 safetensors numpy
    pip install --no-deps autoawq==0.2.9
    python tools/make_interop_fixtures.py --model PATH/TO/all-MiniLM-L6-v2/model.safetensors

Each fixture holds the first 64 rows of one real MiniLM layer (``encoder.layer.0.attention.self.query.weight``,
64 outputs x 384 inputs) as the
tool quantizes it, the float weight it started from (``original``) and the tool's own dequantization of its
file (``reference``), so the tests need nothing but NumPy and safetensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

LAYER = "encoder.layer.0.attention.self.query.weight"
ROWS = 64
OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "interop"


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # stored as raw bits, named in the metadata
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def _save(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], *, layer: bool = True) -> None:
    """Writes one fixture; ``layer=False`` for fixtures not made from the MiniLM layer (no ``layer``/``rows`` keys)."""
    OUT.mkdir(parents=True, exist_ok=True)
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    source = {"layer": LAYER, "rows": str(ROWS)} if layer else {}
    save_file({k: _np(v) for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"),
              metadata={**meta, **source, "torch_dtypes": json.dumps(dtypes)})
    print(f"{name}: {', '.join(f'{k} {dtypes[k]}{list(v.shape)}' for k, v in tensors.items())}")


def bitsandbytes(w: torch.Tensor) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for kind in ("nf4", "fp4"):
        for dq in (False, True):
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=dq)
            sd = {"fc.weight": packed}
            sd.update({f"fc.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
            ref = F.dequantize_4bit(packed, state)
            _save(f"bnb_{kind}{'_dq' if dq else ''}", {**sd, "original": w, "reference": ref},
                  {"tool": f"bitsandbytes {bnb.__version__}", "call": f"quantize_4bit(blocksize=64, {kind}, "
                   f"compress_statistics={dq}); QuantState.as_dict(packed=True); dequantize_4bit"})


def _fp4_edge_values() -> np.ndarray:
    """Values on and one float32 ulp either side of every FP4 bucket bound (absmax 1), zeros, tiny values, NaN."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type("fp4", device="cpu")
    s = torch.sort(code).values
    bounds = ((s[:-1] + s[1:]) / 2).numpy()
    edge = np.concatenate([bounds, np.nextafter(bounds, np.float32(2)), np.nextafter(bounds, np.float32(-2))])
    out = np.zeros(4 * 64, np.float32)
    out[0], out[1 : 1 + edge.size] = 1.0, edge  # block 0-1: absmax exactly 1.0, values at the bounds
    out[128:192] = 0.0  # block 2: all zero
    out[192:256] = np.linspace(-1e-3, 1e-3, 64, dtype=np.float32)
    out[192] = 1.0  # block 3: values near zero against absmax 1 (codes 0 and 8)
    return out


def bitsandbytes_fp4_random() -> None:
    """bitsandbytes' FP4 on random data (partial blocks, odd sizes, bfloat16, other block sizes, edge values)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    g = torch.Generator().manual_seed(15)
    cases = {
        "odd_f32_b64": (torch.randn(37, 101, generator=g), 64, False),
        "f32_b128": (torch.randn(16, 256, generator=g) * 3, 128, False),
        "f32_b32_tail": (torch.randn(1000, generator=g), 32, False),
        "bf16_b64": (torch.randn(24, 96, generator=g).to(torch.bfloat16), 64, False),
        "f16_b64_tail": (torch.randn(7, 45, generator=g).to(torch.float16), 64, False),
        "edges_b64": (torch.from_numpy(_fp4_edge_values()), 64, False),
        "dq_f32_b64": (torch.randn(96, 256, generator=g), 64, True),
        "dq_bf16_b64_tail": (torch.randn(33, 129, generator=g).to(torch.bfloat16), 64, True),
    }
    tensors, meta = {}, {}
    for name, (x, block, dq) in cases.items():
        packed, state = F.quantize_4bit(x, blocksize=block, quant_type="fp4", compress_statistics=dq)
        tensors[f"{name}.x"] = x
        tensors[f"{name}.codes"] = packed.reshape(-1)
        tensors[f"{name}.absmax"] = state.absmax
        if dq:
            tensors[f"{name}.nested_absmax"] = state.state2.absmax
            tensors[f"{name}.offset"] = state.offset.reshape(1).float()
        tensors[f"{name}.reference"] = F.dequantize_4bit(packed, state)
        # bitsandbytes' pure-PyTorch decode (its fallback for odd last dims): its CPU kernel above reads the
        # absmax of the wrong block when blocks straddle rows (bf16_b64: 96 values a row, blocks of 64).
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if dq else state.absmax
        tensors[f"{name}.reference_torch"] = _dequantize_4bit_compute(
            packed.reshape(-1), absmax, _get_4bit_code("fp4", "cpu"), block, x.shape, x.dtype)
        meta[name] = json.dumps({"blocksize": block, "double_quant": dq})
    _save("bnb_fp4_random", tensors, {"tool": f"bitsandbytes {bnb.__version__} (CPU)", "cases": json.dumps(meta),
                                      "call": "quantize_4bit(x, blocksize, quant_type='fp4', compress_statistics); "
                                      "dequantize_4bit"}, layer=False)


def _autoawq():
    """AutoAWQ's packing code without its package __init__ (which needs datasets and triton)."""
    import site

    root = next(pathlib.Path(p) / "awq" for p in site.getsitepackages() if (pathlib.Path(p) / "awq").is_dir())
    for name in ("awq", "awq.modules", "awq.modules.linear", "awq.utils"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / pathlib.Path(*name.split(".")[1:]))]
        sys.modules[name] = mod
    utils = types.ModuleType("awq.utils.utils")  # only get_best_device is used; the real one imports accelerate
    utils.get_best_device = lambda: "cpu"
    sys.modules["awq.utils.utils"] = utils
    spec = importlib.util.spec_from_file_location("awq.modules.linear.gemm", root / "modules/linear/gemm.py")
    gemm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gemm)
    from awq.utils.packing_utils import dequantize_gemm

    return gemm.WQLinear_GEMM, dequantize_gemm


def autoawq(w: torch.Tensor) -> None:
    wq_linear, dequantize_gemm = _autoawq()
    group = 128
    out, k = w.shape
    g = w.reshape(out, k // group, group)
    hi, lo = g.amax(dim=-1), g.amin(dim=-1)  # AutoAWQ's pseudo_quantize_tensor (zero point, 4 bits)
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16).float()
    zeros = torch.clamp(-torch.round(lo / scales), 0, 15)
    linear = torch.nn.Linear(k, out, bias=False)
    linear.weight.data = w.clone()
    layer = wq_linear.from_linear(linear, 4, group, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    ref = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group)  # (in, out) float16
    _save("awq_gemm", {"fc.qweight": layer.qweight, "fc.qzeros": layer.qzeros, "fc.scales": layer.scales,
                       "original": w, "reference": ref},
          {"tool": "autoawq 0.2.9 WQLinear_GEMM.from_linear + packing_utils.dequantize_gemm", "group_size": "128"})


def compressed_tensors(w: torch.Tensor) -> None:
    import compressed_tensors as ct
    from compressed_tensors.compressors import NVFP4PackedCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    for preset, dtype in (("W4A16", torch.float32), ("W4A16_ASYM", torch.float32), ("W4A16", torch.bfloat16),
                          ("W4A16_ASYM", torch.float16), ("NVFP4A16", torch.float32)):
        scheme = preset_name_to_scheme(preset, ["Linear"])
        args = scheme.weights
        x = w.to(dtype)
        group = args.group_size
        g = x.reshape(x.shape[0], -1, group)
        mins, maxs = g.amin(dim=-1), g.amax(dim=-1)
        sd = {"weight": x}
        if preset.startswith("NVFP4"):
            gparam = generate_gparam(x.amin(), x.amax())
            scale, zp = calculate_qparams(mins, maxs, args, global_scale=gparam)
            sd.update(weight_scale=scale, weight_global_scale=gparam.reshape(1))
            compressor = NVFP4PackedCompressor
        else:
            scale, zp = calculate_qparams(mins, maxs, args)
            sd.update(weight_scale=scale, weight_zero_point=zp)
            compressor = PackedQuantizationCompressor
        packed = compressor.compress(dict(sd), scheme)
        ref = compressor.decompress(dict(packed), scheme)["weight"]
        name = f"ct_{preset.lower()}_{str(dtype).removeprefix('torch.')}"
        tensors = {f"fc.{k}": v for k, v in packed.items()}
        _save(name, {**tensors, "original": x, "reference": ref},
              {"tool": f"compressed-tensors {ct.__version__}", "preset": preset,
               "weights": json.dumps(args.model_dump(mode="json"))})


TORCH_SUM_LENGTHS = (1, 3, 4, 7, 8, 9, 31, 33, 100, 511, 4099, 16384, 32767, 32768, 32769, 70001, 262144, 300007)
TORCH_SUM_THREADS = (1, 2, 3, 8)


def torch_sum_values(n: int) -> np.ndarray:
    """Deterministic positive float32 values like a tensor's absmax (no RNG: the tests rebuild them)."""
    i = np.arange(n, dtype=np.int64)
    return ((i * 2654435761 % 1000003).astype(np.float64) / 1000003 * 0.09 + 0.01).astype(np.float32)


def torch_sums() -> None:
    """torch's float32 ``mean`` of :func:`torch_sum_values` on the CPU for every length and thread count:
    bitsandbytes' double-quantization ``offset`` is ``absmax.mean()``, whose summation order these pin down."""
    tensors = {}
    for threads in TORCH_SUM_THREADS:
        torch.set_num_threads(threads)
        means = [torch.from_numpy(torch_sum_values(n)).mean() for n in TORCH_SUM_LENGTHS]
        tensors[f"mean_threads_{threads}"] = torch.stack(means)
    tensors["lengths"] = torch.tensor(TORCH_SUM_LENGTHS, dtype=torch.int64)
    meta = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    _save("torch_sums", tensors, meta, layer=False)


GROUPS = {
    "bitsandbytes": bitsandbytes,
    "autoawq": autoawq,
    "compressed-tensors": compressed_tensors,
    "bnb-fp4-random": lambda w: bitsandbytes_fp4_random(),
    "torch-sums": lambda w: torch_sums(),
}

NEEDS_MODEL = ("bitsandbytes", "autoawq", "compressed-tensors")
"""The groups made from the MiniLM layer (the others make their own inputs and need no ``--model``)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="all-MiniLM-L6-v2's model.safetensors (needed by " + ", ".join(NEEDS_MODEL) + ")")
    p.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="make only these groups (default: all)")
    args = p.parse_args()
    names = args.only or list(GROUPS)
    if args.model is None and set(names) & set(NEEDS_MODEL):
        p.error("--model is needed for " + ", ".join(n for n in names if n in NEEDS_MODEL))
    w = None if args.model is None else load_file(args.model)[LAYER][:ROWS].float().contiguous()
    torch.manual_seed(0)
    for name in names:
        GROUPS[name](w)


if __name__ == "__main__":
    main()
