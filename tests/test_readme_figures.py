"""The figures the README quotes are the committed benchmark results (issue 9.13).

Each check recomputes a quoted ratio from ``benchmarks/results/*.json`` and looks for it, as
printed, in the README: re-running a benchmark without updating the README (or the reverse)
fails here.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _results(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def _quoted(text: str) -> None:
    flat = " ".join(README.split())
    assert text in flat, f"README does not quote {text!r} (from benchmarks/results)"


def test_quantization_latency_ratios_are_the_committed_ones():
    lat = _results("quant.json")["mlp"]["latency"]
    fp32 = lat["fp32"]["median_ms"]
    _quoted(f"converted w8a8 {lat['maas_jax w8a8']['median_ms'] / fp32:.2f}x the fp32 latency")
    _quoted(f"qwix w8a8 {lat['qwix w8a8']['median_ms'] / fp32:.2f}x")
    _quoted(
        f"{lat['maas_jax w8a8']['median_ms']:.2f} vs {lat['qwix w8a8']['median_ms']:.2f} vs "
        f"{fp32:.2f} ms"
    )


def test_embedding_table_figures_are_the_committed_ones():
    tables = _results("any_model.json")["minilm_w8_tables"]["w8 + tables per row"]
    _quoted(f"{tables['bytes_ratio']:.3f}x fp32 at cosine {tables['mean_cosine']:.5f}")


@pytest.mark.parametrize("key", ["prune in-graph masks", "prune baked masks"])
def test_mask_cost_figures_are_the_committed_ones(key):
    t = _results("any_model.json")["prune_masks_512_1024_1024_512_b8"]["timings"][key]
    ratio = t["vs_dense"]
    _quoted(f"{ratio:.0f}x dense" if ratio > 100 else f"{ratio:.1f}x for the baked masks")


def test_serving_figures_are_the_committed_ones():
    r = _results("serve.json")
    m = r["models"]["minilm"]["summary"]
    rps = m["throughput_rps"]
    _quoted(
        f"{m['throughput_ratio']:.2f}x the throughput ({rps['batching']:.1f} vs "
        f"{rps['max_batch_size_1']:.1f} req/s)"
    )
    d = r["models"]["digits"]["summary"]
    _quoted(f"{d['throughput_ratio']:.2f}x ({d['throughput_rps']['batching']:.0f} vs")
    assert m["failed_requests"] == 0 and d["failed_requests"] == 0
    ms = r["models"]["minilm"]["setup"]["bucket_ms_in_process"]
    _quoted(f"(bucket 1: {ms['1']:.1f} ms, 8: {ms['8']:.1f} ms, 32: {ms['32']:.1f} ms)")
    _quoted(f"{ms['32'] / 32:.1f} ms a row against {ms['1']:.1f} ms alone")


def test_pruning_figures_are_the_committed_ones():
    r = _results("prune.json")
    ratio = r["mlp"]["ratio_to_dense"]
    _quoted(f"runs at {ratio['50% channels removed']:.2f}x the dense latency")
    _quoted(f"(50% baked masks: {ratio['50% masks (baked constants)']:.2f}x)")
    acc = r["digits"]
    _quoted(
        f"{acc['dense'] * 100:.1f}% dense, {acc['50% gradual magnitude'] * 100:.1f}% at 50% (also "
        f"with int8 on top), {acc['80% gradual magnitude'] * 100:.1f}% at 80%, "
        f"{acc['90% gradual magnitude'] * 100:.1f}% at 90%"
    )
    assert acc["50% + int8 w8a8"] == acc["50% gradual magnitude"]  # "also with int8 on top"


def test_sharding_plan_figures_are_the_committed_ones():
    runs = _results("shard_plan.json")["runs"]
    for run in runs:  # "exactly 1/64 and 1/256 of the parameter bytes per device"
        devices = run["mesh"]["data"] * run["mesh"]["model"]
        assert run["replicated_param_fraction"] == 0.0
        assert abs(run["param_bytes_per_device"] * devices / run["param_bytes_total"] - 1) < 1e-3
        if "seconds" in run:
            _quoted(f"in {run['seconds']['lower_and_compile']:.1f} s on {devices}")
    assert sorted(r["mesh"]["data"] * r["mesh"]["model"] for r in runs) == [64, 256]


def test_artifact_figures_are_the_committed_ones():
    a = _results("artifact.json")["artifacts"]
    i8, i4 = a["int8 (minilm-w8a8.toml)"], a["int4 weight-only, tables int4"]
    _quoted(f"per row) is {i8['ratio_to_fp32_artifact']:.3f}x the fp32 artifact")
    _quoted(f'(`quantize_model(recipe="w4", tables="int4")`) {i4["ratio_to_fp32_artifact"]:.3f}x.')
    for label, word in (("fp32", "fp32"), ("int4 weight-only, tables int4", "weight-only")):
        d = a[label]["max_abs_difference_between_buckets"]
        values = list(d.values())
        _quoted(f"{word} {values[0]:.2g}")
    d8 = list(i8["max_abs_difference_between_buckets"].values())
    _quoted(f"w8a8 {d8[0]:.2g} and {d8[1]:.2g}")
