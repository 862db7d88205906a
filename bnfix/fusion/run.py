"""A fusion-tune run: its folder, seeds, checkpoints, metrics, resume, and the phase plan.

Layout of ``run.out_dir``::

    config.toml            the resolved config: the values used, the audio normalisation
                           included (+ versions and git state as comments)
    tensorboard/           with run.tensorboard: metrics.jsonl's scalars as TensorBoard curves
    classes.json           {"labels": {label: index}, "without_training": [labels]}
    skipped.csv            id,reason of every sample that cannot be read (only when any)
    metrics.jsonl          one JSON object per epoch and phase
    stage1/<modality>/     last.pt (full training state), best.safetensors, result.json
    stage1/confidence.json {"audio": {id: mean confidence}, "visual": {...}}
    stage2/                the same for the joint model (the configured mask rule)
    stage2-none/           with --compare: the same joint training without masks
    summary.json           final numbers

Only rank 0 writes. Every file is written atomically. A phase is *done* when its result.json
exists; a started phase resumes from its ``last.pt``, which is saved at the end of every epoch
after the epoch's metrics line and best checkpoint (so a kill between the two writes replays
that epoch, and the replay drops the orphaned metrics line).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnfix.checkpoint import load_checkpoint, save_checkpoint, write_atomic
from bnfix.errors import BnfixError, one_line
from bnfix.fusion.arms import Arm, arm_phase, parse_arms
from bnfix.fusion.config import FusionConfig, diff_configs, load_config, render_toml
from bnfix.fusion.distributed import Dist, setup, teardown
from bnfix.jsonio import dumps

if TYPE_CHECKING:  # the data side is imported when a run starts, not with this module
    from bnfix.fusion.features import FeatureSet

__all__ = ["RunDir", "derive_seed", "fusion_tune", "plan_phases"]

#: Test hook: stop the process (exit 75) after this many epochs, as a kill would.
STOP_AFTER_ENV = "_BNFIX_FUSION_STOP_AFTER"
STOPPED_EXIT = 75
KNOWN_OUTPUTS = (
    "config.toml", "classes.json", "metrics.jsonl", "summary.json", "summary.png", "stage1",
    "stage2", "ensemble", "tensorboard", "skipped.csv",
)  # fmt: skip
#: Epochs trained by this process (all seeds), for the STOP_AFTER_ENV test hook.
_EPOCHS_RUN = [0]
#: Keys that may differ when a run continues: they change where and how fast it runs, not its
#: results (on the CPU), so a run folder can be moved, or resumed with another cache or device.
NON_RESULT_KEYS = (
    "run.out_dir", "data.cache_dir", "data.workers", "data.sample_timeout", "run.device",
    "run.workers", "run.amp", "run.tensorboard",
)  # fmt: skip
#: Keys that may be left unset when continuing a run: the run's recorded values are used.
RECORDED_KEYS = ("data.audio.mean", "data.audio.std")
#: Labels printed at the start of a run; all of them are in classes.json.
SHOW_CLASSES = 20


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, phase, epoch, rank): independent streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generator"] = generator.get_state()
    state["generator_device"] = generator.device.type
    return state


def _set_rng_state(
    state: Mapping[str, Any], generator: torch.Generator, device: torch.device
) -> list[str]:
    """Restore the saved generator states that apply here; returns what was not restored.

    A run may continue on another device: the CPU states always apply, the CUDA states only
    on CUDA with as many devices, the augmentation/mask generator's only on its own kind of
    device (a CUDA generator's state is 16 bytes, a CPU one's 5056). Skipping one changes no
    result: every epoch reseeds all of them from (seed, phase, epoch, rank), and a checkpoint
    is taken between epochs.
    """
    random.setstate(_as_tuple(state["python"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    skipped = []
    cuda = state.get("cuda")
    if cuda is not None:
        here = torch.cuda.device_count() if device.type == "cuda" else 0
        if here == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            skipped.append(
                f"the CUDA generators of {len(cuda)} device(s) (this run: {here} on {device.type})"
            )
    saved, kind = state["generator"], _generator_kind(state)
    here_size = generator.get_state().numel()
    if kind == generator.device.type and saved.numel() == here_size:
        generator.set_state(saved)
    else:
        skipped.append(f"the augmentation/mask generator ({kind} state, this run's is on "
                       f"{generator.device.type})")  # fmt: skip
    return skipped


def _generator_kind(state: Mapping[str, Any]) -> str:
    """The device type of the saved augmentation/mask generator (older states lack the tag:
    a CPU generator's state has the CPU size, anything else came from an accelerator)."""
    kind = state.get("generator_device")
    if kind is not None:
        return str(kind)
    cpu_size = torch.Generator().get_state().numel()
    return "cpu" if state["generator"].numel() == cpu_size else "cuda"


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


# --------------------------------------------------------------------------------------------
# The run folder


class RunDir:
    """Files of one run, seen from one rank (only rank 0 writes)."""

    def __init__(
        self, out: Path, dist: Dist, seed: int, console: Console, *, tensorboard: bool = False
    ) -> None:
        self.out = out
        self.dist = dist
        self.seed = seed
        self.console = console
        self.tensorboard = tensorboard  # mirror metrics.jsonl into out/tensorboard/ (rank 0)
        self._tb: Any = None  # the open bnfix.fusion.tensorboard.ScalarLog
        # The augmentation stream (crops, flips); reseeded every epoch, saved and restored with
        # the rest. Masks and OGM-GE noise draw from streams of their own (``arm_generator``),
        # so that stage-2 arms of one seed share every other random number.
        self.generator = torch.Generator(device=dist.device)
        self._arm_generators: dict[str, torch.Generator] = {}
        stop = os.environ.get(STOP_AFTER_ENV, "")
        self.stop_after = int(stop) if stop.isdigit() else None

    # -- paths and results

    def phase_dir(self, phase: str) -> Path:
        return self.out / phase

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def result(self, phase: str) -> dict[str, Any] | None:
        path = self.phase_dir(phase) / "result.json"
        return json.loads(path.read_text()) if path.exists() else None

    def read_confidence(self) -> dict[str, dict[str, float]]:
        path = self.out / "stage1" / "confidence.json"
        if not path.exists():
            raise BnfixError("no stage-1 confidences (stage1/confidence.json); run stage 1", path)
        return json.loads(path.read_text())

    def read_best(self, phase: str) -> dict[str, torch.Tensor]:
        return load_checkpoint(self.phase_dir(phase) / "best.safetensors").state_dict

    # -- seeds

    def phase_seed(self, phase: str) -> int:
        """Same on every rank: the data order of each epoch is derived from it."""
        return derive_seed(self.seed, phase) % 2**31

    def seed_phase(self, phase: str) -> None:
        """Model initialisation depends on the phase alone, not on what ran before it."""
        _seed_globals(derive_seed(self.seed, phase, "init"))

    def seed_epoch(self, phase: str, epoch: int, device: torch.device) -> torch.Generator:
        """Seed the global generators and the augmentation generator for one epoch."""
        _seed_globals(derive_seed(self.seed, phase, epoch, self.dist.rank))
        self.generator.manual_seed(derive_seed(self.seed, phase, epoch, self.dist.rank, "aug"))
        return self.generator

    def arm_generator(
        self, stream: str, phase: str, epoch: int, *, per_rank: bool = True
    ) -> torch.Generator:
        """A generator of its own for one epoch of one random stream (``mask``, ``ogm-ge``).

        Drawing from it never moves the augmentation or global streams, so an arm that masks
        and one that does not see the same crops, flips and data order. ``per_rank=False``:
        the same numbers on every rank (noise added to all-reduced gradients must agree).
        """
        gen = self._arm_generators.get(stream)
        if gen is None:
            gen = self._arm_generators[stream] = torch.Generator(device=self.dist.device)
        rank = self.dist.rank if per_rank else "all"
        gen.manual_seed(derive_seed(self.seed, phase, epoch, rank, stream))
        return gen

    # -- writing (rank 0)

    def start_tensorboard(self) -> None:
        """Open the TensorBoard log (``run.tensorboard``, main rank) and write what
        metrics.jsonl holds that it lacks; call after :meth:`repair_metrics`."""
        if not (self.tensorboard and self.dist.main) or self._tb is not None:
            return
        from bnfix.fusion.tensorboard import FOLDER, ScalarLog

        records = [json.loads(line) for line in self._read_metrics()]
        self._tb = ScalarLog(self.out / FOLDER, records)

    def close(self) -> None:
        """Close the TensorBoard log, if open (every epoch is flushed already)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write_json(self, path: Path, obj: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (dumps(obj, indent=1) + "\n").encode())

    def _read_metrics(self) -> list[str]:
        return metric_lines(self.metrics)[0]

    def repair_metrics(self) -> None:
        """Drop a partial last line of metrics.jsonl (a run killed while writing it), with a
        note, so that the next line appended starts a line of its own."""
        if not self.dist.main or not self.metrics.exists():
            return
        kept, partial = metric_lines(self.metrics)
        if partial is None and self.metrics.read_bytes().endswith(b"\n"):
            return
        write_atomic(self.metrics, "".join(f"{line}\n" for line in kept).encode())
        if partial is not None:
            self.console.print(
                f"note: metrics.jsonl ended in a partial line ({len(partial)} characters, "
                "left by a run stopped while writing it); dropped it",
                highlight=False,
            )

    def trim_metrics(self, phase: str, keep_epochs: int) -> None:
        """Drop this phase's lines past ``keep_epochs`` (left by a run killed mid-epoch-end)."""
        if not self.dist.main:
            return
        lines = self._read_metrics()
        kept = []
        for line in lines:
            record = json.loads(line)
            if record.get("phase") != phase or record["epoch"] <= keep_epochs:
                kept.append(line)
        if kept != lines:
            write_atomic(self.metrics, "".join(f"{line}\n" for line in kept).encode())

    def load_state(
        self, phase: str, model: torch.nn.Module, optimizer: Any, scheduler: Any
    ) -> dict[str, Any] | None:
        """Restore a phase's last checkpoint into the objects; returns the loop state."""
        path = self.phase_dir(phase) / "last.pt"
        if not path.exists():
            self.trim_metrics(phase, 0)
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        skipped = _set_rng_state(saved["rng"], self.generator, self.dist.device)
        self.trim_metrics(phase, saved["loop"]["epoch"])
        if self.dist.main:
            self.console.print(
                f"resuming {phase} after epoch {saved['loop']['epoch']}", highlight=False
            )
            if skipped:
                self.console.print(
                    f"note: not restored: {'; '.join(skipped)}; each epoch reseeds every "
                    "generator, so the results do not depend on them",
                    highlight=False,
                )
        return dict(saved["loop"])

    def end_epoch(
        self,
        phase: str,
        record: dict[str, Any],
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        loop: dict[str, Any],
        best: dict[str, torch.Tensor] | None,
        best_meta: dict[str, str],
    ) -> None:
        """Metrics line, then best checkpoint, then the resumable state (in that order)."""
        if self.dist.main:
            folder = self.phase_dir(phase)
            folder.mkdir(parents=True, exist_ok=True)
            with open(self.metrics, "a") as fh:
                fh.write(dumps(record) + "\n")
            if self._tb is not None:  # the same record, flushed before the checkpoints
                self._tb.write(record)
            if best is not None:
                meta = {"bnfix_fusion_phase": phase, **best_meta, **_version_meta()}
                save_checkpoint(best, folder / "best.safetensors", meta, force=True)
            state = {
                "phase": phase,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(self.generator),
                "loop": loop,
                "world": self.dist.world,  # seeds and shards depend on it: resume only alike
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_atomic(folder / "last.pt", buffer.getvalue())
        _EPOCHS_RUN[0] += 1  # over every seed of the invocation
        if self.stop_after is not None and _EPOCHS_RUN[0] >= self.stop_after:
            self.dist.barrier()
            if self.dist.main:
                self.console.print(f"stopping after {_EPOCHS_RUN[0]} epochs ({STOP_AFTER_ENV})")
            sys.stdout.flush()
            os._exit(STOPPED_EXIT)

    def barrier_after_write(self) -> None:
        self.dist.barrier()

    def finish(self, phase: str, result: dict[str, Any]) -> None:
        if self.dist.main:
            self._write_json(self.phase_dir(phase) / "result.json", result)
        self.dist.barrier()

    def finish_stage1(
        self, phase: str, modality: str, result: dict[str, Any], confidence: dict[str, float]
    ) -> None:
        """Merge this modality's confidences into stage1/confidence.json, then the result."""
        if self.dist.main:
            path = self.out / "stage1" / "confidence.json"
            table = json.loads(path.read_text()) if path.exists() else {}
            table[modality] = confidence
            self._write_json(path, dict(sorted(table.items())))
        self.finish(phase, result)


# --------------------------------------------------------------------------------------------
# Versions


def _git_state(folder: Path) -> str | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (uncommitted changes)" if dirty else "")


def _version_meta() -> dict[str, str]:
    import torchvision

    from bnfix import __version__

    return {
        "bnfix": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def _header(config: FusionConfig) -> list[str]:
    versions = _version_meta()
    lines = [
        "bnfix fusion-tune resolved config (relative paths resolved; read back with --config)",
        f"seed {config.run.seed}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; python {sys.version.split()[0]}",
    ]
    git = _git_state(Path(__file__).resolve().parent)
    if git:
        lines.append(f"bnfix source git commit {git}")
    return lines


# --------------------------------------------------------------------------------------------
# Planning and checking the out_dir


def plan_phases(
    modalities: tuple[str, ...], stage: str, rule: str, arms: list[Arm] | bool
) -> list[str]:
    """Which phases this invocation runs, in order (``arms``: the ``--compare`` arms)."""
    if isinstance(arms, bool):  # the older signature: compare True/False
        arms = parse_arms(arms, rule)
    both = set(modalities) == {"audio", "visual"}
    if stage == "2" and not both:
        raise BnfixError(
            f"--stage 2 needs audio and visual; the manifest has only {', '.join(modalities)}"
        )
    if arms and not both:
        names = ",".join(a.name for a in arms)
        raise BnfixError(
            f"--compare {names} needs a manifest with both audio and visual; this one has only "
            f"{', '.join(modalities)}"
        )
    phases = [f"stage1/{m}" for m in modalities] if stage in ("1", "all") else []
    if stage in ("2", "all") and both:
        if arms:
            phases.extend(arm_phase(arm, rule) for arm in arms)
        else:
            phases.append("stage2")
    return phases


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def check_out_dir(
    config: FusionConfig,
    phases: list[str],
    stage: str,
    resume: bool,
    force: bool,
    *,
    world: int = 1,
    classes: list[str] | None = None,
) -> FusionConfig | None:
    """Refuse to clobber or to continue the wrong run, before any feature work or file write.

    Returns the config of the run being continued (``--resume``, or ``--stage 2`` on a
    finished stage 1), whose recorded values fill the keys left unset (``RECORDED_KEYS``).
    """
    out = config.run.out_dir
    if out.exists() and not out.is_dir():
        raise BnfixError("run.out_dir exists and is not a folder", out)
    saved = out / "config.toml"
    if stage == "2":  # first: stage 2 has nothing to start from without a finished stage 1
        _check_stage1_done(out)
    if resume:
        if not saved.exists():
            if not _entries(out):
                # Killed before it wrote anything, e.g. while extracting features: start it;
                # the feature stores keep every sample extracted before the kill.
                return None
            raise BnfixError("nothing to resume: no config.toml from an earlier run here", out)
        previous = _check_same_config(
            config, saved, NON_RESULT_KEYS,
            "continue a run with the config it was started with, or pass --force to start over",
        )  # fmt: skip
        _check_world(out, phases, world)
    elif stage == "2":
        # Even with --force: stage 2 starts from this stage 1's encoders and confidences, and
        # config.toml must go on describing the stage 1 that is in the folder.
        previous = _check_same_config(
            config, saved,
            (*NON_RESULT_KEYS, *_keys_of("stage2"), *_keys_of("mask"), *_keys_of("balance")),
            "stage 2 starts from the stage 1 in run.out_dir: use its stage-1 settings, or "
            "redo stage 1 (--stage 1 --force)",
        )  # fmt: skip
        started = [p for p in phases if (out / p).exists()]
        if started and not force:
            raise BnfixError(
                f"{started[0]} already exists: pass --resume to continue it or --force to "
                "redo stage 2",
                out,
            )
        stale = stale_stage2(config, previous, phases)
        if stale and not force:
            changed = ", ".join(_stage2_changes(config, previous)[:3])
            raise BnfixError(
                f"{stale[0]} was trained with other stage-2 settings than these ({changed}) "
                "and would be summarised as if it were not: pass --force to redo stage 2 "
                "(it is removed), or run with the settings in config.toml",
                out,
            )
    else:
        entries = _entries(out)
        if entries and not force:
            raise BnfixError(
                f"run.out_dir is not empty ({', '.join(entries[:3])}"
                f"{', …' if len(entries) > 3 else ''}): pass --resume to continue the run in "
                "it, or --force to start over",
                out,
            )
        return None  # a fresh start: --force clears what bnfix wrote here
    if classes is not None:
        _check_classes(out, classes)
    metric_lines(out / "metrics.jsonl")  # kept and appended to: must not be damaged
    return previous


def _stage2_changes(config: FusionConfig, previous: FusionConfig) -> list[str]:
    """The stage-2 keys (``stage2.*``, ``mask.*``, ``balance.*``) that differ from the run's."""
    keys = (*_keys_of("stage2"), *_keys_of("mask"), *_keys_of("balance"))
    return [k for k in diff_configs(config, previous) if k in keys]


def stale_stage2(
    config: FusionConfig, previous: FusionConfig | None, phases: list[str]
) -> list[str]:
    """Stage-2 results in run.out_dir that this ``--stage 2`` run does not redo although its
    stage-2 settings differ from those they were trained with: config.toml is rewritten with
    the new settings, so they would be summarised under settings they never saw."""
    if previous is None or not _stage2_changes(config, previous):
        return []
    out = config.run.out_dir
    kept = [n for n in _entries(out) if n == "stage2" or n.startswith("stage2-")]
    return [n for n in kept if n not in phases]


def _check_stage1_done(out: Path) -> None:
    stage1 = out / "stage1"
    missing = [m for m in ("audio", "visual") if not (stage1 / m / "result.json").exists()]
    missing += [p for p in ("stage1/confidence.json", "config.toml") if not (out / p).exists()]
    if missing:
        raise BnfixError(
            f"--stage 2 needs a finished stage 1 in run.out_dir (missing: {', '.join(missing)});"
            " run --stage 1 first",
            out,
        )


def _keys_of(section: str) -> tuple[str, ...]:
    from bnfix.fusion.config import SCHEMA

    return tuple(f"{section}.{k}" for k in SCHEMA[section])


def _check_same_config(
    config: FusionConfig, saved: Path, ignore: tuple[str, ...], advice: str
) -> FusionConfig:
    """The earlier run's config, if ``config`` agrees with it outside ``ignore``.

    A recorded key left unset now (the audio normalisation) takes the recorded value, so it
    is not a difference.
    """
    try:
        previous = load_config(saved)
    except BnfixError as exc:
        raise BnfixError(f"cannot read the earlier run's config: {exc}") from None
    unset = tuple(k for k in RECORDED_KEYS if _value(config, k) is None)
    differ = diff_configs(config, previous, ignore=(*ignore, *unset))
    if differ:
        raise BnfixError(
            f"the config differs from the earlier run's ({', '.join(differ[:4])}"
            f"{', …' if len(differ) > 4 else ''}); {advice}",
            saved,
        )
    return previous


def _value(config: FusionConfig, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def with_recorded(config: FusionConfig, previous: FusionConfig | None) -> FusionConfig:
    """``config`` with the keys it leaves unset that the continued run recorded (its audio
    normalisation: a continued run must see the inputs it was trained on, bit for bit)."""
    if previous is None:
        return config
    a, before = config.data.audio, previous.data.audio
    audio = replace(
        a,
        mean=before.mean if a.mean is None else a.mean,
        std=before.std if a.std is None else a.std,
    )
    return replace(config, data=replace(config.data, audio=audio))


def _procs(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def _check_world(out: Path, phases: list[str], world: int) -> None:
    """Seeds include the rank and the data shards depend on the number of processes, so a run
    resumed under another world size would silently give other results: refuse it."""
    for phase in phases:
        ran = _recorded_world(out, phase)
        if ran is not None and ran != world:
            raise BnfixError(
                f"{phase} ran with {_procs(ran)}, this resume with {_procs(world)}: seeds and "
                "data shards depend on the number of processes (batch_size is per process), "
                f"so resume it with {_procs(ran)} "
                + ("(without torchrun)" if ran == 1 else f"(torchrun --nproc-per-node {ran})"),
                out,
            )


def _recorded_world(out: Path, phase: str) -> int | None:
    """The world size a phase ran with (result.json, else last.pt); None if not recorded."""
    folder = out / phase
    try:
        if (folder / "result.json").exists():
            return json.loads((folder / "result.json").read_text()).get("world")
        if (folder / "last.pt").exists():  # mmap: the world size without reading the weights
            saved = torch.load(folder / "last.pt", map_location="cpu", weights_only=True, mmap=True)
            return saved.get("world")
    except Exception as exc:
        raise BnfixError(f"cannot read {phase}'s saved state: {one_line(exc)}", out) from None
    return None


def class_table(features: FeatureSet) -> dict[str, Any]:
    """Label -> index (dense, as the heads use them) and the labels without training rows."""
    train = features.labels[features.indices("train")]
    counts = torch.bincount(train, minlength=len(features.classes)).tolist()
    return {
        "labels": {label: i for i, label in enumerate(features.classes)},
        "without_training": [c for c, n in zip(features.classes, counts, strict=True) if n == 0],
    }


def _check_classes(out: Path, classes: list[str]) -> None:
    """A continued run's heads and confidences use the recorded label -> index map."""
    path = out / "classes.json"
    if not path.exists():  # a run folder from before classes were recorded
        return
    try:
        recorded = list(json.loads(path.read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BnfixError(f"cannot read the earlier run's classes: {one_line(exc)}", path) from None
    if recorded != classes:
        only = [c for c in recorded if c not in classes] + [c for c in classes if c not in recorded]
        example = f"label {only[0]!r} in one only" if only else "the same labels, other indices"
        raise BnfixError(
            f"the manifest's classes differ from the earlier run's ({len(recorded)} recorded, "
            f"{len(classes)} now; {example}); continue a run with the data it was started with",
            path,
        )


def metric_lines(path: Path) -> tuple[list[str], str | None]:
    """metrics.jsonl's records (lines), and a partial last line if a kill left one.

    A write cut short can only leave the *last* line incomplete; an unreadable line anywhere
    else means the file was damaged, and is refused rather than guessed around.
    """
    if not path.exists():
        return [], None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise BnfixError(f"cannot read: {one_line(exc)}", path) from None
    filled = [i for i, line in enumerate(lines) if line.strip()]
    kept = []
    for i in filled:
        if _is_record(lines[i]):
            kept.append(lines[i])
        elif i == filled[-1]:
            return kept, lines[i]
        else:
            raise BnfixError(
                f"line {i + 1} is not a metrics record, and not the last line (which a stopped "
                "run may leave cut short): the file is damaged; repair or delete it",
                path,
            )
    return kept, None


def _is_record(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "phase" in record and "epoch" in record


def is_output(name: str) -> bool:
    """A name bnfix writes in a run folder (what --force may delete)."""
    return (
        name in KNOWN_OUTPUTS
        or name.startswith("stage2-")
        or (name.startswith("seed-") and name[5:].isdigit())
    )


def _clear(config: FusionConfig, phases: list[str], stage: str) -> None:
    """--force: remove what bnfix wrote (never anything else) for the phases about to run."""
    out = config.run.out_dir
    # Stage 2 alone keeps stage 1's outputs; its TensorBoard log goes (points cannot be taken
    # out of event files) and is rebuilt from the metrics.jsonl lines that stay.
    names = [n for n in _entries(out) if is_output(n)] if stage != "2" else [*phases, "tensorboard"]
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if stage == "2" and (out / "metrics.jsonl").exists():
        lines, _ = metric_lines(out / "metrics.jsonl")
        kept = [line for line in lines if json.loads(line).get("phase") not in phases]
        write_atomic(out / "metrics.jsonl", "".join(f"{x}\n" for x in kept).encode())


# --------------------------------------------------------------------------------------------
# The run


def fusion_tune(
    config: FusionConfig,
    *,
    stage: str = "all",
    resume: bool = False,
    force: bool = False,
    compare: bool | str | list[str] = False,
    console: Console | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Run the planned phases; returns the summary (also written to summary.json).

    ``compare``: True for ``none`` and the configured rule, or a list of arms (a list or a
    comma-separated string, see :mod:`bnfix.fusion.arms`). With ``run.seeds`` the whole
    configuration runs once per seed in ``out_dir/seed-<k>/`` and the top-level summary holds
    the statistics over seeds. ``plot``: write ``summary.png`` when matplotlib is installed.

    Works alone or under ``torchrun`` (one call per process). Everything that can fail on bad
    input is checked before the first file is written in ``run.out_dir``.
    """
    from bnfix.fusion.manifest import read_manifest

    if resume and force:
        raise BnfixError("--resume and --force contradict each other; pass one")
    if config.run.tensorboard:
        from bnfix.fusion.tensorboard import require

        require()
    arms = parse_arms(compare, config.mask.rule)
    manifest = read_manifest(config.manifest)
    # A bare --compare trains the configured rule first (stage2/), then none, as it always
    # did; a list of arms trains them in its order. Tables show the arms in --compare order.
    phases = plan_phases(manifest.modalities, stage, config.mask.rule, arms)
    if compare is True:  # stable: stage 1, then stage2/, then stage2-none/
        phases.sort(key=lambda p: (not p.startswith("stage1/"), p != "stage2"))
    _EPOCHS_RUN[0] = 0
    d = setup(config.run.device)
    try:
        console = console or Console()
        if not d.main:
            console = Console(quiet=True)
        if config.run.seeds is None:
            return _run(config, manifest, phases, arms, stage, resume, force, d, console, plot)
        return _run_seeds(config, manifest, phases, arms, stage, resume, force, d, console, plot)
    finally:
        teardown(d)


@dataclass
class _Job:
    """One seed's run, checked: its config (recorded values filled in) and how it starts."""

    config: FusionConfig
    previous: FusionConfig | None
    computed: list[str]
    resume: bool
    force: bool
    stale: list[str]  # stage-2 results that --force removes besides the planned phases


def _check(
    config: FusionConfig, manifest: Any, phases: list[str], stage: str, resume: bool,
    force: bool, d: Dist,
) -> _Job:  # fmt: skip
    previous = check_out_dir(
        config, phases, stage, resume, force, world=d.world, classes=manifest.classes
    )
    computed = _computed_stats(config, previous)
    stale = stale_stage2(config, previous, phases) if stage == "2" and not resume else []
    return _Job(with_recorded(config, previous), previous, computed, resume, force, stale)


def _make_out_dir(out: Path, d: Dist) -> None:
    """An out_dir that cannot be made fails now, not after the features are computed."""
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BnfixError(
                f"run.out_dir: cannot create the folder ({exc.strerror or exc})", out
            ) from None
    d.barrier()  # every rank has checked before rank 0 writes anything


def _check_models(config: FusionConfig, manifest: Any, phases: list[str], arms: list[Arm]) -> None:
    """Everything about the models that can refuse the config, before out_dir or the feature
    cache exists: each encoder is built once on a zero input of the configured shape (the
    architecture exists, the init checkpoint reads, its metadata names no code to import, its
    weights fit, the input fits), and the mask settings the planned stage-2 arms use fit. The
    feature options are built too: they check how the data keys combine."""
    from bnfix.fusion import masking
    from bnfix.fusion.model import build_encoder

    try:
        feature_options(config)
    except BnfixError as e:  # how the data keys combine: say which file holds them
        raise BnfixError(str(e), None if e.path else config.source) from None
    a, v = config.data.audio, config.data.visual
    shapes = {"audio": (1, a.target_frames, a.mel_bins), "visual": (3, v.size, v.size)}
    for modality in manifest.modalities:
        build_encoder(
            modality, config.model.arch(modality), config.model.init(modality), shapes[modality],
            frames=v.frames,
        )  # fmt: skip
    m = config.mask
    by_phase = {arm_phase(arm, m.rule): arm for arm in arms}
    rules = [
        by_phase[p].rule if p in by_phase else m.rule
        for p in phases
        if p.startswith("stage2") and not (p in by_phase and by_phase[p].ensemble)
    ]
    if all(rule == "none" for rule in rules):
        return
    masking.check_parameters(m.tau, m.eta, m.rho)
    audio_input = "the audio input, data.audio.target_frames x data.audio.mel_bins"
    masking.check_patch(m.audio_patch, (a.target_frames, a.mel_bins), "mask.audio_patch",
                        audio_input)  # fmt: skip
    masking.check_patch(m.visual_patch, (v.size, v.size), "mask.visual_patch",
                        "the visual crop, data.visual.size")  # fmt: skip


def _load(config: FusionConfig, manifest: Any, d: Dist, console: Console) -> FeatureSet:
    """The features (rank 0 fills the stores); :func:`_check_models` has run."""
    from bnfix.fusion.features import load_features

    audio, visual = feature_options(config)
    features = None
    for turn in ("main", "others"):  # rank 0 fills the stores; the others then map them
        if (turn == "main") == d.main:
            features = load_features(
                manifest, audio, visual, config.data.cache_dir, console,
                workers=config.data.workers, sample_timeout=config.data.sample_timeout,
            )  # fmt: skip
        d.barrier()
    assert features is not None
    if d.main:
        _write_skipped(config.run.out_dir / "skipped.csv", features.skipped, console)
    return features


def _write_skipped(path: Path, skipped: list[tuple[str, str]], console: Console) -> None:
    """Every unreadable sample with its reason, for a dataset where the console shows only
    the first few; a run that now reads them all removes an older list."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "reason"])
    writer.writerows(skipped)
    write_atomic(path, text.getvalue().encode())
    console.print(f"  all {len(skipped)} listed in {path}", highlight=False)


def feature_options(config: FusionConfig) -> tuple[Any, Any]:
    """The ``AudioOptions`` and ``VisualOptions`` the config's ``data.audio`` and
    ``data.visual`` sections describe: what the run extracts and reads."""
    from bnfix.fusion.features import VisualOptions
    from bnfix.probe_audio import AudioOptions

    a = config.data.audio
    audio = AudioOptions(
        sample_rate=a.sample_rate,
        num_mel_bins=a.mel_bins,
        target_frames=a.target_frames,
        mean=a.mean,
        std=a.std,
    )
    return audio, VisualOptions(**asdict(config.data.visual))  # the same fields, checked again


def _run(
    config: FusionConfig, manifest: Any, phases: list[str], arms: list[Arm], stage: str,
    resume: bool, force: bool, d: Dist, console: Console, plot: bool,
) -> dict[str, Any]:  # fmt: skip
    job = _check(config, manifest, phases, stage, resume, force, d)
    _check_models(job.config, manifest, phases, arms)
    _make_out_dir(job.config.run.out_dir, d)
    features = _load(job.config, manifest, d, console)
    summary = _run_phases(job, features, phases, arms, stage, d, console)
    if d.main:
        if "compare" in summary:
            print_compare(console, summary["compare"], bare=_is_bare(arms, config))
        if plot and _has_stage2(summary):
            _plot(job.config.run.out_dir, console)
        console.print(f"wrote {job.config.run.out_dir}", highlight=False, markup=False)
    return summary


def _is_bare(arms: list[Arm], config: FusionConfig) -> bool:
    return [a.name for a in arms] == [a.name for a in parse_arms(True, config.mask.rule)]


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def _seed_config(config: FusionConfig, seed: int) -> FusionConfig:
    """One seed's run: its own folder, ``run.seed`` = the seed, no seed list."""
    run = replace(config.run, seed=seed, seeds=None, out_dir=seed_dir(config.run.out_dir, seed))
    return replace(config, run=run)


def _check_top(config: FusionConfig, stage: str, resume: bool, force: bool) -> None:
    """The multi-seed folder itself: not clobbered, continued only as the same configuration
    (the seed list may grow: the seeds run so far are kept, new ones start)."""
    out = config.run.out_dir
    if out.exists() and not out.is_dir():
        raise BnfixError("run.out_dir exists and is not a folder", out)
    saved = out / "config.toml"
    if not resume and stage != "2":
        entries = _entries(out)
        if entries and not force:
            raise BnfixError(
                f"run.out_dir is not empty ({', '.join(entries[:3])}"
                f"{', …' if len(entries) > 3 else ''}): pass --resume to continue the run in "
                "it, or --force to start over",
                out,
            )
        return
    if not saved.exists():
        if stage == "2":
            raise BnfixError(
                "--stage 2 needs a finished stage 1 in run.out_dir (missing: config.toml); run "
                "--stage 1 first",
                out,
            )
        if not _entries(out):
            return  # killed before it wrote anything (see check_out_dir): start it
        raise BnfixError("nothing to resume: no config.toml from an earlier run here", out)
    try:
        previous = load_config(saved)
    except BnfixError as exc:
        raise BnfixError(f"cannot read the earlier run's config: {exc}") from None
    if previous.run.seeds is None:
        raise BnfixError(
            "run.out_dir holds a single-seed run (its config.toml has no run.seeds): continue "
            "it without run.seeds, or use another run.out_dir for several seeds",
            out,
        )
    ignore = (*NON_RESULT_KEYS, "run.seed", "run.seeds")
    if stage == "2" and not resume:
        ignore = (*ignore, *_keys_of("stage2"), *_keys_of("mask"), *_keys_of("balance"))
    _check_same_config(
        config, saved, ignore,
        "continue a run with the config it was started with, or pass --force to start over",
    )  # fmt: skip


def _run_seeds(
    config: FusionConfig, manifest: Any, phases: list[str], arms: list[Arm], stage: str,
    resume: bool, force: bool, d: Dist, console: Console, plot: bool,
) -> dict[str, Any]:  # fmt: skip
    """Each seed in ``out_dir/seed-<k>/`` (resumable as one run), then the statistics."""
    out = config.run.out_dir
    seeds = list(config.run.seeds or ())
    _check_top(config, stage, resume, force)
    jobs = []
    for seed in seeds:
        sub = _seed_config(config, seed)
        # --resume continues the seeds that started and starts the others (a grown seed list)
        started = (sub.run.out_dir / "config.toml").exists()
        jobs.append(_check(sub, manifest, phases, stage, resume and started, force, d))
    recorded = next((j.config for j in jobs if j.previous is not None), config)
    _check_models(recorded, manifest, phases, arms)
    _make_out_dir(out, d)
    features = _load(recorded, manifest, d, console)
    if d.main:
        if force and stage != "2":
            for name in [n for n in _entries(out) if is_output(n)]:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        norm = normalisation(features)
        top = _resolved(with_recorded(config, recorded), features)
        header = _header(top) + _normalisation_note(norm, jobs[0].computed)
        write_atomic(out / "config.toml", render_toml(top, header).encode())
        console.print(
            f"fusion-tune: seeds {', '.join(map(str, seeds))}, each in {out}/seed-<k>/",
            highlight=False,
        )
    d.barrier()
    runs = {}
    for seed, job in zip(seeds, jobs, strict=True):
        if d.main:
            console.rule(f"seed {seed}")
        runs[seed] = _run_phases(job, features, phases, arms, stage, d, console)
    summary = aggregate(runs, [a.name for a in arms])
    if d.main:
        write_atomic(out / "summary.json", (dumps(summary, indent=1) + "\n").encode())
        print_seed_stats(console, summary, [a.name for a in arms])
        if plot and _has_stage2(summary.get("stats", {})):
            _plot(out, console)
        console.print(f"wrote {out}", highlight=False, markup=False)
    d.barrier()
    return summary


def _has_stage2(summary: Mapping[str, Any]) -> bool:
    """summary.png shows stage 2 and its arms: a stage-1-only run has nothing to draw."""
    return "stage2" in summary or "compare" in summary


def _run_phases(
    job: _Job, features: FeatureSet, phases: list[str], arms: list[Arm], stage: str, d: Dist,
    console: Console,
) -> dict[str, Any]:  # fmt: skip
    """One seed's phases in its folder; returns its summary (also its summary.json)."""
    from bnfix.fusion.stages import Context, run_ensemble, run_stage1, run_stage2

    config = _resolved(job.config, features)
    norm = normalisation(features)
    classes = class_table(features)
    out = config.run.out_dir
    rundir = RunDir(out, d, config.run.seed, console, tensorboard=config.run.tensorboard)
    if d.main:
        if job.force:
            _clear(config, [*phases, *job.stale], stage)
        out.mkdir(parents=True, exist_ok=True)
        rundir.repair_metrics()
        rundir.start_tensorboard()
        header = _header(config) + _normalisation_note(norm, job.computed)
        write_atomic(out / "config.toml", render_toml(config, header).encode())
        rundir._write_json(out / "classes.json", classes)
        _describe(console, config, features, phases, d)
        _print_classes(console, classes)
    d.barrier()
    ctx = Context(config, features, d, console, rundir, resume=job.resume)
    by_phase = {arm_phase(arm, config.mask.rule): arm for arm in arms}
    try:
        for phase in phases:
            if phase.startswith("stage1/"):
                run_stage1(ctx, phase.removeprefix("stage1/"))
            elif phase in by_phase and by_phase[phase].ensemble:
                run_ensemble(ctx, phase)
            else:
                arm = by_phase.get(phase) or parse_arms([config.mask.rule], "")[0]
                run_stage2(ctx, arm, phase)
    finally:
        rundir.close()
    summary: dict[str, Any] = {"classes": classes}
    if norm:
        summary["audio_normalisation"] = norm
    summary.update(summarise(rundir, config.mask.rule, arms))
    if d.main:
        rundir._write_json(out / "summary.json", summary)
    return summary


def _resolved(config: FusionConfig, features: FeatureSet) -> FusionConfig:
    """The config with the values actually used: the audio mean/std the features applied."""
    if features.audio_mean is None:
        return config
    audio = replace(config.data.audio, mean=features.audio_mean, std=features.audio_std)
    return replace(config, data=replace(config.data, audio=audio))


def normalisation(features: FeatureSet) -> dict[str, Any]:
    """The audio normalisation the features applied (empty without audio): set in the config,
    else computed from the training split (by this run, or by the run it continues)."""
    if features.audio_mean is None:
        return {}
    return {
        "mean": features.audio_mean,
        "std": features.audio_std,
        "formula": "(fbank - mean) / (2 * std)",
    }


NORMALISATION_NOTE = "audio inputs normalised as (fbank - mean) / (2 std)"


def _computed_stats(config: FusionConfig, previous: FusionConfig | None) -> list[str]:
    """Which of data.audio.mean/std come from the training split rather than a config: unset
    now and, in a continued run, computed by the earlier run too (its config.toml says so)."""
    unset = [k for k in ("mean", "std") if getattr(config.data.audio, k) is None]
    if previous is None:
        return unset
    note = next(
        (line for line in _saved_header(config.run.out_dir) if NORMALISATION_NOTE in line), ""
    )
    return [k for k in unset if getattr(previous.data.audio, k) is None or f".{k}" in note]


def _saved_header(out: Path) -> list[str]:
    path = out / "config.toml"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [line for line in lines if line.startswith("#")]


def _normalisation_note(norm: dict[str, Any], computed: list[str]) -> list[str]:
    """A config.toml comment: the audio normalisation applied, and which values were computed."""
    if not norm:
        return []
    keys = " and ".join(f"data.audio.{k}" for k in computed)
    return [NORMALISATION_NOTE + (f"; {keys} from the training split" if computed else "")]


def _describe(
    console: Console, config: FusionConfig, features: Any, phases: list[str], d: Dist
) -> None:
    counts = {s: features.splits.count(s) for s in ("train", "val", "test")}
    console.print(
        f"fusion-tune: {len(features.ids)} samples ({counts['train']} train, {counts['val']} "
        f"val, {counts['test']} test), {len(features.classes)} classes; phases "
        f"{', '.join(phases)}; device {d.device}" + (f" x {d.world} processes" if d.active else ""),
        highlight=False,
    )


def _print_classes(console: Console, classes: dict[str, Any]) -> None:
    """The label -> index map (the heads' outputs), and a warning for untrainable classes."""
    labels = list(classes["labels"].items())
    shown = ", ".join(f"{escape(label)}→{i}" for label, i in labels[:SHOW_CLASSES])
    more = f", … (all {len(labels)} in classes.json)" if len(labels) > SHOW_CLASSES else ""
    console.print(f"classes (label→index): {shown}{more}", highlight=False)
    untrained = classes["without_training"]
    if untrained:
        names = ", ".join(escape(c) for c in untrained[:SHOW_CLASSES])
        console.print(
            f"[yellow]warning:[/] {len(untrained)} class(es) with no training rows, which no "
            f"model can learn (their val/test samples count as errors): {names}"
            + (", …" if len(untrained) > SHOW_CLASSES else ""),
            highlight=False,
        )


def _arm_summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("val", "test", "probe", "mask", "contribution", "ogm")
    return {k: result[k] for k in keys if k in result}


def summarise(rundir: RunDir, rule: str, arms: list[Arm] | None = None) -> dict[str, Any]:
    """summary.json from the finished phases' results (``compare``: the requested arms)."""
    summary: dict[str, Any] = {"stage1": {}}
    for modality in ("audio", "visual"):
        result = rundir.result(f"stage1/{modality}")
        if result is not None:
            summary["stage1"][modality] = {"val": result["val"], "test": result["test"]}
    main = rundir.result("stage2")
    if main is not None:
        summary["stage2"] = {
            k: v for k, v in _arm_summary(main).items() if k not in ("mask", "ogm")
        }
        summary["mask"] = main["mask"]
    compare = {}
    for arm in arms or ():
        result = rundir.result(arm_phase(arm, rule))
        if result is not None:
            compare[arm.name] = _arm_summary(result)
    if compare:
        summary["compare"] = compare
    summary["versions"] = _version_meta()
    return summary


#: summary keys that describe the run rather than measure it (left out of the statistics).
NOT_MEASURED = ("classes", "versions", "audio_normalisation")


def aggregate(runs: dict[int, dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The multi-seed summary: ``seeds``, ``runs`` (seed -> its summary), ``stats`` (every
    number -> {mean, std, ci95, n} over seeds), ``paired`` (each arm minus the first arm)."""
    from bnfix.fusion.stats import paired, stats_tree

    seeds = list(runs)
    first = runs[seeds[0]]
    measured = [{k: v for k, v in run.items() if k not in NOT_MEASURED} for run in runs.values()]
    summary: dict[str, Any] = {
        "seeds": seeds,
        "arms": arms,
        "classes": first["classes"],
    }
    if "audio_normalisation" in first:
        summary["audio_normalisation"] = first["audio_normalisation"]
    summary["runs"] = {str(seed): run for seed, run in runs.items()}
    summary["stats"] = stats_tree(measured) or {}
    if len(arms) >= 2:
        summary["paired"] = paired([run.get("compare", {}) for run in runs.values()], arms)
    summary["versions"] = _version_meta()
    return summary


def _arm_header(name: str) -> str:
    from bnfix.fusion.arms import MASK_RULES

    return f"rule {name}" if name in MASK_RULES else name


COMPARE_ROWS = (
    ("fused", ("test", "fused")),
    ("audio-only (fusion head)", ("test", "audio")),
    ("visual-only (fusion head)", ("test", "visual")),
    ("linear probe, audio encoder", ("probe", "audio")),
    ("linear probe, visual encoder", ("probe", "visual")),
    ("Shapley share of audio (test)", ("contribution", "test", "share_audio")),
)


def _dig(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def print_compare(console: Console, compare: dict[str, Any], bare: bool = True) -> None:
    """The stage-2 arms of one seed, side by side."""
    arms = list(compare)
    title = (
        "stage 2: plain joint training vs masked (test accuracy)"
        if bare
        else "stage-2 arms from one stage 1 (test accuracy)"
    )
    table = Table(title=title)
    table.add_column("")
    for arm in arms:
        table.add_column(_arm_header(arm), justify="right")
    for name, path in COMPARE_ROWS:
        values = [_dig(compare[arm], path) for arm in arms]
        if all(v is None for v in values) and path[0] == "contribution":
            continue
        table.add_row(name, *(_pct(v) for v in values))
    table.add_row(
        "samples masked (audio / visual)",
        *(
            f"{compare[r]['mask']['audio_masked_fraction']:.0%} / "
            f"{compare[r]['mask']['visual_masked_fraction']:.0%}"
            for r in arms
        ),
    )
    console.print(table)


def _pm(stats: Any, seeds: int) -> str:
    """mean ± half-width of the 95% interval, in percent points; the count of seeds it is
    over when some seeds have no value (a Shapley share where φa + φv = 0), since the table's
    title says all ``seeds``."""
    if not isinstance(stats, Mapping) or stats.get("mean") is None:
        return "n/a"
    mean = 100 * stats["mean"]
    fewer = f" (n={stats['n']} of {seeds})" if stats.get("n", seeds) < seeds else ""
    if not stats.get("ci95"):
        return f"{mean:.1f}%{fewer}"
    half = 100 * (stats["ci95"][1] - stats["ci95"][0]) / 2
    return f"{mean:.1f} ± {half:.1f}%{fewer}"


def _diff(stats: Mapping[str, Any]) -> str:
    if stats.get("mean") is None:
        return "n/a"
    text = f"{100 * stats['mean']:+.1f}"
    if stats.get("ci95"):
        lo, hi = stats["ci95"]
        text += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return text + f" {stats['wins']}W/{stats['losses']}L"


def print_seed_stats(console: Console, summary: dict[str, Any], arms: list[str]) -> None:
    """Means ± 95% Student-t half-widths over seeds; with arms, the paired differences too."""
    stats, n = summary["stats"], len(summary["seeds"])
    over = f"mean ± 95% interval over {n} seed{'s' if n != 1 else ''}"
    compare = stats.get("compare") or {}
    if compare:
        table = Table(title=f"stage-2 arms, test accuracy ({over})")
        table.add_column("")
        for arm in compare:
            table.add_column(_arm_header(arm), justify="right")
        for name, path in COMPARE_ROWS:
            values = [_dig(compare[arm], path) for arm in compare]
            if all(v is None for v in values) and path[0] == "contribution":
                continue
            table.add_row(name, *(_pm(v, n) for v in values))
        console.print(table)
    else:
        table = Table(title=f"test accuracy ({over})")
        table.add_column("")
        table.add_column("", justify="right")
        for name, path in (
            ("stage 1 audio", ("stage1", "audio", "test")),
            ("stage 1 visual", ("stage1", "visual", "test")),
            ("stage 2 fused", ("stage2", "test", "fused")),
            ("stage 2 audio-only (fusion head)", ("stage2", "test", "audio")),
            ("stage 2 visual-only (fusion head)", ("stage2", "test", "visual")),
            ("linear probe, audio encoder", ("stage2", "probe", "audio")),
            ("linear probe, visual encoder", ("stage2", "probe", "visual")),
        ):
            value = _dig(stats, path)
            if value is not None:
                table.add_row(name, _pm(value, n))
        console.print(table)
    pairs = summary.get("paired") or {}
    if pairs:
        table = Table(
            title=f"paired differences vs {arms[0]} (points; mean [95% interval], seeds won/lost)"
        )
        table.add_column("")
        for pair in pairs:
            table.add_column(pair, justify="right")
        first = next(iter(pairs.values()))
        for metric in first:
            table.add_row(metric, *(_diff(pairs[p][metric]) for p in pairs))
        console.print(table)


def _plot(out: Path, console: Console) -> None:
    """summary.png when matplotlib (the ``plot`` extra) is installed; a note otherwise."""
    try:
        from bnfix.fusion.plot import plot_run
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("matplotlib"):
            console.print(
                "note: matplotlib is not installed, so no summary.png (pip install "
                "'bnfix[plot]'; then bnfix fusion-tune --plot-only OUT_DIR)",
                highlight=False,
            )
            return
        raise
    try:
        path = plot_run(out)
    except Exception as exc:  # a finished run is never failed by its picture
        console.print(
            f"[yellow]warning:[/] could not draw summary.png ({escape(one_line(exc))}); "
            "retry with bnfix fusion-tune --plot-only OUT_DIR",
            highlight=False,
        )
        return
    console.print(f"plot: {path}", highlight=False)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
