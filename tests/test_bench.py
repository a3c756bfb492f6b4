"""The GPU throughput benchmark (bench/bench_zero.py) runs for real on the CPU: a DeepSpeed ZeRO-2
engine, the pretraining task's step, the FLOP count and MFU arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facemae_dist.demo import free_port

ROOT = Path(__file__).resolve().parents[1]


def _bench_zero():
    spec = importlib.util.spec_from_file_location("bench_zero", ROOT / "bench" / "bench_zero.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_gpu_names() -> None:
    peak = _bench_zero().peak_tflops
    assert peak("NVIDIA H100 80GB HBM3", "bf16", None) == pytest.approx(989.4)
    assert peak("NVIDIA H100 PCIe", "bf16", None) == pytest.approx(756.0)
    assert peak("NVIDIA H200", "bf16", None) == pytest.approx(989.4)
    assert peak("NVIDIA A100-SXM4-80GB", "bf16", None) == pytest.approx(312.0)
    assert peak("NVIDIA H100 80GB HBM3", "fp32", None) is None  # no fp32 table: pass --peak-tflops
    assert peak("CPU (x86_64, 2 cores)", "bf16", None) is None
    assert peak("anything", "fp32", 2.5) == 2.5


def test_flops_count_masked_encoder_and_teacher() -> None:
    flops = _bench_zero().flops_per_image
    name = "facemae_vit_micro_patch16_112"
    lower, higher = flops(name, {}, 0.9, None), flops(name, {}, 0.5, None)
    assert 0 < lower < higher  # fewer visible tokens through the encoder
    assert flops(name, {}, 0.75, "tiny") > flops(name, {}, 0.75, None)


def test_bench_zero_runs_deepspeed_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "zero.json"
    # a free port: the process group of a plain run binds one
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_zero.py"), "--quick", "--irm", "tiny"]
    cmd += ["--peak-tflops", "0.5", "--json", str(out), "--baseline", "--profile", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["model"] == "facemae_vit_micro_patch16_112" and r["zero_stage"] == 2
    assert r["world_size"] == 1 and r["irm_teacher"] == "tiny"
    assert r["images_per_s_per_device"] > 0 and r["gflop_per_image"] > 0
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)
    assert "img/s per device" in proc.stdout and "MFU" in proc.stdout
    assert r["deepspeed_config"] == "configs/deepspeed/zero2.json"  # what the configs run
    assert r["plain_torch_images_per_s"] > 0  # the same-run baseline
    assert r["deepspeed_vs_plain"] == pytest.approx(
        r["images_per_s_per_device"] / r["plain_torch_images_per_s"]
    )
    table = (tmp_path / "profile_facemae_vit_micro_patch16_112_irm_tiny.txt").read_text()
    assert "top operators by self CPU time" in table and "aten::" in table


def test_bench_zero_compiles_the_deepspeed_engine(tmp_path: Path) -> None:
    """--compile (a lead for host-bound GPU steps) trains through DeepSpeed's compiled module."""
    results = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"zero{len(flags)}.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}
        cmd = [sys.executable, str(ROOT / "bench" / "bench_zero.py"), "--quick", *flags]
        proc = subprocess.run(cmd + ["--json", str(out)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (results[bool(flags)],) = json.loads(out.read_text())
    assert results[True]["compiled"] is True and ", compiled" in proc.stdout
    # the same steps from the same weights and batch: compiling does not change the math
    assert results[True]["last_loss"] == pytest.approx(results[False]["last_loss"], rel=1e-4)
