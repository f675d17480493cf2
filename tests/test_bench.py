"""The benchmark runs end to end on a CPU and writes finite, positive numbers (speed is its output, not a test)."""

import json
import math

from gan_tune import bench


def test_quick_cpu_bench_writes_every_cpu_column(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--packed", "", "--fid-samples", "200", "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    (row,) = numbers["trials"]
    assert row["model"] == "balanced" and row["batch"] == 128
    for column in ("a typical loop", "b eager fp32", "x b"):
        assert math.isfinite(row[column]) and row[column] > 0, (column, row)
    assert "c graph tf32" not in row  # CUDA only
    assert numbers["fid_samples"] == 200
    assert all(numbers[f"fid_seconds width {w:g}"] > 0 for w in bench.FID_WIDTHS)
    assert "b eager fp32" in capsys.readouterr().out  # the printed table
