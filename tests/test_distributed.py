"""Distributed training with torchrun: 2 CPU processes (gloo) end in step and evaluate as one."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

from sodlab.cli import main
from sodlab.io import read_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_ranks_agree_and_gathered_eval_equals_one_process(tiny_synth, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "sodlab", "train", "--data", str(tiny_synth), "--iters", "3",
           "--batch-size", "2", "--warmup-iters", "1", "--lr", "0.01", "--out", str(run_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ddp = read_json(run_dir / "ddp.json")
    assert ddp["world_size"] == 2 and len(ddp["parameter_digests"]) == 2
    assert ddp["identical"], "both ranks end with identical parameters"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3, "only rank 0 writes the log"

    # The gathered evaluation (each rank scored half the val images) equals a one-process one.
    gathered = read_json(run_dir / "eval.json")
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    (single / "eval.json").unlink()
    assert main(["eval", "--run", str(single)]) == 0
    assert read_json(single / "eval.json") == gathered
    # Detections agree up to float rounding (the processes ran 1 vs 2 threads, other batch mates).
    ours, theirs = read_json(run_dir / "detections_val.json"), read_json(single / "detections_val.json")
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.02) and a["score"] == pytest.approx(b["score"], abs=1e-3)
