"""What every command shares: the error users see, device choice, seeding, a progress
line, and files written atomically (checkpoints, arrays, results.json).

None of this is deep learning; it is the plumbing that makes a long run safe to interrupt
and its numbers reproducible. The training loops' own machinery (resume, the stop on a
NaN, best.pt) is in training.py, the processes of a torchrun in parallel.py; this module
imports neither.
"""
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix (missing data, bad flag, corrupt file).

    `run.py` prints the message as one line and exits with status 2, so the message must
    say what went wrong *and* what to do about it."""


# --------------------------------------------------------------------- device and seeds
def choose_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit name (cpu, cuda,
    cuda:N for GPU number N, mps) must exist on this machine."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None
                 and torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    kind, _, number = name.partition(":")
    if kind not in available or (number and (kind != "cuda" or not number.isdigit())):
        raise UserError(f"--device {name}: no such device; use auto, cpu, cuda, cuda:N or "
                        "mps")
    if not available[kind]:
        raise UserError(f"--device {name} is not available on this machine: use --device "
                        "auto (or cpu)")
    if number and int(number) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                        f"GPU(s), numbered from 0: give cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor (random draws, index batches) on the device. To a GPU it goes from
    pinned memory without blocking, so the copy queues behind the work already sent
    instead of waiting for it (a plain copy from pageable memory makes the CPU wait)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def main_process() -> bool:
    """Is this the process that prints and writes files? Under torchrun only rank 0 is:
    torchrun numbers its processes in the environment (RANK), and the others compute the
    same numbers (parallel.py). A plain run is its own main process."""
    return os.environ.get("RANK", "0") == "0"


@functools.cache
def silent():
    """Where the other processes' progress lines and prints go: nowhere."""
    return open(os.devnull, "w")


# --------------------------------------------------------------------- progress line
def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """A progress line with rate and ETA, like tqdm but twenty lines long.

    On a terminal the line is redrawn in place (carriage return); in a log file (not a tty)
    a plain line is printed every `interval` seconds so logs stay readable. Use it as an
    iterable wrapper, or call `update(n)` by hand (downloads count bytes this way).
    `stats` given to `update` (e.g. loss=0.31) are shown at the end of the line. A resumed
    run passes `initial` (the steps already done): they count towards the total, not the rate."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None,
                 unit: str = "it", interval: float | None = None, stream=None,
                 initial: int = 0):
        self.iterable = iterable
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit = desc, unit
        self.stream = stream or (sys.stderr if main_process() else silent())
        self.is_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.is_terminal else 30.0)
        self.count, self.initial, self.stats = initial, initial, {}
        self.start = self.last_shown = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1, **stats):
        self.count += n
        self.stats.update(stats)
        now = time.perf_counter()
        if now - self.last_shown >= self.interval:
            self.last_shown = now
            self._show(end="\r" if self.is_terminal else "\n")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.count - self.initial) / elapsed
        scale, unit = (1 / 2**20, "MB") if self.unit == "B" else (1, self.unit)
        done = f"{self.count * scale:.1f}" if self.unit == "B" else f"{self.count}"
        if self.total:
            total = f"{self.total * scale:.1f}" if self.unit == "B" else f"{self.total}"
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            head = f"{100 * self.count / self.total:3.0f}% {done}/{total}"
            tail = f"{_format_seconds(elapsed)}<{_format_seconds(eta)}"
        else:
            head, tail = done, _format_seconds(elapsed)
        stats = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.stats.items())
        return f"{self.desc}: {head} [{tail}, {rate * scale:.2f} {unit}/s] {stats}".rstrip()

    def _show(self, end: str):
        self.stream.write(self.line() + end)
        self.stream.flush()

    def note(self, text: str):
        """A line of its own between updates (a redrawn line is ended first)."""
        self.stream.write(("\n" if self.is_terminal else "") + text + "\n")
        self.stream.flush()

    def close(self):
        self._show(end="\n")


# --------------------------------------------------------------------- atomic files
def _atomic_write(path: Path, write) -> Path:
    """Write through `write(tmp_path)` then rename: a crash never leaves half a file, and
    two processes writing the same file (two runs sharing a cache) never share a temporary.
    Temporaries of this file left by a killed process are removed first. Under torchrun
    only the main process writes: the others computed the same contents."""
    path = Path(path)
    if not main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # per-process names would otherwise pile up after crashes
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temporaries(path: Path):
    """NAME.PID.tmp beside NAME whose process has ended (kill -9 during a write)."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 1:-len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs. On Windows, where signal 0 does not exist,
    every process counts as alive, so nothing another process may own is touched."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def exclusive(folder):
    """Hold FOLDER/.lock (our process id) while a run writes into folder, so two runs
    never interleave their checkpoints. A lock whose process has ended is taken over.
    Folders made here that the run leaves empty (it failed before writing) are removed."""
    lock = Path(folder) / ".lock"
    made = [parent for parent in (lock.parent, *lock.parent.parents) if not parent.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(lock, "x") as handle:
                handle.write(str(os.getpid()))
            break
        except FileExistsError:
            owner = lock.read_text().strip()
            if owner.isdigit() and process_alive(int(owner)):
                raise UserError(f"another run (process {owner}) is writing into {folder}: "
                                "wait for it to end, or pass another --out") from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        for parent in made:  # innermost first; a folder holding anything stays
            try:
                parent.rmdir()
            except OSError:  # not empty (or another run wrote into it meanwhile)
                break


def write_arrays(arrays: dict, path) -> Path:
    """np.savez, atomically."""
    def save(tmp):
        with open(tmp, "wb") as file:  # a file object: savez would add .npz to a name
            np.savez(file, **{name: np.asarray(value) for name, value in arrays.items()})
    return _atomic_write(path, save)


def read_arrays(path, remedy: str) -> dict:
    """The arrays of an .npz (write_arrays' files) by name, without unpickling; a missing,
    truncated or foreign file ends in one line that says `remedy`."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} cannot be read as an .npz of numbers "
                        f"({type(error).__name__}): {remedy}") from None


DIVERGED = ("training diverged: start again with a lower learning rate (--lr where the "
            "command has one) or another --seed; --resume would repeat the same steps")


def save_checkpoint(state: dict, path) -> Path:
    """torch.save to a temporary file, then an atomic rename over the old checkpoint, with
    the SHA-256 of its contents inside (payload_sha256), which load_checkpoint checks.
    Weights that are no longer finite are refused: the last good checkpoint stays."""
    if not all(torch.isfinite(tensor).all() for tensor in _floating_tensors(state)):
        raise UserError(f"the weights became NaN or infinite (at {_position(state)}), "
                        f"{path} was not overwritten: {DIVERGED}")
    state = {**state, "sha256": payload_sha256(state)}
    return _atomic_write(path, lambda tmp: torch.save(state, tmp))


def payload_sha256(value) -> str:
    """SHA-256 of a checkpoint's contents, whatever container holds them: each tensor's
    dtype, shape and bytes, every other value's repr, dict entries in key order. A byte
    changed anywhere in the weights, the optimiser state or the history changes it."""
    digest = hashlib.sha256()

    def add(item):
        if isinstance(item, torch.Tensor):
            digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
            digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())
        elif isinstance(item, dict):
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode())
                add(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"{type(item).__name__}{len(item)}".encode())
            for element in item:
                add(element)
        else:
            digest.update(repr(item).encode())
    add(value)
    return digest.hexdigest()


def _floating_tensors(value):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floating_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _floating_tensors(item)


def _position(state: dict) -> str:
    return next((f"{name} {state[name]}" for name in ("step", "epoch") if name in state),
                "this save")


def load_checkpoint(path, device="cpu", given_by: str = "--ckpt") -> dict:
    """A checkpoint of this project: tensors, numbers, strings, lists and dicts only
    (weights_only=True), so a crafted file cannot run code while it is read; its
    contents must match the SHA-256 saved with them (files of earlier versions have
    none). given_by: the flag that named the file, for the error line ("--resume": the
    run folder's own checkpoint)."""
    path = Path(path)
    instead = ("delete it, or drop --resume to start again" if given_by == "--resume"
               else f"give {given_by} another checkpoint")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"{given_by} {path} {what}: give the path of a checkpoint (.pt) "
                        "this project wrote")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated, foreign or unsafe: say so in one line
        raise UserError(f"{path} cannot be read as a checkpoint of this project "
                        f"({type(error).__name__}): it is damaged, holds other objects, or "
                        f"is not a checkpoint; {instead}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this project: {instead}")
    saved = state.pop("sha256", None)
    if saved is not None and saved != payload_sha256(state):
        raise UserError(f"{path} is damaged: its contents no longer match the SHA-256 saved "
                        f"with them (a disk or copy fault); {instead}, or train again")
    # save_checkpoint refuses such weights, but a file of an earlier version (no SHA-256)
    # or one written elsewhere may hold them, and would sample NaN images
    if not all(torch.isfinite(tensor).all() for tensor in _floating_tensors(state)):
        raise UserError(f"{path} holds NaN or infinite weights (a run that diverged, or a "
                        f"damaged file): {instead}, or train again")
    return state


def checkpoint_of(path, device, command: str, given_by: str = "--ckpt") -> dict:
    """A checkpoint written by `run.py command` (each one records its command)."""
    state = load_checkpoint(path, device, given_by)
    if state.get("command") != command or "settings" not in state:
        made_by = f"'run.py {state['command']}'" if "command" in state else "something else"
        raise UserError(f"{path} was written by {made_by}, not by 'run.py {command}': "
                        f"give a {command} checkpoint, or train one with 'run.py {command}'")
    return state


def resume_state(path, device, command: str, settings, seed: int, may_change=()) -> dict:
    """The checkpoint a --resume continues from, if it belongs to this run: same command,
    seed and settings, apart from `resume` and the fields in may_change (e.g. --steps).
    A resumed run must be the run it continues, or its figures would mean nothing."""
    state = checkpoint_of(path, device, command, "--resume")
    stored = state["settings"]
    changed = [f"--seed {state.get('seed')} (now {seed})"] if state.get("seed") != seed else []
    changed += [f"--{name.replace('_', '-')} {stored.get(name)} (now {value})"
                for name, value in dataclasses.asdict(settings).items()
                if name not in ("resume", *may_change) and stored.get(name) != value]
    if changed:
        raise UserError(f"{path} was trained with {', '.join(changed)}: resume with the "
                        "flags it was trained with, or drop --resume (or pass another "
                        "--out) to start a new run")
    return state


def load_trained(path, device, settings_class, build, key: str, command: str):
    """(model, settings) from a checkpoint of `run.py command`: the settings dataclass
    is rebuilt from the checkpoint, the model by build(settings), its weights from key."""
    state = checkpoint_of(path, device, command)
    try:
        settings = settings_class(**state["settings"])
        model = build(settings).to(device)
        model.load_state_dict(state[key])
    except (TypeError, KeyError, RuntimeError) as error:
        raise UserError(f"{path} does not fit this version's '{command}' networks "
                        f"({type(error).__name__}): train it again with 'run.py {command}'"
                        ) from None
    return model, settings


def write_text(text: str, path) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_image(image, path, format: str = "PNG", **options) -> Path:
    """A Pillow image as PNG (or `format`, with Pillow's options for it), atomically."""
    return _atomic_write(path, lambda tmp: image.save(tmp, format=format, **options))


def write_json(obj, path) -> Path:
    """results.json and friends, written atomically and human-readable."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)
