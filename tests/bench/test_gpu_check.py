"""benchmarks/gpu_check.sh, tried on the CPU at a tiny size: one of the gpu suite's comparisons
runs, and the report puts it in the results page with the hardware named (every task's methods run
from compare in test_peers)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_at_a_tiny_size_on_the_cpu(tmp_path):
    env = dict(
        os.environ,
        DEVICE="cpu",
        SCALE="cpu",
        STEPS="2",
        SEEDS="1",
        WORKERS="1",
        ONLY="kjv-llama-gpu",
        OUT=str(tmp_path / "results"),
        DOC=str(tmp_path / "results.md"),
        README=str(tmp_path / "README.md"),
        METASTE_FUSED="0",  # no torch.compile: a cold compile would cost minutes here
        METASTE_CACHE=str(tmp_path / "cache"),
    )
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "gpu" / "kjv-llama-gpu.comparison.json").exists()
    assert not (tmp_path / "results" / "gpu" / "fashion-resnet-gpu.comparison.json").exists()
    page = (tmp_path / "results.md").read_text()
    assert "## Suite `gpu`" in page and "on CPU" in page
    assert "`kjv-llama-gpu`" in page.split("## Protocol")[0]  # a row of the answer
