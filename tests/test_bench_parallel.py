"""bench/parallel.py (`turbokernels bench parallel`): runs at TP=1 on gloo, writes its CSV, and its two sharded
variants agree with each other (the worker asserts it) and take the paths they are meant to measure."""
import csv

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_bench_parallel_writes_its_table(tmp_path, capsys):
    from turbokernels.cli import main
    assert main(["bench", "parallel", "--world", "1", "--sizes", "64x128", "--rounds", "3",
                 "--out", str(tmp_path)]) in (0, None)
    rows = list(csv.DictReader(open(tmp_path / "parallel.csv")))
    assert len(rows) == 1 and rows[0]["world"] == "1" and rows[0]["backend"] == "gloo"
    for column in ("unsharded_us", "local_us", "dtensor_us", "torch_dense_us", "all_reduce_us"):
        assert float(rows[0][column]) > 0, column
    assert "median us per call (rank 0)" in capsys.readouterr().out
