"""CI compile check of the cuda tier without a GPU: every kernel variant of
natten_mlx_cuda.plan.compile_variants(), as the exact translation unit mx.fast.cuda_kernel builds
(natten_mlx_cuda.source.full_source, MLX's default header included), compiled by nvcc for sm_90
(the target NVRTC uses on Hopper). MLX's device header is replaced by stub/ (the kernels use only
CUDA's own types from it). Skipped without nvcc. A kernel that does not compile cannot land."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from cuda_cases import skip_cpu_check_on_gpu
from natten_mlx_cuda import plan, source

HERE = os.path.dirname(os.path.abspath(__file__))
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)

NVCC = os.environ.get("NVCC") or NVCC
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="no nvcc (CUDA toolkit) on this machine; set NVCC=/path/to/nvcc"),
    pytest.mark.skipif(bool(skip_cpu_check_on_gpu()), reason=str(skip_cpu_check_on_gpu())),
]

VARIANTS = plan.compile_variants()
BODIES = sorted({v.body for v in VARIANTS})


def test_variants_cover_every_body_dtype_and_flag():
    seen = {(v.body, dict(v.template)["T"], dict(v.template)["HAS_RPB"]) for v in VARIANTS if v.body != "merge_parts"}
    for body in BODIES:
        if body == "merge_parts":  # no input dtype or rpb: every output dtype
            assert {dict(v.template)["OT"] for v in VARIANTS if v.body == body} == {"float32", "float16", "bfloat16"}
            continue
        dtypes = ("float16", "bfloat16") if body.startswith("fmha") else ("float32", "float16", "bfloat16")
        for dt in dtypes:
            for rpb in (False, True):
                assert (body, dt, rpb) in seen
    assert set(BODIES) == set(source.BODIES)


@pytest.mark.parametrize("body", BODIES)
def test_nvcc_compiles(body, tmp_path):
    variants = [v for v in VARIANTS if v.body == body]
    names = [v.kernel_name for v in variants]
    assert len(set(names)) == len(names)
    text = "\n".join(source.full_source(v) for v in variants)
    cu = tmp_path / f"{body}.cu"
    cu.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", "-I", os.path.join(HERE, "stub"), "-Xptxas", "-v", str(cu),
         "-o", str(tmp_path / f"{body}.o")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    # every variant's entry point made it into the object
    for n in names:
        assert n in res.stderr, n


def test_wgmma_probe_compiles_for_sm90a(tmp_path):
    """benchmarks/gpu/wgmma_probe.py (warpgroup MMA layouts, for the GPU): its variants pass ptxas for
    sm_90a, the target MLX asks NVRTC for on Hopper (benchmarks/gpu/arch_probe.py)."""
    import importlib.util

    path = os.path.join(HERE, "..", "..", "benchmarks", "gpu", "wgmma_probe.py")
    spec = importlib.util.spec_from_file_location("wgmma_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.emit(str(tmp_path))
    for i in range(len(probe.VARIANTS)):
        cu = tmp_path / f"probe{i}.cu"
        res = subprocess.run([NVCC, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-c", str(cu), "-o",
                              str(tmp_path / f"probe{i}.o")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]


def test_wgmma_forward_variants_compile_for_sm90a(tmp_path):
    """fmha_fwd's WG variants (plan.wgmma_variants) through ptxas for sm_90a, the target MLX asks NVRTC
    for on Hopper: they compile, and ptxas does not serialise their wgmma (a warning that halves the
    tensor-core rate: e.g. an accumulator written between wgmma issue and wait, or wgmma in divergent code)."""
    variants = plan.wgmma_variants()
    assert all(dict(v.template)["WG"] for v in variants)
    text = "\n".join(source.full_source(v) for v in variants)
    cu = tmp_path / "fmha_fwd_wg.cu"
    cu.write_text(text)
    res = subprocess.run(
        [NVCC, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-c", "-I", os.path.join(HERE, "stub"),
         "-Xptxas", "-v", str(cu), "-o", str(tmp_path / "fmha_fwd_wg.o")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    for v in variants:
        assert v.kernel_name in res.stderr, v.kernel_name
    assert "serializ" not in res.stderr.lower(), res.stderr[-4000:]


def test_wgmma_attention_probe_compiles_for_sm90a(tmp_path):
    """benchmarks/gpu/wgmma_attn.py (the standalone warpgroup attention forward of session 10, its overlapped
    variant and its mbarrier ring): every configuration passes ptxas for sm_90a without spills or serialised
    wgmma."""
    import importlib.util

    path = os.path.join(HERE, "..", "..", "benchmarks", "gpu", "wgmma_attn.py")
    spec = importlib.util.spec_from_file_location("wgmma_attn", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for nwg, bn, minb, pipe, *st in probe.CONFIGS:
        for win in (False, True):
            cu = tmp_path / f"wg_{nwg}_{bn}_{minb}_{pipe}_{'_'.join(map(str, st))}_{int(win)}.cu"
            cu.write_text(probe.full_source(nwg, bn, win, minb, pipe, stages=st[0] if st else 2))
            res = subprocess.run([NVCC, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-c", "-Xptxas", "-v",
                                  str(cu), "-o", str(cu.with_suffix(".o"))], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-4000:]
            assert "serializ" not in res.stderr.lower() and " 0 bytes spill stores" in res.stderr, (cu.name, res.stderr[-2000:])
