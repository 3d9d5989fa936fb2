"""Checkpoint files: checksums catch a changed byte, junk (or a torch too old to read them
safely) is exit 2, a full disk keeps the previous checkpoint, and resume=auto falls back to the
newest good checkpoint."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, load_weights, subprocess_env

from trainkit import train_model
from trainkit.callbacks import Callback
from trainkit.core import checkpoint
from trainkit.core.errors import ConfigError

TESTS = Path(__file__).parent
DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "logging.tensorboard=false",
          "trainer.max_epochs=2", "model.dropout=0.2"]


# Helpers ----------------------------------------------------------------------------------------
def storage_bytes(tensor: torch.Tensor) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy().tobytes()


def zip_members(path: Path) -> dict[str, tuple[int, int]]:
    """Each member of a torch zip file -> (offset of its first data byte in the file, size)."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        members = {}
        for info in archive.infolist():
            file.seek(info.header_offset)
            name_length, extra_length = struct.unpack("<HH", file.read(30)[26:30])  # the local header's own
            members[info.filename] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return members


def flip_tensor_byte(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of the ``archive/data/N`` member that holds ``tensor``'s storage,
    in place (hard links to ``path`` see it too)."""
    data, wanted = bytearray(path.read_bytes()), storage_bytes(tensor)
    (offset, size), = [(offset, size) for name, (offset, size) in zip_members(path).items()
                       if "/data/" in name and bytes(data[offset:offset + size]) == wanted]
    data[offset + size // 2] ^= 0x10
    path.write_bytes(data)


def edit_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) inside the checkpoint's ``data.pkl``, in place."""
    assert len(old) == len(new)
    data = bytearray(path.read_bytes())
    ((offset, size),) = [place for name, place in zip_members(path).items() if name.endswith("/data.pkl")]
    at = data.index(old, offset, offset + size)
    data[at:at + len(old)] = new
    path.write_bytes(data)


class CopyLastCheckpoint(Callback):
    """Copy ``last.pt`` to ``to`` after every step, before that step's save: after a failed save,
    ``to`` holds the bytes the previous checkpoint had."""

    def __init__(self, to: str):
        self.to = to

    def on_step_end(self, trainer) -> None:
        last = trainer.checkpoint_dir / "last.pt"
        if last.exists():
            shutil.copyfile(last, self.to)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A finished 2-epoch digits run: its directory."""
    from trainkit.cli import compose

    run = tmp_path_factory.mktemp("whole") / "run"
    train_model(compose(DIGITS), run_dir=run)
    return run


@pytest.fixture
def trained(uninterrupted, tmp_path):
    """A copy of the finished run's last.pt, free to damage."""
    path = tmp_path / "last.pt"
    shutil.copyfile(uninterrupted / "checkpoints" / "last.pt", path)
    return path


# Checksums --------------------------------------------------------------------------------------
def odd_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator)
    return {
        "weight": weight, "tied": weight, "transposed": weight.t(),  # shared storage, a non-contiguous view
        "bf16": torch.randn(5, generator=generator).bfloat16(), "fp16": torch.tensor(1.5, dtype=torch.float16),
        "flags": torch.tensor([True, False, True]), "steps": torch.arange(7, dtype=torch.int64),
        "complex": torch.randn(2, dtype=torch.complex64, generator=generator),
        "sparse": torch.sparse_coo_tensor([[0, 2]], [3.25, -1.5], (4,), check_invariants=True).coalesce(),
        "empty": torch.empty(0, 4),
    }


def test_every_kind_of_tensor_round_trips_and_stays_weights_only(tmp_path):
    state = {"model": odd_tensors(), "config": "seed: 0\n", "trainer_state": {"global_step": 3, "best": None,
             "loss": 0.1, "top_k": [[0.5, "top-step00000003.pt"]], "blob": b"\x00\xff"}}
    path = checkpoint.save(state, tmp_path / "ck.pt")
    assert "checksums" not in state, "save changed the caller's dict"
    raw = torch.load(path, weights_only=True)
    sums = raw["checksums"]
    assert sums["algorithm"] == "crc32" and list(sums["tensors"]) == [f"model.{key}" for key in state["model"]]
    assert all(isinstance(value, int) for value in [*sums["tensors"].values(), *sums["other"].values()])
    loaded = checkpoint.load(path)
    assert list(loaded) == ["model", "config", "trainer_state"]
    assert loaded["trainer_state"] == state["trainer_state"]
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key].to_dense(), tensor.to_dense()), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_checked_by_their_bytes_on_any_device(tmp_path):
    on_cpu = {"w": torch.randn(4, 3).bfloat16(), "t": torch.randn(3, 4).t()}
    on_gpu = {key: tensor.cuda() for key, tensor in on_cpu.items()}
    assert checkpoint.checksums({"model": on_gpu}) == checkpoint.checksums({"model": on_cpu})
    path = checkpoint.save({"model": on_gpu}, tmp_path / "ck.pt")
    loaded = checkpoint.load(path, map_location="cuda")
    assert loaded["model"]["w"].is_cuda and torch.equal(loaded["model"]["w"].cpu(), on_cpu["w"])
    flip_tensor_byte(path, on_cpu["w"])
    with pytest.raises(ConfigError, match=r"checksum mismatch at model\.w "):
        checkpoint.load(path, map_location="cuda")


@pytest.mark.parametrize("key", [key for key, tensor in odd_tensors().items() if tensor.numel()])
def test_a_flipped_bit_in_any_tensor_is_found(tmp_path, key):
    tensors = odd_tensors()
    path = checkpoint.save({"model": tensors}, tmp_path / "ck.pt")
    target = tensors[key].values() if key == "sparse" else tensors[key]
    flip_tensor_byte(path, target)
    first_sharer = {"tied": "weight", "transposed": "weight"}.get(key, key)
    with pytest.raises(ConfigError, match=rf"checkpoint {path}: corrupt: checksum mismatch at model\.{first_sharer} "):
        checkpoint.load(path)


def test_a_changed_dtype_is_found(tmp_path):
    path = checkpoint.save({"model": {"ids": torch.tensor([-1, 2, 3], dtype=torch.int8)}}, tmp_path / "ck.pt")
    edit_pickle(path, b"CharStorage", b"ByteStorage")  # the same bytes, read as uint8
    assert torch.load(path, weights_only=True)["model"]["ids"].tolist() == [255, 2, 3]
    with pytest.raises(ConfigError, match=r"checksum mismatch at model\.ids "):
        checkpoint.load(path)


def first_tensor(state: dict, where: str) -> tuple[str, torch.Tensor]:
    """(path, tensor) of the first Adam moment or the first model weight of a trainkit state."""
    if where == "optimizer":
        slot, moments = next(iter(state["optimizer"]["state"].items()))
        return f"optimizer.state.{slot}.exp_avg", moments["exp_avg"]
    name, tensor = next(iter(state["model"].items()))
    return f"model.{name}", tensor


@pytest.mark.parametrize("where", ["optimizer", "model"])
def test_a_flipped_bit_in_a_trained_checkpoint_is_refused(trained, where):
    key, tensor = first_tensor(torch.load(trained, weights_only=True), where)
    flip_tensor_byte(trained, tensor)
    assert not torch.equal(first_tensor(torch.load(trained, weights_only=True), where)[1], tensor)  # torch loads it
    with pytest.raises(ConfigError) as raised:
        checkpoint.load(trained)
    assert str(raised.value).startswith(f"checkpoint {trained}: corrupt: checksum mismatch at {key} ")


def test_an_edited_config_string_is_refused(trained):
    edit_pickle(trained, b"max_epochs: 2", b"max_epochs: 9")
    assert "max_epochs: 9" in torch.load(trained, weights_only=True)["config"]  # loads, changed
    with pytest.raises(ConfigError, match=rf"checkpoint {trained}: corrupt: checksum mismatch at config "):
        checkpoint.load(trained)


def test_an_edited_trainer_state_number_is_refused(tmp_path):
    path = checkpoint.save({"trainer_state": {"epoch": 1, "global_step": 123456}}, tmp_path / "ck.pt")
    edit_pickle(path, struct.pack("<i", 123456), struct.pack("<i", 123457))
    assert torch.load(path, weights_only=True)["trainer_state"]["global_step"] == 123457
    with pytest.raises(ConfigError, match=r"checksum mismatch at trainer_state\.global_step "):
        checkpoint.load(path)


def test_a_checkpoint_without_checksums_loads_with_one_notice(trained, caplog):
    state = torch.load(trained, weights_only=True)
    del state["checksums"]
    torch.save(state, trained)  # as trainkit wrote it before checksums
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        loaded = checkpoint.load(trained)
    notices = [r.getMessage() for r in caplog.records if "no checksums" in r.getMessage()]
    assert notices == [f"checkpoint {trained} carries no checksums (written before trainkit checked them, "
                       "or by another program); loading it unverified"]
    assert_same_weights(loaded["model"], state["model"])


# Junk -------------------------------------------------------------------------------------------
class Opaque:
    """An object only arbitrary unpickling could rebuild."""


def junk_files(folder: Path, trained: Path) -> dict[str, Path]:
    good = trained.read_bytes()
    files = {"text": b"hello\n", "random": random.Random(0).randbytes(4096), "empty": b"", "half": good[: len(good) // 2],
             "no-central-directory": good[:-40]}
    paths = {name: folder / f"{name}.pt" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    with zipfile.ZipFile(folder / "plain.zip", "w") as archive:
        archive.writestr("notes/readme.txt", "not a torch file")
    paths["zip"] = folder / "plain.zip"
    torch.save([1, torch.ones(2)], folder / "list.pt")
    paths["list"] = folder / "list.pt"
    (folder / "dir.pt").mkdir()
    paths["directory"] = folder / "dir.pt"
    return paths


def test_junk_is_a_config_error_naming_the_file(trained, tmp_path):
    expected = {"list": "not a trainkit checkpoint (holds a list)", "directory": "is a directory"}
    for name, path in junk_files(tmp_path, trained).items():
        with pytest.raises(ConfigError) as raised:
            checkpoint.load(path)
        message = str(raised.value)
        assert message.startswith(f"checkpoint {path}: "), message
        assert expected.get(name, "unreadable, truncated or corrupt (not a torch checkpoint") in message, (name, message)


def test_a_pickle_of_any_object_is_still_refused(tmp_path):
    torch.save({"model": Opaque()}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="refused, it needs arbitrary unpickling.*Opaque"):
        checkpoint.load(tmp_path / "code.pt")


def test_eval_of_junk_or_a_corrupt_checkpoint_exits_2_without_a_traceback(cli, trained, tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    out = cli("eval", "ckpt=t.txt")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "trainkit: error: checkpoint t.txt: unreadable, truncated or corrupt (not a torch checkpoint)"
    flip_tensor_byte(trained, next(iter(torch.load(trained, weights_only=True)["model"].values())))
    out = cli("eval", f"ckpt={trained}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"checkpoint {trained}: corrupt: checksum mismatch at model." in out.stderr


def test_old_torch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint.torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ConfigError, match=r"torch 2.5.1\+cpu is too old: trainkit needs torch >= 2.6"):
        checkpoint.load(tmp_path / "any.pt")


# resume=auto ------------------------------------------------------------------------------------
def fake_checkpoint(path: Path, step: int, mtime: float) -> Path:
    state = {key: {} for key in checkpoint.REQUIRED_KEYS}
    state.update(model={"w": torch.full((3,), float(step))}, trainer_state={"global_step": step}, config="", trainkit_version="0")
    checkpoint.save(state, path)
    os.utime(path, (mtime, mtime))
    return path


def test_find_latest_takes_the_newest_good_checkpoint_by_step_then_by_run(tmp_path, caplog):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    fake_checkpoint(old / "last.pt", 90, mtime=1_000)  # more steps, but an older run
    top = fake_checkpoint(new / "top-step00000020.pt", 20, mtime=2_000)
    os.link(top, new / "best.pt")
    fake_checkpoint(new / "top-step00000010.pt", 10, mtime=2_500)  # a later mtime does not make it newer
    last = fake_checkpoint(new / "last.pt", 30, mtime=3_000)
    flip_tensor_byte(last, torch.full((3,), 30.0))
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        path, state = checkpoint.find_latest(tmp_path)
    assert (path.name, state["trainer_state"]["global_step"]) in [("best.pt", 20), ("top-step00000020.pt", 20)]
    assert f"resume=auto: skipping checkpoint {last}: corrupt: checksum mismatch at model.w " in caplog.text
    assert f"resume=auto: resuming from {path} (step 20), the newest good checkpoint" in caplog.text

    flip_tensor_byte(top, torch.full((3,), 20.0))  # best.pt is the same file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        path, state = checkpoint.find_latest(tmp_path)
    assert (path.name, state["trainer_state"]["global_step"]) == ("top-step00000010.pt", 10)
    assert "the same file as" in caplog.text
    path, _ = checkpoint.find_latest(tmp_path, exclude=tmp_path / "new")
    assert path == old / "last.pt"
    assert checkpoint.find_latest(tmp_path, exclude=tmp_path) is None


def test_resume_auto_falls_back_to_best_when_last_is_corrupt_and_ends_bitwise_equal(compose, tmp_path, uninterrupted,
                                                                                     caplog):
    from trainkit.core.errors import Preempted

    first = tmp_path / "runs" / "first"
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 30}"]), run_dir=first)
    last, best = first / "checkpoints" / "last.pt", first / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["trainer_state"]["global_step"] == 20  # end of epoch 1
    raw = torch.load(last, weights_only=True)
    assert raw["trainer_state"]["global_step"] == 30
    slot, moments = next(iter(raw["optimizer"]["state"].items()))
    flip_tensor_byte(last, moments["exp_avg"])
    with caplog.at_level(logging.INFO, logger="trainkit"):
        result = train_model(compose([*DIGITS, "resume=auto"]), run_dir=tmp_path / "runs" / "second")
    assert f"resume=auto: skipping checkpoint {last}: corrupt: checksum mismatch at optimizer.state.{slot}.exp_avg " in caplog.text
    assert f"resume=auto: resuming from {best} (step 20), the newest good checkpoint" in caplog.text
    assert result.global_step == 40
    assert_same_weights(load_weights(uninterrupted / "checkpoints/last.pt"),
                        load_weights(tmp_path / "runs/second/checkpoints/last.pt"))


def test_resume_auto_from_a_top_k_file_when_last_and_best_are_corrupt(compose, tmp_path, caplog):
    """The lineage's best.pt is corrupt too: the resume goes on from the good top-k file, warns
    that best.pt is not used, and reaches the end."""
    from trainkit.core.errors import Preempted

    # val/loss falls, so with mode=max the top 2 are steps 10 (best.pt, a hard link) and 20.
    common = [*DIGITS, "trainer.save_top_k=2", "trainer.eval_every_n_steps=10", "trainer.monitor=val/loss",
              "trainer.monitor_mode=max"]
    first = tmp_path / "runs" / "first"
    with pytest.raises(Preempted):
        train_model(compose([*common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 35}"]), run_dir=first)
    folder = first / "checkpoints"
    assert sorted(p.name for p in folder.glob("top-step*.pt")) == ["top-step00000010.pt", "top-step00000020.pt"]
    for name in ("last.pt", "best.pt"):
        raw = torch.load(folder / name, weights_only=True)
        flip_tensor_byte(folder / name, next(iter(raw["model"].values())))
    with caplog.at_level(logging.INFO, logger="trainkit"):
        result = train_model(compose([*common, "resume=auto"]), run_dir=tmp_path / "runs" / "second")
    assert f"resuming from {folder / 'top-step00000020.pt'} (step 20)" in caplog.text
    assert "not used as this run's best checkpoint" in caplog.text
    assert result.global_step == 40


def test_resume_auto_skips_a_corrupt_newest_checkpoint(compose, tmp_path, caplog):
    first = tmp_path / "outputs" / "a"
    train_model(compose([*DIGITS, "trainer.max_epochs=1"]), run_dir=first)
    second = tmp_path / "outputs" / "b"
    train_model(compose([*DIGITS, "trainer.max_epochs=2"]), run_dir=second)
    last = second / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    result = train_model(compose([*DIGITS, "trainer.max_epochs=2", "resume=auto"]), run_dir=tmp_path / "outputs" / "c")
    assert "skipping" in caplog.text and "b/checkpoints/last.pt" in caplog.text
    assert result.global_step == 40  # continued from a's 20 steps


# A full disk ------------------------------------------------------------------------------------
FILE_SIZE_LIMIT = textwrap.dedent("""
    import json, os, resource, signal, sys, torch
    from pathlib import Path
    from trainkit.core import checkpoint
    from trainkit.core.errors import ConfigError
    folder = Path(sys.argv[1])
    last, best = folder / "last.pt", folder / "best.pt"
    checkpoint.save({"model": {"w": torch.randn(1_000)}}, last)
    checkpoint.save({"model": {"w": torch.randn(2_000)}}, best)
    big = checkpoint.save({"model": {"w": torch.randn(1_000_000)}}, folder / "big.pt")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    def no_hard_links(*args):  # a file system without hard links: link() copies instead
        raise OSError(1, "Operation not permitted")

    def error_of(write):
        try:
            write()
        except ConfigError as error:
            return str(error)

    errors = [error_of(lambda: checkpoint.save({"model": {"w": torch.randn(1_000_000)}}, last))]
    os.link = no_hard_links
    errors.append(error_of(lambda: checkpoint.link(big, best)))
    print(json.dumps({"errors": errors, "files": sorted(os.listdir(folder))}))
""")


def test_a_write_the_kernel_refuses_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write inside torch.save (a file size limit: EFBIG), not a patched one;
    and the same for the copy that stands in for a hard link where a file system has none."""
    resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no RLIMIT_FSIZE on this system")
    out = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == [f"could not write checkpoint {tmp_path / name}: File too large; "
                                "the previous checkpoint is unchanged" for name in ("last.pt", "best.pt")], report
    assert report["files"] == ["best.pt", "big.pt", "last.pt"], "a temporary file was left behind"
    assert checkpoint.load(tmp_path / "last.pt")["model"]["w"].numel() == 1_000
    assert checkpoint.load(tmp_path / "best.pt")["model"]["w"].numel() == 2_000


INSIDE_A_SMALL_TMPFS = """
mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97
dir="$2"; out="$3"; shift 3
"$@"; code=$?
ls -a "$dir/run/checkpoints" > "$out/listing"
cp "$dir/run/checkpoints/last.pt" "$out/after.pt"
exit $code
"""


@pytest.mark.slow
def test_training_into_a_full_filesystem_exits_2_and_keeps_last_pt(cli, compose, tmp_path):
    """A real full disk: a tmpfs holding 2.5 checkpoints, mounted in a private mount namespace."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(disk)],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    # A checkpoint's size after one step (the optimizer moments exist from then on).
    common = [*DIGITS, "trainer.save_every_n_steps=1", "trainer.eval_every_n_steps=5", "trainer.log_every_n_steps=1"]
    train_model(compose([*common, "trainer.max_steps=1"]), run_dir=tmp_path / "sizing")
    size = (tmp_path / "sizing" / "checkpoints" / "last.pt").stat().st_size
    # Steps 1-5: best.pt is last.pt, so a save needs two checkpoints' room; from step 6 best.pt
    # keeps step 5 alive, and the save of step 7 needs a third.
    in_a_small_tmpfs = ("unshare", "-rm", "sh", "-c", INSIDE_A_SMALL_TMPFS, "sh", f"{int(2.5 * size) + 256 * 1024}",
                        str(disk), str(out), sys.executable)
    result = cli("train", *common, f"hydra.run.dir={disk}/run",
                 f"+callbacks.copy={{_target_: test_checkpoint.CopyLastCheckpoint, to: {out}/before.pt}}",
                 launcher=in_a_small_tmpfs, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = disk / "run" / "checkpoints" / "last.pt"
    assert (f"trainkit: error: could not write checkpoint {last}: No space left on device "
            f"(free space in {last.parent}, or write elsewhere); the previous checkpoint is unchanged") in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "listing").read_text().split() == [".", "..", "best.pt", "last.pt"], "a temporary file was left behind"
    assert (out / "after.pt").read_bytes() == (out / "before.pt").read_bytes(), "the previous last.pt changed"
    assert checkpoint.load(out / "after.pt")["trainer_state"]["global_step"] == 6


@pytest.mark.slow
def test_bench_checkpoint_runs(tmp_path):
    script = TESTS.parent / "scripts" / "bench_checkpoint.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "1", "--rounds", "1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert row["size_mib"] == 1 and row["rounds"] == 1
    assert row["read_ms"] > 0 and row["load_verified_ms"] > 0 and row["checksum_at_save_ms_per_mib"] > 0
    assert "| 1 MiB |" in out.stdout
