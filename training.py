"""What every training loop calls, written once: resume, the progress line, the stop on a
diverged loss, the logged numbers' means over processes, atomic checkpoints and best.pt.

A method file shows its own loop and calls a `Run` around it, as nanoGPT's train.py
does its logging and saving in plain sight:

    run = training.Run(out, "gan", settings, seed, device, state={"gan": gan, ...},
                       steps=settings.steps, every=settings.sample_every)
    for step in run:                      # 0 .. steps - 1, from the checkpoint's on --resume
        numbers = train_step(...)         # the method's step: zero_grad, backward, step
        run.log(numbers)                  # progress line; a NaN or inf stops the run
        if run.at_checkpoint:             # every `every` steps, and after the last
            ...                           # evaluation into run.history (FID, accuracies)
            run.save_checkpoint()         # checkpoint.pt, and best.pt at a new lowest FID

The Run never calls back into the method: it holds the parts to save (anything with
state_dict / load_state_dict) and the numbers the loop gives it.

Randomness, one policy for every run. Each random number comes from a stream named for
what it draws, and each stream's seed is derived from (--seed, name) (`stream_seed`), so
no stream shares numbers with another and no `seed + 3` stands in for a name:
- the initial weights: torch's default stream, seeded from (seed, "weights") just before
  the networks are built (`seed_weights`);
- the training streams, `run.random(name)`: "data" (which images form each batch, an
  epoch's order), "noise" (z, eps, timesteps, dropped labels, label noise) and
  "augment" (DiffAugment, self-ensembling's and the classifier's augmentations). Each is
  a parallel.Random, which reads like torch (`noise.randn(count, latent_dim)`) and
  draws for the global batch under torchrun;
- dropout's masks, drawn inside nn.Dropout from torch's default stream: the Run seeds it
  from (seed, "dropout") once the networks are built;
- the fixed streams, `fixed_random(seed, name)`: "grid", "pairs", "fid", "statistics",
  "test", ...: they start afresh at every use, so the grid shows the same z at every
  checkpoint and each FID compares like with like.
The training streams and the default stream are saved in each checkpoint, so a resumed
run draws exactly what the uninterrupted run would have.
"""
import dataclasses
import hashlib
import math
import time
from pathlib import Path

import torch

import pages
import parallel
import util
from util import UserError


LOG_EVERY = 10  # steps whose numbers are taken from the device together


# ============================================================================ randomness
def stream_seed(seed: int, name: str) -> int:
    """The seed of the stream `name` of a run seeded with `seed`: 63 bits of
    SHA-256("seed/name"), so streams of different names (or seeds) are unrelated."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_weights(seed: int):
    """Seed torch's default stream (every device) for the initial weights: call it just
    before the networks are built."""
    torch.manual_seed(stream_seed(seed, "weights"))


def fixed_random(seed: int, name: str, device="cpu") -> parallel.Random:
    """A fixed stream: the same numbers at every use (the grid's z, FID's samples), drawn
    whole in every process."""
    return parallel.Random(stream_seed(seed, name), device, per_process=False)


class DefaultStream:
    """torch's default generators (the CPU's and, with a GPU, CUDA's), which dropout draws
    its masks from: seeded from (seed, "dropout"), saved and restored with the run."""

    def __init__(self, seed: int):
        torch.manual_seed(stream_seed(seed, "dropout"))

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict):
        torch.set_rng_state(state["cpu"].cpu())  # a checkpoint loaded onto a GPU moved it
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([part.cpu() for part in state["cuda"]])


class StepLog:
    """What a step-based training loop plots and times: each step's numbers are summed, and
    `commit(step)` appends their means since the previous commit to `history` (with the
    step) and adds the time since `start_clock` to `seconds`, so the pictures and
    checkpoints made between a commit and the next `start_clock` are not counted as training.
    `history` and `seconds` come from the checkpoint when a run resumes."""

    def __init__(self, history: dict | None = None, seconds: float = 0.0):
        self.history, self.seconds, self.sums = history or {"step": []}, seconds, {}
        self.start_clock()

    def start_clock(self):
        self.start = time.perf_counter()

    def add(self, numbers: dict):
        for name, value in numbers.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def commit(self, step: int):
        self.seconds += time.perf_counter() - self.start
        steps = self.history["step"]
        since = step - (steps[-1] if steps else 0)
        for name, total in self.sums.items():
            self.history.setdefault(name, []).append(total / since)
        steps.append(step)
        self.sums = {}


def check_finite(value: float, step: int, what: str = "loss"):
    """Stop a diverged run with one clear line (the last checkpoint stays untouched)."""
    if not math.isfinite(value):
        raise UserError(f"{what} became {value} at step {step}; the last checkpoint is "
                        f"kept: {util.DIVERGED}")


class Run:
    """One training run's machinery, around the loop of a method file.

    - Random streams: `random(name)` (the module's docstring), saved in each checkpoint
      with torch's default stream (dropout's).
    - Resume: with settings.resume and OUT/checkpoint.pt present, every part of `state`,
      the random streams, the history and the step counter come back from the
      checkpoint (util.resume_state checks that it is this run's: same command, seed and
      settings, apart from the fields in may_change), and iterating continues where the
      run stopped.
    - `log(numbers)`: the numbers a step returned, as their means over the processes
      under torchrun (each process's are the means of its rows), shown on the progress
      line; one that is NaN or infinite stops the run. `at_checkpoint` is true at each
      `every`-th step and the last; there, once the step is logged, the means since the
      last checkpoint are in `history` ({"step": [...], name: [...]}), where the loop
      adds its evaluations (the FID before save_checkpoint, which picks best.pt by it).
    - `save_checkpoint()`: the command, seed, settings, step, history, training seconds,
      `record` and every part, written atomically by rank 0 (weights that are not finite
      are refused); when the loop measured an FID (history["fid"] at history["fid_step"])
      lower than every earlier one, the same checkpoint also as OUT/best.pt.
    - Training time leaves out evaluation, checkpoints and pictures: the clock stops at
      each checkpoint step's log and starts again when the next step begins.
    - The run's page, OUT/index.html (pages.run_page), is written when the loop's work at
      a checkpoint step (evaluation, checkpoint, pictures) is done.
    """

    def __init__(self, out, command: str, settings, seed: int, device, state: dict,
                 steps: int, every: int, may_change=(), desc: str = "",
                 record: dict | None = None):
        self.out, self.command, self.settings, self.seed = Path(out), command, settings, seed
        self.state, self.steps, self.every = state, steps, every
        self.record, self.desc = record or {}, desc or command
        self.checkpoint, self.device = self.out / "checkpoint.pt", device
        self.step_log, self.first = StepLog(), 0
        # the streams the run draws from; those of the checkpoint, None unless resumed
        self.streams, self.stored_streams = {"dropout": DefaultStream(seed)}, None
        if settings.resume and self.checkpoint.exists():
            stored = util.resume_state(self.checkpoint, device, command, settings, seed,
                                       may_change)
            for name, part in state.items():
                part.load_state_dict(stored[name])
            self.step_log = StepLog(stored["history"], stored["seconds"])
            self.first, self.stored_streams = stored["step"], stored.get("random", {})
            self._restore(self.streams["dropout"], "dropout")
            print(f"resumed from {self.checkpoint} at step {self.first}")
        self.step, self.pending = self.first, []  # the logged numbers not yet taken
        self.progress = util.Progress(desc=self.desc, total=steps, initial=self.first)

    def random(self, name: str) -> parallel.Random:
        """The training stream `name` ("data", "noise", "augment"), seeded from (seed,
        name) and saved with every checkpoint: on --resume it continues from there."""
        stream = parallel.Random(stream_seed(self.seed, name), self.device)
        self.streams[name] = stream
        if self.stored_streams is not None:
            self._restore(stream, name)
        return stream

    def _restore(self, stream, name: str):
        if name not in self.stored_streams:
            raise UserError(f"{self.checkpoint} holds no random stream '{name}' (written by "
                            "an earlier version, which drew its random numbers otherwise): "
                            "start the run again without --resume")
        stream.load_state_dict(self.stored_streams[name])

    @property
    def history(self) -> dict:
        return self.step_log.history

    @property
    def seconds(self) -> float:
        """Seconds spent training, without evaluation, checkpoints and pictures."""
        return self.step_log.seconds

    def __iter__(self):
        self.step_log.start_clock()
        for step in range(self.first, self.steps):
            self.step = step
            yield step
            if self.at_checkpoint:  # evaluation, checkpoint and pictures are done
                pages.run_page(self)  # OUT/index.html, reloading until the run ends
                self.step_log.start_clock()
        self.progress.close()

    @property
    def at_checkpoint(self) -> bool:
        """Does this step end a period of `every` steps, or the run?"""
        return (self.step + 1) % self.every == 0 or self.step + 1 == self.steps

    def log(self, numbers: dict):
        """The step's numbers ({name: number or 0-d tensor}). They stay where they are (on
        a GPU: no wait for its work to finish) until every LOG_EVERY-th step and each
        checkpoint step; then they come to the CPU at once, are averaged over the
        processes, checked (a NaN or inf stops the run, naming its step), summed and
        shown. At a checkpoint step the period's means go into the history."""
        self.pending.append({name: torch.as_tensor(value).detach()
                             for name, value in numbers.items()})
        if self.at_checkpoint or len(self.pending) == LOG_EVERY:
            self._take_pending()
        if self.at_checkpoint:
            self.step_log.commit(self.step + 1)

    def _take_pending(self):
        first = self.step + 2 - len(self.pending)  # the step number of pending[0]
        values = parallel.average({name: torch.stack([numbers[name] for numbers in
                                                      self.pending]).cpu().tolist()
                                   for name in self.pending[0]})
        for offset in range(len(self.pending)):
            numbers = {name: row[offset] for name, row in values.items()}
            for name, value in numbers.items():
                check_finite(value, first + offset, f"{self.desc} {name}")
            self.step_log.add(numbers)
        self.progress.update(len(self.pending), **{name: round(value, 4)
                                                   for name, value in numbers.items()})
        self.pending = []

    def save_checkpoint(self):
        done = self.step + 1
        state = {"command": self.command, "seed": self.seed,
                 "settings": dataclasses.asdict(self.settings), "step": done,
                 "history": self.history, "seconds": self.seconds, **self.record,
                 "random": {name: stream.state_dict() for name, stream in
                            self.streams.items()},
                 **{name: part.state_dict() for name, part in self.state.items()}}
        util.save_checkpoint(state, self.checkpoint)
        if new_best_fid(self.history, done):
            util.save_checkpoint(state, self.checkpoint.with_name("best.pt"))
        parallel.barrier()  # rank 0's checkpoint exists for every process from here on
        self.progress.note(f"{self.desc} {done}/{self.steps}: " + ", ".join(
            f"{name} {values[-1]:.4g}" for name, values in self.history.items()
            if name not in ("step", "fid_step") and values and values[-1] is not None))


def new_best_fid(history: dict, step: int) -> bool:
    """Was an FID measured at this step, lower than every earlier one? (best.pt)"""
    scores = history.get("fid")
    return bool(scores) and history["fid_step"][-1] == step and scores[-1] == min(scores)
