"""aotpack bench on tiny-flux (two variants, so that it stays quick): real fresh processes, real files."""

import csv

import pytest

from aotpack.bench import COLUMNS, run_bench

pytestmark = pytest.mark.slow


def test_bench_writes_table_csv_json_and_plot(tmp_path):
    out = run_bench("tiny-flux", ["int8wo"], out=tmp_path / "res", steps=2, images=1,
                    variants=("eager", "aotpack"), artifacts_dir=tmp_path / "arts")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["eager", "aotpack"]
    assert list(rows[0]) == COLUMNS
    for r in rows:
        assert r["ckpt_id"] == "builtin:tiny-flux" and r["quantization"] == "int8wo"
        assert 0 < float(r["cold_start"]) <= float(r["first_image"])
        assert float(r["inference_memory"]) >= float(r["model_memory"]) > 0
    md = (out / "results.md").read_text()
    assert "| ckpt_id | batch_size | fuse | compile | compile_vae | quantization | sparsify |" in md
    assert "Machine:" in md and "## Targets" in md and "## Artifact load" in md
    assert (out / "results.json").is_file() and (out / "results.png").stat().st_size > 1000
