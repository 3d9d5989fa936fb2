"""Checkpoint files: one plain dict, written atomically, verified on every read, read without
unpickling code.

Loading always uses ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is
refused, and nothing in it runs; a file that is no torch checkpoint at all (text, random bytes,
an empty or truncated file) is a ``ConfigError`` too, never a traceback.

``save`` adds a ``checksums`` entry (ints and strings only): a CRC-32 of every tensor's bytes,
dtype and shape, keyed by its path (``optimizer.state.0.exp_avg``), and one of the non-tensor
values under each key of the first two levels (``config``, ``trainer_state.global_step``).
``load`` recomputes them all and refuses a file whose bytes changed after it was written, naming
the first bad key, so a flipped bit never reaches a resumed run; ``load`` returns the state
without that entry. Files written before checksums existed load with a one-line notice.

Writes go to a temporary file that is flushed, fsync'ed and renamed over the target; a failed
write (a full disk) removes the temporary file, so the previous checkpoint stays whole.

Sharded checkpoints (``distributed.strategy=fsdp``) are folders with the same content and the
same rules: ``torch.distributed.checkpoint`` (DCP) shards of the model and the optimizer from
every rank, and ``meta.pt``, a checkpoint file as above holding the rest and the SHA-256 of
every DCP file. ``checkpoints/last`` and ``best`` are symbolic links to such folders, swapped
atomically once a folder is complete. DCP's ``.metadata`` pickle is read by an unpickler that
builds only DCP's metadata classes, after every file matched its hash. DCP reshards on load
(``load_into``, any world size); ``load`` of a folder consolidates the weights in one process.

Never: unpickle arbitrary objects (``weights_only=False``), return a state whose checksums do not
match, or put a partly written file where a checkpoint was.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainkit.core.builder import check_trusted
from trainkit.core.errors import ConfigError

MIN_TORCH = (2, 6)


def require_safe_torch() -> None:
    """torch < 2.6 cannot be trusted to load checkpoints safely: refuse to run on it."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise ConfigError(f"torch {torch.__version__} is too old: trainkit needs torch >= 2.6 "
                          "(safe weights_only checkpoint loading); pip install -U torch")

log = logging.getLogger(__name__)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "config",
                 "trainkit_version")
CHECKSUMS = "checksums"
ALGORITHM = "crc32"  # zlib.crc32: ~0.3 ms/MB here, 2-5x faster than hashlib's sha1/md5/blake2b
# What resume=auto considers, per run: files, and the links to sharded folders (strategy=fsdp).
RESUMABLE = ("last.pt", "best.pt", "top-step*.pt", "step*.pt", "last", "best", "top-step*[0-9]")


# Checksums --------------------------------------------------------------------------------------
def checksums(state: dict[str, Any]) -> dict[str, Any]:
    """The ``checksums`` entry for ``state`` (its own ``checksums`` key left out): ``algorithm``,
    ``tensors`` (path -> CRC of dtype, shape and bytes) and ``other`` (for each path of one or two
    keys, a CRC of the non-tensor values and container shapes under it), both in walk order."""
    tensors: dict[str, int] = {}
    other: dict[str, int] = {}

    def visit(value: Any, path: tuple[str, ...]) -> None:
        name, group = ".".join(path), ".".join(path[:2])
        if isinstance(value, torch.Tensor):
            key, copy = name, 1
            while key in tensors:  # two paths that spell the same ("a.b" and "a" -> "b")
                copy += 1
                key = f"{name}#{copy}"
            tensors[key] = tensor_checksum(value)
        elif isinstance(value, dict):
            other[group] = zlib.crc32(f"{name}:dict{list(map(repr, value))}\n".encode(), other.get(group, 0))
            for key, item in value.items():
                visit(item, (*path, str(key)))
        elif isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            other[group] = zlib.crc32(f"{name}:{kind}{len(value)}\n".encode(), other.get(group, 0))
            for index, item in enumerate(value):
                visit(item, (*path, str(index)))
        else:
            other[group] = zlib.crc32(leaf_bytes(name, value), other.get(group, 0))

    for key, value in state.items():
        if key != CHECKSUMS:
            visit(value, (str(key),))
    return {"algorithm": ALGORITHM, "tensors": tensors, "other": other}


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of dtype, shape and values (the CPU bytes torch.save writes; any device, dtype,
    layout or stride; views and tensors shared between keys are checked by their own values)."""
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    if tensor.layout != torch.strided:  # sparse: its values, densely
        tensor = tensor.to_dense()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # bf16 has no numpy dtype
    return zlib.crc32(data, zlib.crc32(header))


def leaf_bytes(name: str, value: Any) -> bytes:
    """A canonical encoding of one non-tensor value, with its path and type."""
    if isinstance(value, bytes):
        payload = value
    elif isinstance(value, str):
        payload = value.encode("utf-8", "surrogatepass")
    else:
        payload = repr(value).encode()  # exact for int, float (shortest round trip), bool, None
    return f"{name}={type(value).__name__}[{len(payload)}]:".encode() + payload


def verify(state: dict[str, Any], path: Path) -> None:
    """Check and remove ``state``'s ``checksums`` entry; a mismatch is a ``ConfigError``."""
    if CHECKSUMS not in state:
        log.warning("checkpoint %s carries no checksums (written before trainkit checked them, or by "
                    "another program); loading it unverified", path)
        return
    stored = state.pop(CHECKSUMS)
    try:
        algorithm, stored_tensors, stored_other = stored["algorithm"], dict(stored["tensors"]), dict(stored["other"])
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f"checkpoint {path}: corrupt: its checksums entry is unreadable") from None
    if algorithm != ALGORITHM:
        raise ConfigError(f"checkpoint {path}: checksums by {algorithm!r}, which this trainkit cannot verify "
                          f"(it knows {ALGORITHM!r}); load it with a newer trainkit")
    actual = checksums(state)
    bad = first_difference(stored_tensors, actual["tensors"])
    if bad is None:
        bad = first_difference(stored_other, actual["other"])
    if bad is not None:
        raise ConfigError(f"checkpoint {path}: corrupt: checksum mismatch at {bad} (its bytes changed after it "
                          "was written: a disk, memory or copy error); use an earlier checkpoint "
                          "(resume=auto falls back to the newest good one)")


def first_difference(stored: dict[str, int], actual: dict[str, int]) -> str | None:
    """The first key, in stored order then actual order, whose checksums differ or exist once."""
    for key, value in stored.items():
        if actual.get(key) != value:
            return key
    return next((key for key in actual if key not in stored), None)


# Writing ----------------------------------------------------------------------------------------
def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` and its checksums to ``path`` atomically (temp file, flush, fsync, rename,
    fsync dir). A failed write (full disk, quota, read-only) is a ``ConfigError`` and leaves no
    temporary file and the previous ``path`` unchanged; ``state`` itself is not modified."""
    path = Path(path)
    payload = {key: value for key, value in state.items() if key != CHECKSUMS}
    payload[CHECKSUMS] = checksums(payload)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        reason = write_failure(error, path.parent)
        if reason is None:  # not the file system's doing (an object torch cannot pickle, Ctrl-C)
            raise
        raise ConfigError(f"could not write checkpoint {path}: {reason}; the previous checkpoint is unchanged"
                          ) from None
    fsync_directory(path.parent)
    return path


def write_failure(error: BaseException, directory: Path) -> str | None:
    """Why the file system refused a write, or None when ``error`` is no write failure.

    torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc]
    unexpected pos ...") or "PytorchStreamWriter failed writing file ...", with the OSError of
    the file object's write (ENOSPC, EFBIG, EDQUOT) as its ``__context__``."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
            return f"{cause.strerror or cause}" + (f" (free space in {directory}, or write elsewhere)" if full else "")
        cause = cause.__cause__ or cause.__context__
    message = str(error)
    if isinstance(error, RuntimeError) and ("PytorchStreamWriter" in message or "unexpected pos" in message):
        return torch_message(message)
    return None


def link(source: Path, target: Path) -> None:
    """Make ``target`` hold the same bytes as ``source``, atomically (hard link, else copy); a
    failed copy is a ``ConfigError`` like a failed ``save``, and ``target`` stays as it was."""
    import shutil

    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"could not write checkpoint {target}: {write_failure(error, target.parent)}; "
                          "the previous checkpoint is unchanged") from None
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: some file systems refuse)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# Reading ----------------------------------------------------------------------------------------
def load(path: str | Path, map_location: str | torch.device = "cpu", weights: bool = True) -> dict[str, Any]:
    """Read and verify a checkpoint; returns its state without the ``checksums`` entry. Every
    failure (missing, unreadable, not a torch checkpoint, needs unpickling, checksum mismatch)
    is a ``ConfigError`` naming the file and why. A sharded folder gives its ``meta.pt`` entries
    plus, with ``weights``, the full ``model`` weights (without, a resume loads them sharded)."""
    path = Path(path)
    if is_sharded(path):
        return consolidated(path) if weights else read_meta(path)
    state = read(path, map_location)
    verify(state, path)
    return state


def read(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into a ``ConfigError``; not
    verified. ``mmap=True`` leaves tensor bytes on disk (a cheap look at the small values)."""
    require_safe_torch()
    path = Path(path)
    if is_sharded(path):
        return read(path / META, map_location, mmap)
    if path.is_dir():
        raise ConfigError(f"checkpoint {path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # junk bytes look like one
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsupported = [line.strip() for line in str(error).split("\n") if "Unsupported global" in line]
        if not unsupported:  # not a pickle of anything: junk or a broken file
            raise ConfigError(f"checkpoint {path}: unreadable, truncated or corrupt (not a torch checkpoint)") from None
        raise ConfigError(
            f"checkpoint {path}: refused, it needs arbitrary unpickling, which could run code "
            f"({unsupported[0]}); trainkit loads only plain tensors and containers"
        ) from None
    except OSError as error:
        raise ConfigError(f"checkpoint {path}: cannot read it ({error.strerror or error})") from None
    except MemoryError:
        raise
    except Exception as error:  # torch's unpickler raises anything on junk: KeyError, IndexError, struct.error, ...
        detail = f": {torch_message(str(error))}" if isinstance(error, RuntimeError) else ""
        raise ConfigError(f"checkpoint {path}: unreadable, truncated or corrupt (not a torch checkpoint{detail})"
                          ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (holds a {type(state).__name__})")
    return state


def torch_message(message: str) -> str:
    """The first sentence of a torch C++ error, without its ``[enforce fail at ...]`` prefix."""
    message = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", message.strip().split("\n")[0])
    return message.split(". ")[0]


def check_complete(state: dict[str, Any], path: str | Path) -> None:
    """Refuse a state that lacks what resuming needs (an exported or foreign file)."""
    sharded = ("model", "optimizer") if "sharded" in state else ()  # in the folder's DCP files
    missing = [key for key in REQUIRED_KEYS if key not in state and key not in sharded]
    if missing:
        raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (missing keys: {', '.join(missing)})")


# resume=auto ------------------------------------------------------------------------------------
def find_latest(run_root: Path, exclude: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest good, complete checkpoint of the runs under ``run_root``
    (``*/checkpoints/{last,best,top-step*,step*}.pt`` and sharded ``last``, ``best``, ``top-step*``
    folders, outside ``exclude``), or None; a sharded folder's state has no model or optimizer
    (``load_into`` puts them in the live, sharded objects).

    Runs are tried newest first by the mtime of their newest checkpoint; inside a run, files
    by the global step they hold (a quick memory-mapped look), newest first. A file that does
    not load, fails its checksums or is incomplete is skipped with a warning saying why."""
    excluded = exclude.resolve() if exclude is not None else None
    runs: dict[Path, list[Path]] = {}
    for pattern in RESUMABLE:
        for path in run_root.glob(f"*/checkpoints/{pattern}"):
            if excluded is None or excluded not in path.resolve().parents:
                runs.setdefault(path.parent, []).append(path)
    skipped: dict[tuple[int, int], str] = {}  # (device, inode) -> the first path it failed as: links are read once
    for run in sorted(runs, key=lambda run: max(p.stat().st_mtime for p in runs[run]), reverse=True):
        for path in newest_first(runs[run]):
            identity = (path.stat().st_dev, path.stat().st_ino)
            if identity in skipped:
                log.warning("resume=auto: skipping %s: the same file as %s", path, skipped[identity])
                continue
            try:
                state = load(path, weights=False)
                check_complete(state, path)
            except ConfigError as error:
                log.warning("resume=auto: skipping %s", error)
                skipped[identity] = str(path)
                continue
            if skipped:
                log.warning("resume=auto: resuming from %s (step %s), the newest good checkpoint", path,
                            state["trainer_state"].get("global_step", "?"))
            return path, state
    return None


def newest_first(paths: list[Path]) -> list[Path]:
    """Checkpoints of one run by the global step they hold, then mtime, newest first; files
    that cannot even be read come first (``find_latest`` then says why it skips them)."""

    def step(path: Path) -> float:
        try:
            return float(read(path, mmap=True).get("trainer_state", {}).get("global_step", -1))
        except (ConfigError, AttributeError, TypeError, ValueError):
            return float("inf")

    return sorted(paths, key=lambda path: (step(path), path.stat().st_mtime), reverse=True)


# RNG states -------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every RNG the run draws from, as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back every RNG state ``capture_rng`` took."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Any) -> None:
    """Load a state dict, or explain which parameter names and shapes do not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("shape mismatch", mismatched), ("missing in checkpoint", missing),
                                      ("unexpected in checkpoint", unexpected)) if items]
        raise ConfigError(f"{source}: the checkpoint's model does not match the configured model ({'; '.join(parts)})")
    model.load_state_dict(weights)


def read_checkpoint(path: str | Path, trust: Sequence[str] = ()) -> tuple[dict[str, Any], DictConfig]:
    """(the checkpoint dict, its stored config) once every ``_target_`` in that config is trusted;
    the config's ``trust`` key is replaced by ``trust``, the user's own list."""
    state = load(path)
    for key in ("model", "config"):
        if key not in state:
            raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (no {key!r})")
    try:
        cfg = OmegaConf.create(state["config"])  # YAML is parsed with a safe loader: no tags, no objects
    except Exception as error:
        raise ConfigError(f"checkpoint {path}: its stored config is not valid YAML ({error})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"checkpoint {path}: its stored config is not a mapping of keys")
    check_trusted(cfg, str(path), trust)
    cfg.trust = list(trust)
    return state, cfg


def stored_runtime(state: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The data's plain values the model was built with (sizes, pad id), None in checkpoints
    written before trainkit kept them."""
    runtime = state.get("runtime")
    if runtime is None:
        return None
    plain = isinstance(runtime, dict) and all(
        isinstance(key, str) and (value is None or isinstance(value, (bool, int, float, str)))
        for key, value in runtime.items())
    if not plain:
        raise ConfigError(f"checkpoint {path}: its 'runtime' entry is not a mapping of plain values")
    return dict(runtime)


# Sharded folders (distributed.strategy=fsdp) ------------------------------------------------------
META = "meta.pt"
FORMAT = "trainkit-dcp-1"
DCP_FILE = re.compile(r"(__\d+_\d+\.distcp|\.metadata)")
SAVE_FOLDER = re.compile(r"step\d{8}-[0-9a-f]{8}")


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint (a folder holding meta.pt), not a file."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


# Writing ----------------------------------------------------------------------------------------
def save_sharded(link: Path, model: nn.Module, optimizer: Any, rest: dict[str, Any], folder_name: str,
         is_main: bool) -> Path:
    """Every rank: write this rank's shards of ``model`` and ``optimizer`` into
    ``<link's folder>/<folder_name>``; the main rank adds ``meta.pt`` (``rest`` and the files'
    hashes) and then points ``link`` at the folder. ``folder_name`` must be the same on every
    rank. Returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = link.parent
    folder, temporary = directory / folder_name, directory / f".{folder_name}.tmp"
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             storage_writer=dcp.FileSystemWriter(temporary, sync_files=True))
    if is_main:
        hashes = {path.name: file_hash(path) for path in sorted(temporary.iterdir()) if DCP_FILE.fullmatch(path.name)}
        save({**rest, "sharded": {"format": FORMAT, "files": hashes}}, temporary / META)
        os.replace(temporary, folder)
        fsync_directory(directory)
        point(link, folder)
    barrier()
    return folder


def point(link: Path, folder: Path) -> None:
    """Make ``link`` a symbolic link to ``folder`` (a sibling), atomically."""
    temporary = link.with_name(f".{link.name}.link")
    temporary.unlink(missing_ok=True)
    os.symlink(folder.name, temporary)
    os.replace(temporary, link)
    fsync_directory(link.parent)


def remove_unlinked(directory: Path) -> None:
    """Remove save folders no link in ``directory`` points at (and unfinished ones)."""
    kept = {os.readlink(path) for path in directory.iterdir() if path.is_symlink()}
    for path in directory.iterdir():
        unfinished = path.name.startswith(".step") and path.name.endswith(".tmp")
        if unfinished or (SAVE_FOLDER.fullmatch(path.name) and path.name not in kept and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)


def barrier() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Reading ----------------------------------------------------------------------------------------
def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint, verified, after every DCP file of the folder matched
    its recorded hash (a missing, extra or changed file is a ``ConfigError``)."""
    path = Path(path)
    meta = load(path / META)
    sharded = meta.get("sharded")
    files = sharded.get("files") if isinstance(sharded, dict) else None
    if not isinstance(sharded, dict) or sharded.get("format") != FORMAT or not isinstance(files, dict):
        raise ConfigError(f"{path}: not a trainkit sharded checkpoint (its {META} has no '{FORMAT}' record)")
    present = {item.name for item in path.iterdir() if DCP_FILE.fullmatch(item.name)}
    if present != set(files) or ".metadata" not in present:
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise ConfigError(f"{path}: its files are not those it was saved with (missing: {', '.join(missing) or 'none'}; "
                          f"not recorded: {', '.join(extra) or 'none'}); it is incomplete or was changed")
    for name, expected in files.items():
        if file_hash(path / name) != expected:
            raise ConfigError(f"{path / name}: checksum mismatch; the sharded checkpoint is damaged or was changed")
    return meta


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, ``torch.Size``, dtypes and paths, and nothing else."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
         ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def safe_reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` whose metadata is read by ``_MetadataUnpickler`` and whose
    shard files must be files of this folder."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            try:
                with open(Path(self.path) / ".metadata", "rb") as file:
                    metadata = _MetadataUnpickler(file).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
                raise ConfigError(f"{self.path}: its .metadata is not a checkpoint's metadata ({error})") from None
            names = {getattr(info, "relative_path", None) for info in (metadata.storage_data or {}).values()}
            if not all(isinstance(name, str) and DCP_FILE.fullmatch(name) for name in names):
                raise ConfigError(f"{self.path}: its .metadata names files outside the checkpoint")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def load_into(path: str | Path, model: nn.Module, optimizer: Any = None) -> None:
    """Load the saved model (and optimizer) state into live objects, sharded or not, at any
    world size (DCP reshards); under a process group every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    path = Path(path).resolve()
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=safe_reader(path))
    except ConfigError:
        raise
    except Exception as error:  # a model or optimizer that does not fit the saved one
        raise ConfigError(f"{path}: does not fit the configured model or optimizer "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''})") from None
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))


def consolidated(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint in one process, as a single-file checkpoint reads: ``meta.pt``'s
    entries plus ``model``, the full weights (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path).resolve()
    meta = read_meta(path)
    reader = safe_reader(path)
    template = {key: torch.empty(item.size, dtype=item.properties.dtype)
                for key, item in reader.read_metadata().state_dict_metadata.items()
                if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():  # DCP's notice that it loads in one process: that is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(template, storage_reader=safe_reader(path), no_dist=True)
    return {**meta, "model": {key[len("model."):]: value for key, value in template.items()}}
