"""Issue 17, safety under adversarial input: each test rebuilds the hostile file or situation.

Checkpoints are data (no code runs while loading one), sodlab deletes only its own runs, one
process writes a run at a time, image decoding is bounded, and training, evaluation and
explore share one policy for bad boxes.
"""
import io
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sodlab.data.coco import (MAX_IMAGE_PIXELS, CocoDetection, apply_box_policy, load_coco_json,
                              read_rgb_image)
from sodlab.evaluate import STAT_NAMES, coco_eval, load_coco_gt
from sodlab.io import (CheckpointError, atomic_torch_save, atomic_write_bytes, load_checkpoint_file,
                       read_metrics_log, remove_stale_temporaries)
from sodlab.rng import rng_state, set_rng_state
from sodlab.rundir import (LOCK_NAME, RUN_FORMAT, RUN_MARKER, RunInUseError, RunLock, check_replaceable,
                           is_sodlab_run, replace_run_dir, run_contents)

REPO = Path(__file__).resolve().parents[1]
CATS = [{"id": 1, "name": "disk"}]


class _RunsCode:
    """A pickle that calls os.system when unpickled: what a hostile last.pt holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_checkpoint(path: Path, evidence: Path) -> Path:
    """A last.pt shaped like sodlab's, whose unpickling would create ``evidence``."""
    torch.save({"model": _RunsCode(f"touch {shlex.quote(str(evidence))}"), "num_classes": 2, "iteration": 1,
                "optimizers": {}, "rng": {}}, path)
    return path


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --- checkpoints ----------------------------------------------------------------------------------

def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    evidence = tmp_path / "PWNED"
    path = malicious_checkpoint(tmp_path / "last.pt", evidence)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint_file(path)
    message = one_line(refused.value)
    assert str(path) in message and "system" in message and "refused" in message
    assert not evidence.exists()
    # The file is a live payload: the loader sodlab used before runs it.
    torch.load(path, weights_only=False)
    assert evidence.exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "truncated"),
    (b"hello, I am not a checkpoint\n", "truncated"),
    ("half", "truncated"),
    ([1, 2, 3], "expected a checkpoint dict, got list"),
    ({"num_classes": 2}, "missing 'model'"),
])
def test_broken_checkpoints_are_one_line_errors_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "last.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "half":
        buffer = io.BytesIO()
        torch.save({"model": {"w": torch.arange(1000.0)}}, buffer)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a killed copy
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    message = one_line(error.value)
    assert message.startswith(f"{path}: ") and reason in message


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"last\.pt: checkpoint not found"):
        load_checkpoint_file(tmp_path / "last.pt")


def test_a_checkpoint_shaped_like_sodlabs_loads_with_weights_only(tmp_path):
    """Model and optimiser states (SGD momentum, Adam moments), the config as plain values, a
    torch.Generator's state and rng_state(): everything a run checkpoint holds."""
    from sodlab.config import make_config

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model[1].parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        sgd.step()
        adam.step()
    ckpt = {"model": model.state_dict(), "num_classes": 3, "iteration": 2,
            "optimizers": {"detector": sgd.state_dict(), "discriminator": adam.state_dict()},
            "config": make_config("cpu", data="d1").to_dict(),
            "rng": {**rng_state(), "sr_sampling": torch.Generator().manual_seed(3).get_state()}}
    atomic_torch_save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint_file(tmp_path / "last.pt", keys=("model", "optimizers", "iteration", "rng"))
    assert loaded["config"] == ckpt["config"]
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
    sgd.load_state_dict(loaded["optimizers"]["detector"])
    adam.load_state_dict(loaded["optimizers"]["discriminator"])


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    import random

    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    atomic_torch_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint_file(tmp_path / "rng.pt", keys=("rng",))["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
    # Why the state is converted: numpy's own state is an ndarray, which weights_only refuses.
    torch.save({"rng": np.random.get_state()}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint_file(tmp_path / "raw.pt", keys=())


def test_malformed_rng_state_is_a_value_error():
    with pytest.raises(ValueError, match="not an RNG state"):
        set_rng_state({"torch": torch.get_rng_state(), "numpy": {"keys": torch.zeros(3)}, "python": {}})


# The four loading paths live in train.py, which the lead is restructuring: they still call
# torch.load(weights_only=False). Once they call load_checkpoint_file these tests pass, and
# strict xfail turns that into a failure until the marker is removed.

def _malicious_run(run_dir: Path, cfg, evidence: Path) -> Path:
    from sodlab.train import run_record

    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**run_record(cfg), RUN_MARKER: RUN_FORMAT}))
    malicious_checkpoint(run_dir / "checkpoints" / "last.pt", evidence)
    return run_dir


def test_sodlab_eval_refuses_a_malicious_checkpoint(tiny_config, tmp_path, capsys):
    from sodlab.cli import main

    evidence = tmp_path / "PWNED"
    run_dir = _malicious_run(Path(tiny_config.out), tiny_config, evidence)
    assert main(["eval", "--run", str(run_dir)]) == 2
    assert not evidence.exists()
    err = capsys.readouterr().err
    assert "last.pt: refused to load" in err and "Traceback" not in err


def test_notebook_loader_refuses_a_malicious_checkpoint(tiny_config, tmp_path):
    from sodlab.train import load_trained_model  # notebook 04's loader, also bench's

    evidence = tmp_path / "PWNED"
    run_dir = _malicious_run(Path(tiny_config.out), tiny_config, evidence)
    with pytest.raises(CheckpointError):
        load_trained_model(run_dir)
    assert not evidence.exists()


def test_resume_refuses_a_malicious_checkpoint(tiny_config, tmp_path):
    from sodlab.train import train

    evidence = tmp_path / "PWNED"
    _malicious_run(Path(tiny_config.out), tiny_config, evidence)
    with pytest.raises(CheckpointError):
        train(tiny_config, resume=True, progress=False)
    assert not evidence.exists()


def test_init_from_refuses_a_malicious_checkpoint(tiny_config, tmp_path):
    import dataclasses

    from sodlab.config import SRTrainConfig
    from sodlab.train import train

    evidence = tmp_path / "PWNED"
    source = _malicious_run(tmp_path / "baseline", tiny_config, evidence)
    cfg = dataclasses.replace(tiny_config, method="sr", init_from=str(source), out=str(tmp_path / "sr"),
                              sr_train=SRTrainConfig(schedule="staged", hr_source="twin"))
    with pytest.raises(CheckpointError):
        train(cfg, progress=False)
    assert not evidence.exists()


# --- run directories: replace only sodlab's own runs ----------------------------------------------

def _sodlab_run(run_dir: Path) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "baseline", RUN_MARKER: RUN_FORMAT}))
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"iter": 1}\n')
    return run_dir


def test_force_never_deletes_a_folder_sodlab_did_not_make(tmp_path):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.tex").write_text("years of work")
    (important / "config.json").write_text(json.dumps({"method": "baseline"}))  # looks like a run, no marker
    assert not is_sodlab_run(important)
    with RunLock(important), pytest.raises(ValueError) as refused:
        replace_run_dir(important, tmp_path / "does-not-exist")
    assert "not a sodlab run" in one_line(refused.value) and str(important) in str(refused.value)
    assert (important / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in important.iterdir()) == ["config.json", "thesis.tex"]


@pytest.mark.parametrize("out", ["data/synth", "data", "data/synth/train"])
def test_force_never_deletes_the_data_being_trained_on(tmp_path, monkeypatch, out):
    data = tmp_path / "data" / "synth"
    (data / "train").mkdir(parents=True)
    (data / "train" / "000001.png").write_bytes(b"pixels")
    for folder in (data, data / "train", data.parent):  # even with a marker it would be refused
        (folder / "config.json").write_text(json.dumps({RUN_MARKER: RUN_FORMAT}))
    monkeypatch.chdir(tmp_path)
    with RunLock(out), pytest.raises(ValueError, match=r"refusing to replace it: it (is|holds|is inside) "):
        replace_run_dir(out, "./data/../data/synth")
    assert (data / "train" / "000001.png").read_bytes() == b"pixels"


def test_force_never_deletes_the_run_a_staged_schedule_starts_from(tmp_path):
    baseline = _sodlab_run(tmp_path / "baseline")
    with RunLock(baseline), pytest.raises(ValueError, match="a run this one reads"):
        replace_run_dir(baseline, tmp_path / "data", protected=[baseline])
    assert (baseline / "checkpoints" / "last.pt").exists()


def test_force_replaces_a_sodlab_run_and_keeps_its_lock(tmp_path):
    run_dir = _sodlab_run(tmp_path / "run")
    (run_dir / "outside-link").symlink_to(tmp_path)  # a link is removed, never followed
    with RunLock(run_dir):
        replace_run_dir(run_dir, tmp_path / "data")
        assert run_contents(run_dir) == [] and (run_dir / LOCK_NAME).exists()
    assert list(run_dir.iterdir()) == [] and tmp_path.is_dir()


def test_unset_protected_paths_do_not_protect_the_working_directory(tmp_path, monkeypatch):
    """TrainConfig's init_from is "" when unset: Path("") is the working directory, which holds
    every relative --out, so it must not count as a protected run."""
    monkeypatch.chdir(tmp_path)
    _sodlab_run(tmp_path / "run")
    with RunLock("run"):
        replace_run_dir("run", "data", protected=["", None])
    assert run_contents(tmp_path / "run") == []


def test_replace_needs_the_lock(tmp_path):
    run_dir = _sodlab_run(tmp_path / "run")
    with pytest.raises(RuntimeError, match="needs the run's lock"):
        replace_run_dir(run_dir, tmp_path / "data")
    assert (run_dir / "config.json").exists()


def test_check_replaceable_passes_missing_and_empty_folders(tmp_path):
    check_replaceable(tmp_path / "new", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", tmp_path / "data")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_sodlab_run(tmp_path / "broken")


def test_replace_dir_checks_before_it_deletes_and_deletes_only_its_own(tmp_path):
    """io.replace_dir, the benches' guard: the check alone (check_replaceable) touches nothing."""
    from sodlab import io

    def is_bench(path):
        return (path / "bench.json").is_file()

    bench, foreign = tmp_path / "bench", tmp_path / "foreign"
    for folder, marker in ((bench, "bench.json"), (foreign, "notes.txt")):
        folder.mkdir()
        (folder / marker).write_text("{}")
    io.check_replaceable(bench, True, is_bench, "bench")
    assert (bench / "bench.json").exists()  # checked, not deleted
    with pytest.raises(FileExistsError, match="already holds a bench; choose another --name, or pass --force"):
        io.replace_dir(bench, False, is_bench, "bench", hint="choose another --name")
    with pytest.raises(FileExistsError, match="foreign: not a sodlab bench"):
        io.replace_dir(foreign, True, is_bench, "bench")
    assert (foreign / "notes.txt").exists()
    assert list(io.replace_dir(bench, True, is_bench, "bench").iterdir()) == []
    assert io.replace_dir(tmp_path / "new" / "bench", False, is_bench, "bench").is_dir()


# --- run directories: one live process per run ----------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys
    from sodlab.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()
""")


def _python(code: str, *args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True, **kwargs)


def test_second_holder_is_refused_with_the_pid_and_a_dead_holder_leaves_no_lock(tmp_path):
    run_dir = _sodlab_run(tmp_path / "run")
    holder = _python(HOLD_LOCK, run_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # A second train, or a --force replace of the live run: refused before anything is touched.
        with pytest.raises(RunInUseError) as refused:
            with RunLock(run_dir):
                replace_run_dir(run_dir, tmp_path / "data")
        message = one_line(refused.value)
        assert f"in use by sodlab process {holder.pid} " in message and "--force" in message
        assert (run_dir / "checkpoints" / "last.pt").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, as a crashed run would
        holder.wait()
    with RunLock(run_dir):
        assert (run_dir / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")
    assert not (run_dir / LOCK_NAME).exists()


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunInUseError, match=f"process {os.getpid()} "):
            RunLock(tmp_path / "run").acquire()


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    with pytest.raises(ValueError, match="bad input"):
        with RunLock(tmp_path / "runs" / "new"):
            raise ValueError("bad input")
    assert not (tmp_path / "runs" / "new").exists()


RACE = textwrap.dedent("""
    import os, sys, time
    from sodlab.rundir import RunInUseError, RunLock
    run_dir, log, start, rounds = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    while time.time() < start:
        pass
    won = 0
    for _ in range(rounds):
        try:
            with RunLock(run_dir):
                with open(log, "a") as f:
                    f.write(f"enter {os.getpid()}\\n")
                time.sleep(0.002)
                with open(log, "a") as f:
                    f.write(f"leave {os.getpid()}\\n")
                won += 1
        except RunInUseError:
            pass
    print(won)
""")


def test_racing_processes_never_hold_a_run_at_once(tmp_path):
    """Issue 17 saw two concurrent `sodlab train` pass their checks in 8 of 40 trials. Here 4
    processes start together and take/release the lock 40 times each (releasing unlinks the
    lock file, the subtle case); the log shows who held it and must never interleave."""
    log = tmp_path / "log"
    start = time.time() + 1.0
    workers = [_python(RACE, tmp_path / "run", log, start, 40, stdout=subprocess.PIPE) for _ in range(4)]
    wins = [int(w.communicate(timeout=120)[0]) for w in workers]
    lines = log.read_text().split("\n")[:-1]
    assert sum(wins) == len(lines) // 2 > 0
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter.startswith("enter ") and leave == "leave " + enter.split()[1]


def test_a_run_directory_removed_during_mkdir_is_made_again(tmp_path, monkeypatch):
    """The race CI met (2026-12-04): the directory exists at Path.mkdir's mkdir and a releasing
    holder removes it before mkdir's is_dir check, so mkdir(exist_ok=True) raises FileExistsError.
    The lock makes it again instead of failing."""
    from sodlab.rundir import RunLock, _make_dir

    run = tmp_path / "run"
    real_mkdir, calls = Path.mkdir, []

    def racing_mkdir(self, *args, **kwargs):
        calls.append(self)
        if self == run and len(calls) == 1:
            raise FileExistsError(17, "File exists", str(self))  # what Path.mkdir raises in the race
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    with RunLock(run):
        assert run.is_dir() and len(calls) == 2
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    # a file where the directory should be is an error, not an endless retry
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        _make_dir(tmp_path / "file")


# --- crash leftovers --------------------------------------------------------------------------------

KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from sodlab import io
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
    io.atomic_write_bytes(sys.argv[1], b"x" * 1_000_000)
""")


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.pt").write_bytes(b"good")
    for _ in range(2):
        assert _python(KILLED_WRITE, checkpoints / "last.pt").wait() == -signal.SIGKILL
    leftovers = sorted(p.name for p in checkpoints.iterdir() if p.name != "last.pt")
    assert len(leftovers) == 2 and all(n.startswith(".last.pt.") and n.endswith(".tmp") for n in leftovers)
    (tmp_path / "run" / "notes.tmp").write_text("the user's")  # not an atomic write's name
    removed = remove_stale_temporaries(tmp_path / "run")
    assert sorted(p.name for p in removed) == leftovers
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]
    assert (checkpoints / "last.pt").read_bytes() == b"good" and (tmp_path / "run" / "notes.tmp").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path, umask):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.json").write_text("{}")
        atomic_write_bytes(tmp_path / "atomic.json", b"{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_bytes(path, b"[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"[]"


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "lo')  # killed mid-line
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped the torn last line 3"):
        records = read_metrics_log(path)
    assert [r["iter"] for r in records] == [1, 2]


def test_bad_metrics_line_elsewhere_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2,,}\n{"iter": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid json"):
        read_metrics_log(path)
    path.write_text('{"iter": 1}\n[2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2: expected a json object"):
        read_metrics_log(path)


# --- bounded image decoding, paths inside the dataset ---------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def black_png(width: int, height: int, pixel_rows: int | None = None) -> bytes:
    """A grayscale PNG of width x height that is tiny on disk (zeros compress ~1000x); with
    ``pixel_rows``, only that many rows of data follow the header (enough to open it)."""
    compressor = zlib.compressobj(1)
    row_block = bytes((1 + width) * 100)
    rows = height if pixel_rows is None else pixel_rows
    data = b"".join(compressor.compress(row_block) for _ in range(rows // 100))
    data += compressor.compress(bytes((1 + width) * (rows % 100))) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _split(tmp_path, images, annotations=(), files=None):
    (tmp_path / "val").mkdir(parents=True, exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for name, data in (files or {}).items():
        (tmp_path / "val" / name).write_bytes(data)
    ann = tmp_path / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": list(annotations), "categories": CATS}))
    return tmp_path / "val", ann


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if Pillow decodes any pixel."""
    from PIL import ImageFile

    def load(self):
        raise AssertionError(f"decoded {self.size} pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_huge_image_small_on_disk_is_refused_before_decoding(tmp_path, no_decoding):
    """Issue 17: a 13000x13000 PNG (under 1 MB) drove evaluation past 6 GB."""
    png = black_png(13000, 13000)
    assert len(png) < 1_000_000
    image = {"id": 5, "file_name": "bomb.png", "width": 13000, "height": 13000}
    dataset = CocoDetection(*_split(tmp_path, [image], files={"bomb.png": png}))
    with pytest.raises(ValueError) as refused:
        dataset[0]
    message = one_line(refused.value)
    assert "bomb.png (image id 5)" in message and "169,000,000 pixels is over the limit" in message
    assert "refused before decoding" in message and 13000 * 13000 > MAX_IMAGE_PIXELS


def test_decompression_bomb_error_names_file_and_id(tmp_path):
    """30000x30000 is over Pillow's own limit: its DecompressionBombError, reworded."""
    image = {"id": 6, "file_name": "bomb.png", "width": 30000, "height": 30000}
    dataset = CocoDetection(*_split(tmp_path, [image], files={"bomb.png": black_png(30000, 30000, pixel_rows=1)}))
    with pytest.raises(ValueError) as refused:
        dataset[0]
    message = one_line(refused.value)
    assert "bomb.png (image id 6): image of " in message
    assert "900,000,000 pixels is over the limit of 67,108,864" in message


def test_pixel_limit_holds_when_pillow_guard_is_off(tmp_path, monkeypatch):
    """SAHI sets PIL.Image.MAX_IMAGE_PIXELS = None when it reads an image; sodlab's own limit must still refuse."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = {"id": 6, "file_name": "bomb.png", "width": 30000, "height": 30000}
    dataset = CocoDetection(*_split(tmp_path, [image], files={"bomb.png": black_png(30000, 30000, pixel_rows=1)}))
    with pytest.raises(ValueError, match=r"bomb\.png \(image id 6\): image of 30000x30000 = 900,000,000 pixels "
                                         r"is over the limit of 67,108,864"):
        dataset[0]


def test_size_disagreeing_with_the_json_is_caught_before_decoding(tmp_path, no_decoding):
    image = {"id": 7, "file_name": "a.png", "width": 16, "height": 16}
    dataset = CocoDetection(*_split(tmp_path, [image], files={"a.png": black_png(4000, 3000)}))
    with pytest.raises(ValueError, match=r"a\.png \(image id 7\): image is 4000x3000 \(in its header\) "
                                         r"but instances_val\.json says 16x16"):
        dataset[0]


def test_pixel_limit_is_a_parameter(tmp_path):
    image = {"id": 8, "file_name": "a.png", "width": 64, "height": 64}
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    assert read_rgb_image(tmp_path / "a.png", 8, (64, 64)).size == (64, 64)
    with pytest.raises(ValueError, match=r"4,096 pixels is over the limit of 4,095"):
        read_rgb_image(tmp_path / "a.png", 8, (64, 64), max_pixels=64 * 64 - 1)
    dataset = CocoDetection(*_split(tmp_path / "d", [image], files={"a.png": (tmp_path / "a.png").read_bytes()}),
                            max_pixels=100)
    with pytest.raises(ValueError, match="over the limit of 100"):
        dataset[0]


@pytest.mark.parametrize("file_name", ["../../outside/x.png", "/etc/passwd", "sub/../../x.png", ".."])
def test_file_name_leaving_the_split_folder_is_refused(tmp_path, file_name):
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside" / "x.png")
    image = {"id": 9, "file_name": file_name, "width": 4, "height": 4}
    with pytest.raises(ValueError) as refused:
        CocoDetection(*_split(tmp_path / "data", [image]))
    assert "instances_val.json: image id 9: file_name" in one_line(refused.value)
    assert "leaves the split folder" in str(refused.value)


def test_file_name_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "val" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "sub" / "x.png")
    image = {"id": 9, "file_name": "./sub/x.png", "width": 4, "height": 4}
    dataset = CocoDetection(*_split(tmp_path, [image]))
    assert dataset[0][0].shape == (3, 4, 4)


# --- one policy for bad boxes -------------------------------------------------------------------------

def off_image_case(tmp_path) -> Path:
    """4 images of 100x80 with 9 good boxes, plus 10 boxes entirely outside their image, a partly
    outside one, a zero-width one, a NaN one and one whose width is null with no area."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in range(1, 5)]
    anns = []

    def add(image_id, bbox, **extra):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": bbox, **extra})

    for i in range(1, 5):
        add(i, [10, 10, 20, 20], area=400)
        add(i, [50, 40, 12, 9], area=108)
    add(1, [60, 5, 36, 30], area=1080)  # medium
    for k in range(10):
        add(1 + k % 4, [120 + k, 10, 15, 15], area=225)  # entirely right of the image
    add(2, [90, 70, 30, 30], area=900)  # partly outside: clipped to 10x10
    add(3, [5, 5, 0, 10], area=0)
    add(3, [float("nan"), 5, 10, 10])
    add(4, [5, 5, None, 10])  # null width, no area: crashed `sodlab eval` with a TypeError
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path


def test_perfect_detector_scores_one_with_off_image_boxes(tmp_path):
    ann_file = off_image_case(tmp_path)
    # A perfect detector finds the objects as they are in the image (the boxes training learns).
    with pytest.warns(UserWarning):
        training = CocoDetection(tmp_path, ann_file)
    results = []
    for image_id in training.ids:
        for (x1, y1, x2, y2) in training._boxes[image_id].tolist():
            results.append({"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": 1.0})
    with pytest.warns(UserWarning, match=r"gt\.json: skipped 13 degenerate annotation\(s\) from the evaluation "
                                         r"ground truth \(10 outside their image, .*\); clipped 1 box"):
        stats = coco_eval(ann_file, results)
    # (AR1 keeps one detection per image and class, and these images hold 2 or 3 disks.)
    for name in STAT_NAMES:
        if name != "AR1" and stats[name] != -1:
            assert stats[name] == pytest.approx(1.0), name
    assert stats["APl"] == -1 and stats["APs"] == pytest.approx(1.0) and stats["APm"] == pytest.approx(1.0)


def test_training_and_evaluation_keep_exactly_the_same_boxes(tmp_path):
    ann_file = off_image_case(tmp_path)
    with pytest.warns(UserWarning):
        training = CocoDetection(tmp_path, ann_file)
    with pytest.warns(UserWarning):
        gt = load_coco_gt(ann_file)
    assert len(gt.dataset["annotations"]) == sum(len(b) for b in training._boxes.values()) == 10
    for image_id in training.ids:
        evaluated = sorted(tuple(a["bbox"]) for a in gt.imgToAnns[image_id])
        trained = sorted((x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in training._boxes[image_id].tolist())
        np.testing.assert_allclose(np.array(evaluated), np.array(trained))
    assert (90.0, 70.0, 10.0, 10.0) in [tuple(a["bbox"]) for a in gt.imgToAnns[2]]


def test_box_policy_counts_each_reason_and_fills_area(tmp_path):
    data = load_coco_json(off_image_case(tmp_path))
    with pytest.warns(UserWarning) as caught:
        kept = apply_box_policy(data, "gt.json", "test")
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("skipped 13 degenerate", "10 outside their image", "1 of zero or negative size",
                 "2 with a null, NaN or infinite value", "clipped 1 box(es)"):
        assert part in message, message
    assert len(kept) == 10 and all(isinstance(a["area"], (int, float)) for a in kept)
    assert data["annotations"][-1]["bbox"] == [5, 5, None, 10]  # the input is left as it was


def test_null_width_without_area_does_not_crash_evaluation(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 50, "height": 50}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, None, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10]}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    with pytest.warns(UserWarning, match="1 with a null, NaN or infinite value"):
        stats = coco_eval(path, [{"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.9}])
    assert stats["AP"] == pytest.approx(1.0)


def test_sr_patches_skip_the_boxes_the_policy_drops(tiny_config, tmp_path):
    """write_sr_patches (run after training an SR method) crashed on a null width like eval did."""
    import dataclasses

    from sodlab.models import build_model
    from sodlab.sr_quality import write_sr_patches

    image = {"id": 1, "file_name": "a.png", "width": 64, "height": 48}
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 8, 8]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, None, 10]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [100, 10, 8, 8]},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [60, 40, 8, 20]}]
    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps({"images": [image], "annotations": anns, "categories": CATS}))
    with pytest.warns(UserWarning):
        dataset = CocoDetection(tmp_path, ann_file)
    cfg = dataclasses.replace(tiny_config, method="sr")
    model = build_model(cfg, dataset.num_classes).eval()
    with pytest.warns(UserWarning, match=r"skipped 2 degenerate annotation\(s\) from the SR patches"):
        assert write_sr_patches(model, dataset, tmp_path / "patches") == 2
    index = json.loads((tmp_path / "patches" / "index.json").read_text())
    assert [entry["annotation_id"] for entry in index] == [1, 4]


def test_synth_force_never_overwrites_a_dataset_it_did_not_write(tmp_path):
    from sodlab.data.synth import generate

    real = tmp_path / "coco"
    (real / "annotations").mkdir(parents=True)
    (real / "train").mkdir()
    (real / "train" / "0001.jpg").write_bytes(b"not really")
    (real / "annotations" / "instances_train.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match="did not write"):
        generate(real, n_train=1, n_val=1, size=64, workers=1, progress=False, overwrite=True)
    assert (real / "train" / "0001.jpg").read_bytes() == b"not really"


@pytest.mark.parametrize("flag,value,message", [("--lr", "nan", "lr must be a finite number"),
                                                 ("--iters", "-5", "iters must be at least 1"),
                                                 ("--batch-size", "0", "batch_size must be at least 1"),
                                                 ("--ckpt-every", "0", "ckpt_every must be at least 1"),
                                                 ("--eval-batch-size", "0", "eval_batch_size must be at least 1")])
def test_bad_cli_values_are_one_line_errors_before_anything_is_written(tiny_synth, tmp_path, capsys, flag, value,
                                                                       message):
    from sodlab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_synth), "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
