"""`bccd-batch bench` on the CPU at toy size: the table's plumbing, not a performance figure."""

import pytest

from bccd_batch.bench import run_bench, table
from conftest import DATA, cli


@pytest.mark.slow
def test_bench_rows_for_one_engine_and_a_device_set(small_model):
    rows = run_bench(DATA / "JPEGImages", 4, small_model, "cpu", [("torch", 2)], ["cpu,cpu"], log=lambda m: None)
    # "cpu,cpu": one device, two worker processes (one each, the CPU's default).
    assert [(r["engine"], r["devices"], r["workers"]) for r in rows] == [("torch-eager-fp32", 1, 1), ("torch-eager-fp32", 1, 2)]
    assert all(r["end_to_end_img_s"] > 0 and r["images"] == 4 for r in rows)
    assert rows[0]["model_only_img_s"] > 0 and rows[1]["scaling"] > 0
    assert 0 <= rows[0]["decode_wait_pct"] <= 100
    text = table(rows)
    assert text.count("\n") == 3 and "torch-eager-fp32" in text


def test_bench_without_fields_to_copy_or_with_bad_engines_exits_2_with_the_reason(tmp_path):
    r = cli("bench", "--data", tmp_path, "--images", 4, "--engines", "torch:1", "--device", "cpu", check_rc=2)
    assert "holds no .jpg files" in r.stderr
    for bad in ("torch", "torch:eight", "torch:8:1"):
        r = cli("bench", "--data", DATA, "--images", 4, "--engines", bad, "--device", "cpu", check_rc=2)
        assert "--engines takes engine:batch pairs" in r.stderr
    r = cli("bench", "--data", DATA, "--images", 4, "--engines", "torch:1", "--device", "cpu", "--executors", "local,spark", check_rc=2)
    assert "--executors takes local and/or ray" in r.stderr
