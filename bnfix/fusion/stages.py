"""The two FusT recipes: stage 1 (one encoder + linear head per modality) and stage 2 (joint).

A recipe owns the epoch loop of one *phase* (``stage1/audio``, ``stage1/visual``, ``stage2``,
or ``stage2-none`` under ``--compare``): build the model, restore a saved state when resuming,
train, evaluate, record. Files, seeds and checkpoints are :mod:`bnfix.fusion.run`'s business
(the ``RunDir``), the process group :mod:`bnfix.fusion.distributed`'s.

Everything random in an epoch is drawn from streams seeded by (run seed, phase, epoch, rank):
the data order (``DistributedSampler``), the crop/flip/mask generator, and torch's, numpy's and
Python's global generators. A run resumed from the checkpoint of epoch k therefore replays
epoch k+1 exactly as the uninterrupted run did.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from bnfix.errors import BnfixError
from bnfix.fusion import augment, balance, masking
from bnfix.fusion.arms import Arm
from bnfix.fusion.config import FusionConfig, StageConfig
from bnfix.fusion.distributed import Dist, EpochBatches
from bnfix.fusion.features import FeatureSet
from bnfix.fusion.model import (
    Encoder,
    FusionModel,
    UniModal,
    build_encoder,
    export_stage1,
    export_stage2,
    load_stage1_encoder,
)

__all__ = ["STAGE2", "Context", "contribution", "input_meta", "run_ensemble", "run_stage1",
           "run_stage2"]  # fmt: skip

#: The name stage-2 arms seed their shared random streams from (the configured rule's phase).
STAGE2 = "stage2"


# --------------------------------------------------------------------------------------------
# What a recipe needs


@dataclass
class Context:
    """Everything shared by the phases of one run."""

    config: FusionConfig
    features: FeatureSet
    dist: Dist
    console: Console
    rundir: Any  # bnfix.fusion.run.RunDir (typed loosely: run imports this module)
    resume: bool = False
    positions: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            self.positions[split] = self.features.indices(split)

    @property
    def classes(self) -> int:
        return len(self.features.classes)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda and self.config.run.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """One sample as the backbone sees it: [C, H, W]."""
        if modality == "audio":
            a = self.config.data.audio
            return (1, a.target_frames, a.mel_bins)
        size = self.config.data.visual.size
        return (3, size, size)


# --------------------------------------------------------------------------------------------
# Data


class _Rows(Dataset):
    """A batch of the stored features, gathered at once (``__getitems__``).

    Only the batch's rows are read from the memory-mapped stores. With ``sampling = "random"``
    a training batch (an :class:`~bnfix.fusion.distributed.EpochBatch`, which carries its seed
    and epoch) reads one frame per segment, drawn by :func:`segment_picks` from (seed, epoch,
    sample): the same in DataLoader workers, on every rank and after a resume, and nothing but
    the T picked frames is read. Evaluation batches (plain lists) read each segment's middle.
    """

    def __init__(self, features: FeatureSet, modalities: tuple[str, ...]) -> None:
        self.labels = features.labels
        self.audio = features.audio if "audio" in modalities else None
        self.visual = features.visual if "visual" in modalities else None
        self.options = features.visual_options
        self.counts = features.visual_frames
        self.aspect = features.visual_aspect

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(list(indices), dtype=torch.int64)
        batch = {"index": i, "label": self.labels[i]}
        if self.audio is not None:
            batch["audio"] = self.audio[i]
        if self.visual is not None:
            assert self.options is not None and self.counts is not None
            if self.options.sampling == "random":
                picks = segment_picks(
                    self.counts[i], self.options.frames, getattr(indices, "seed", None),
                    getattr(indices, "epoch", 0), i,
                )  # fmt: skip
                batch["visual"] = self.visual.take(i, picks)
            else:
                batch["visual"] = self.visual[i]
            if self.options.whole:
                assert self.aspect is not None
                batch["aspect"] = self.aspect[i]
        return batch


def segment_picks(
    counts: Tensor, segments: int, seed: int | None, epoch: int, samples: Tensor
) -> Tensor:
    """``[B, segments]`` frame indices: one per equal segment of each sample's ``counts[b]``
    stored frames, uniformly at random given (seed, epoch, sample), or the segment's middle
    when ``seed`` is None (evaluation). A counter-based hash (splitmix64), not a generator:
    any process can draw any sample's picks without replaying a stream."""
    counts = counts.to(torch.int64)[:, None]
    k = torch.arange(segments, dtype=torch.int64)[None, :]
    start = k * counts // segments
    length = torch.clamp((k + 1) * counts // segments - start, min=1)
    if seed is None:
        offset = length // 2
    else:
        with np.errstate(over="ignore"):
            word = (
                np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
                + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9)
                + samples.numpy().astype(np.uint64)[:, None] * np.uint64(0x94D049BB133111EB)
                + k.numpy().astype(np.uint64)
            )
        offset = torch.from_numpy((_splitmix64(word) >> np.uint64(11)).astype(np.int64)) % length
    return torch.minimum(start + offset, counts - 1).clamp(min=0)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _whole_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch


def loader_workers(configured: int | None, cuda: bool, world: int) -> int:
    """``run.workers``, or its default: none on the CPU, where a worker's reads and collation
    would take a core from the step; on CUDA up to 4 per process, from this process's share of
    the cores, so reading rows (~20 ms per batch of 32 at the paper's shapes) overlaps the step.
    """
    if configured is not None:
        return configured
    if not cuda:
        return 0
    from bnfix.fusion.extract import default_workers

    return max(1, min(4, default_workers() // max(1, world) - 1))


def _loader(ctx: Context, batches: EpochBatches, modalities: tuple[str, ...]) -> DataLoader:
    workers = loader_workers(ctx.config.run.workers, ctx.cuda, ctx.dist.world)
    return DataLoader(
        _Rows(ctx.features, modalities),
        batch_sampler=batches,
        collate_fn=_whole_batch,
        num_workers=workers,
        pin_memory=ctx.cuda,
        persistent_workers=workers > 0,
    )


def _inputs(
    ctx: Context, batch: dict[str, Tensor], modality: str, train: bool, gen: torch.Generator | None
) -> Tensor:
    """A batch of one modality, on the device, ready for the encoder (augmented when training)."""
    x = batch[modality].to(ctx.device, non_blocking=True)
    if modality == "visual":
        opts = ctx.features.visual_options
        if opts is not None and opts.whole:
            x = augment.visual_whole_batch(
                x, batch["aspect"], opts.size, train, gen, opts.crop, opts.eval_resize
            )
        else:
            x = augment.visual_batch(x, ctx.config.data.visual.size, train, gen)
    return x


def _eval_batches(ctx: Context, split: str, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """This rank's share of a split, in order (no padding: counts are summed over ranks)."""
    positions = ctx.positions[split][ctx.dist.rank :: ctx.dist.world]
    rows = _Rows(ctx.features, ("audio", "visual"))
    for start in range(0, len(positions), batch_size):
        yield rows.__getitems__(positions[start : start + batch_size].tolist())


# --------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(params: Any, cfg: StageConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: StageConfig) -> Any:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _prepare(ctx: Context, model: nn.Module) -> nn.Module:
    model.to(ctx.device)
    if ctx.cuda:  # channels-last weights and inputs: 4-D for 2-D encoders, 5-D for 3-D ones
        for module in model.modules():
            if isinstance(module, Encoder):
                module.to_channels_last()
    return model


# --------------------------------------------------------------------------------------------
# Progress


class _Bar:
    """A rich progress bar with samples/s on the main rank; nothing elsewhere."""

    def __init__(self, ctx: Context, label: str, total: int) -> None:
        """``total``: samples of the whole epoch, all ranks together."""
        self.progress: Progress | None = None
        if ctx.dist.main and ctx.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=ctx.console,
                transient=True,
            )
            self.task = self.progress.add_task(label, total=total, rate="")
        self.world = ctx.dist.world
        self.start = time.perf_counter()
        self.done = 0

    def __enter__(self) -> _Bar:
        if self.progress:
            self.progress.start()
        return self

    def advance(self, samples: int) -> None:
        self.done += samples * self.world
        if self.progress:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.progress.update(self.task, advance=samples * self.world, rate=f"{rate:.0f}/s")

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()


# --------------------------------------------------------------------------------------------
# Stage 1


def _confidences(
    ctx: Context, positions: Tensor, probs: Tensor, train: Tensor
) -> tuple[Tensor, int, int]:
    """This epoch's true-class probability per sample position, gathered over ranks.

    Every rank holds the same number of entries (the sampler pads), so a plain all-gather
    works; a padded repeat of a sample counts once (its first occurrence). Returns the
    probabilities (NaN where unseen), the number of distinct training samples recorded, and
    the number of repeats dropped.
    """
    all_pos = ctx.dist.gather(positions)
    all_prob = ctx.dist.gather(probs)
    epoch = torch.full((len(ctx.features.labels),), float("nan"), dtype=torch.float64)
    order = torch.arange(len(all_pos) - 1, -1, -1)  # write last first: the first write wins
    epoch[all_pos[order]] = all_prob[order].double()
    seen = int(torch.isfinite(epoch[train]).sum())
    if seen != len(train):
        raise RuntimeError(f"confidence recorded for {seen} of {len(train)} training samples")
    return epoch, seen, len(all_pos) - int(torch.unique(all_pos).numel())


def _train_epoch_uni(
    ctx: Context, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    modality: str, gen: torch.Generator, label: str,
) -> tuple[dict[str, float], Tensor, Tensor]:  # fmt: skip
    """One pass; returns summed stats and each seen sample's (position, true-class prob)."""
    model.train()
    sums = _Sums(ctx.device)
    positions, probs = [], []
    with _Bar(ctx, label, loader.batch_sampler.samples * ctx.dist.world) as bar:  # type: ignore[union-attr]
        for batch in loader:
            x = _inputs(ctx, batch, modality, True, gen)
            y = batch["label"].to(ctx.device, non_blocking=True)
            with ctx.autocast():
                logits = model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums.add(loss, logits, y)
            positions.append(batch["index"])
            probs.append(logits.detach().softmax(dim=1).gather(1, y[:, None])[:, 0])
            bar.advance(len(y))
    return sums.result(), torch.cat(positions), torch.cat(probs).cpu()


class _Sums:
    """Loss and correct counts summed on the device: no host sync per training step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.loss += loss.detach().double() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.count += len(y)

    def result(self) -> dict[str, float]:
        return {"loss_sum": float(self.loss), "correct": float(self.correct), "count": self.count}


@torch.no_grad()
def _evaluate_uni(ctx: Context, model: nn.Module, modality: str, split: str) -> dict[str, Any]:
    """Loss and accuracy on a split (None when the split is empty)."""
    ctx.dist.sync_buffers(model)
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in _eval_batches(ctx, split, 2 * ctx.config.stage1.batch_size):
        x = _inputs(ctx, batch, modality, False, None)
        y = batch["label"].to(ctx.device)
        with ctx.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        count += len(y)
    loss_sum, correct, count = ctx.dist.sum([loss_sum, correct, count])
    if count == 0:
        return {"loss": None, "acc": None}
    return {"loss": loss_sum / count, "acc": correct / count}


def _build_uni(ctx: Context, modality: str) -> UniModal:
    cfg = ctx.config.model
    encoder, info = build_encoder(
        modality, cfg.arch(modality), cfg.init(modality), ctx.input_shape(modality),
        frames=ctx.config.data.visual.frames,
    )  # fmt: skip
    if ctx.dist.main:
        notes = "; ".join(info.notes)
        ctx.console.print(
            f"  {modality} encoder: {info.arch} ({info.init}), {info.params / 1e6:.2f}M "
            f"parameters, {info.dim}-d features" + (f"; {notes}" if notes else ""),
            highlight=False,
        )
    return UniModal(encoder, ctx.classes)


def run_stage1(ctx: Context, modality: str) -> dict[str, Any]:
    """Train one modality's encoder alone; returns the phase result (also saved as JSON)."""
    rd = ctx.rundir
    phase = f"stage1/{modality}"
    done = rd.result(phase)
    if done is not None:
        return done
    cfg = ctx.config.stage1
    rd.seed_phase(phase)
    model = _prepare(ctx, _build_uni(ctx, modality))
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    train = ctx.positions["train"]
    state = {
        "epoch": 0, "best": None, "best_loss": None, "best_epoch": None, "conf_sum": None,
        "conf_epochs": 0,
    }  # fmt: skip
    saved = rd.load_state(phase, model, optimizer, scheduler) if ctx.resume else None
    if saved is not None:
        state.update(saved)
    conf_sum = state["conf_sum"]
    if conf_sum is None:
        conf_sum = torch.zeros(len(ctx.features.labels), dtype=torch.float64)
    batches = EpochBatches(train, cfg.batch_size, rd.phase_seed(phase), ctx.dist)
    loader = _loader(ctx, batches, (modality,))
    net = ctx.dist.wrap(model)
    for epoch in range(state["epoch"], cfg.epochs):
        gen = rd.seed_epoch(phase, epoch, ctx.device)
        batches.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        label = f"stage 1 {modality} {epoch + 1}/{cfg.epochs}"
        sums, pos, prob = _train_epoch_uni(ctx, net, optimizer, loader, modality, gen, label)
        seconds = time.perf_counter() - start
        loss_sum, correct, count = ctx.dist.sum([sums["loss_sum"], sums["correct"], sums["count"]])
        conf, seen, repeats = _confidences(ctx, pos, prob, train)
        conf_sum[train] += conf[train]
        state["conf_epochs"] += 1
        scheduler.step()
        val = _evaluate_uni(ctx, model, modality, "val")
        record = {
            "phase": phase,
            "stage": 1,
            "modality": modality,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "confidence_mean": float(conf[train].mean()),
            "confidence_ids": seen,
            "confidence_repeats_dropped": repeats,
            "samples_per_s": count / seconds,
            "seconds": seconds,
        }
        improved = _improved(val["acc"], val["loss"], state["best"], state.get("best_loss"))
        if improved:
            state["best"], state["best_loss"] = val["acc"], val["loss"]
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        state["conf_sum"] = conf_sum
        meta = {"stage": "1", "modality": modality, "epoch": str(epoch + 1)}
        rd.end_epoch(
            phase, record, model, optimizer, scheduler, state,
            best=export_stage1(model) if improved else None,
            best_meta={**meta, **input_meta(ctx, (modality,))},
        )  # fmt: skip
        _print_epoch(ctx, record)
    # The best encoder (by validation accuracy) is what stage 2 starts from and what is tested.
    rd.barrier_after_write()
    best_state = rd.read_best(phase)
    head = load_stage1_encoder(model.encoder, best_state)
    model.head.load_state_dict(head.state_dict())
    model.to(ctx.device)
    test = _evaluate_uni(ctx, model, modality, "test")
    train_ids = [ctx.features.ids[i] for i in train.tolist()]
    mean_conf = (conf_sum[train] / max(state["conf_epochs"], 1)).tolist()
    result = {
        "val": state["best"],
        "val_loss": state.get("best_loss"),
        "best_epoch": state["best_epoch"],
        "test": test["acc"],
        "epochs": cfg.epochs,
        "world": ctx.dist.world,
    }
    rd.finish_stage1(phase, modality, result, dict(zip(train_ids, mean_conf, strict=True)))
    if ctx.dist.main:
        ctx.console.print(
            f"stage 1 {modality}: best val {_pct(state['best'])} (epoch {state['best_epoch']}), "
            f"test {_pct(test['acc'])}",
            highlight=False,
        )
    return rd.result(phase)


def _improved(
    acc: float | None, loss: float | None, best: float | None, best_loss: float | None
) -> bool:
    """Best by validation accuracy, ties broken by validation loss (lower), then the later
    epoch; without a validation split, the last epoch.

    A small validation set ties often (accuracy moves in steps of 1/n); keeping the first of
    tied epochs would hand stage 2 an encoder trained for fewer epochs for no measured gain.
    """
    if acc is None or best is None or acc > best:
        return True
    if acc < best:
        return False
    return loss is None or best_loss is None or loss <= best_loss


def input_meta(ctx: Context, modalities: tuple[str, ...]) -> dict[str, str]:
    """What an exported encoder's inputs were (checkpoint metadata, strings): the audio front
    end and the normalisation the run applied, so the encoder can be fed the same inputs later.
    """
    meta: dict[str, str] = {}
    f = ctx.features
    if "audio" in modalities and f.audio_mean is not None and f.audio_std is not None:
        a = ctx.config.data.audio
        meta.update({
            "audio_mean": repr(f.audio_mean),
            "audio_std": repr(f.audio_std),
            "audio_normalisation": "(fbank - audio_mean) / (2 * audio_std)",
            "audio_sample_rate": str(a.sample_rate),
            "audio_mel_bins": str(a.mel_bins),
            "audio_target_frames": str(a.target_frames),
        })  # fmt: skip
    if "visual" in modalities:
        v = ctx.config.data.visual
        meta.update({"visual_frames": str(v.frames), "visual_size": str(v.size)})
    return meta


# --------------------------------------------------------------------------------------------
# Stage 2


def _build_fusion(ctx: Context) -> FusionModel:
    """Both encoders as stage 1 left them (best epoch), a fresh fusion head."""
    encoders = {}
    for modality in ("audio", "visual"):
        cfg = ctx.config.model
        encoder, _ = build_encoder(
            modality, cfg.arch(modality), cfg.init(modality), ctx.input_shape(modality),
            frames=ctx.config.data.visual.frames,
        )  # fmt: skip
        load_stage1_encoder(encoder, ctx.rundir.read_best(f"stage1/{modality}"))
        encoders[modality] = encoder
    return FusionModel(encoders["audio"], encoders["visual"], ctx.classes)


def mask_ratios(ctx: Context, rule: str) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Per-position ratios (0 outside the training split) from the stage-1 confidences."""
    conf = ctx.rundir.read_confidence()
    train = ctx.positions["train"]
    ids = [ctx.features.ids[i] for i in train.tolist()]
    values = {}
    for modality in ("audio", "visual"):
        table = conf.get(modality) or {}
        missing = [i for i in ids if i not in table]
        if missing:
            raise BnfixError(
                f"stage1/confidence.json has no {modality} confidence for {len(missing)} "
                f"training samples (e.g. {missing[0]}): the manifest changed since stage 1; "
                "rerun stage 1",
                ctx.rundir.out,
            )
        values[modality] = torch.tensor([table[i] for i in ids], dtype=torch.float64)
    m = ctx.config.mask
    r_a, r_v = masking.mask_ratios(values["audio"], values["visual"], rule, m.tau, m.eta, m.rho)
    n = len(ctx.features.labels)
    full_a, full_v = torch.zeros(n), torch.zeros(n)
    full_a[train], full_v[train] = r_a.float(), r_v.float()
    n_a, n_v = _grid_patches(ctx)
    stats = {
        "rule": rule,
        "audio_masked_fraction": _masked_fraction(r_a, n_a),
        "visual_masked_fraction": _masked_fraction(r_v, n_v),
        "mean_ratio_audio": float(r_a.mean()),
        "mean_ratio_visual": float(r_v.mean()),
    }
    return full_a, full_v, stats


def _grid_patches(ctx: Context) -> tuple[int, int]:
    """Patches N of one audio input and of one (cropped) video frame: what ``floor(N·r)`` uses."""
    m, a, size = ctx.config.mask, ctx.config.data.audio, ctx.config.data.visual.size
    (ah, aw), (vh, vw) = m.audio_patch, m.visual_patch
    return (a.target_frames // ah) * (a.mel_bins // aw), (size // vh) * (size // vw)


def _masked_fraction(ratios: Tensor, n_patches: int) -> float:
    """Training samples that lose at least one patch: ``floor(N·r) ≥ 1``, not merely r > 0 (a
    ratio below 1/N masks nothing, and counting it would report masking that never happens)."""
    if ratios.numel() == 0:
        return 0.0
    return float((masking.patch_counts(ratios, n_patches) > 0).double().mean())


def _train_epoch_fusion(
    ctx: Context, net: nn.Module, model: FusionModel, optimizer: torch.optim.Optimizer,
    loader: DataLoader, ratios: tuple[Tensor, Tensor] | None, gen: torch.Generator,
    mask_gen: torch.Generator, ogm: tuple[float, torch.Generator] | None, label: str,
) -> dict[str, float]:  # fmt: skip
    """One pass; ``ogm``: (alpha, noise generator) when OGM-GE modulates this epoch."""
    net.train()
    m = ctx.config.mask
    sums = _Sums(ctx.device)
    coeff_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    steps = 0
    with _Bar(ctx, label, loader.batch_sampler.samples * ctx.dist.world) as bar:  # type: ignore[union-attr]
        for batch in loader:
            a = _inputs(ctx, batch, "audio", True, gen)
            v = _inputs(ctx, batch, "visual", True, gen)
            if ratios is not None:
                index = batch["index"]
                r_a = ratios[0][index].to(ctx.device, non_blocking=True)
                r_v = ratios[1][index].to(ctx.device, non_blocking=True)
                a = masking.mask_patches(a, r_a, m.audio_patch, mask_gen)
                v = masking.mask_patches(v, r_v, m.visual_patch, mask_gen)
            y = batch["label"].to(ctx.device, non_blocking=True)
            with ctx.autocast():
                logits, fa, fv = net(a, v)
            logits = logits.float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ogm is not None:
                alpha, noise_gen = ogm
                with torch.no_grad():
                    la, lv = balance.half_logits(model.head, fa.float(), fv.float())
                    scores = ctx.dist.sum_tensor(balance.true_class_scores(la, lv, y))
                    k_a, k_v = balance.coefficients(scores, alpha)
                    balance.modulate(model.audio.parameters(), k_a, noise_gen)
                    balance.modulate(model.visual.parameters(), k_v, noise_gen)
                    coeff_sum += torch.stack([k_a, k_v]).double()
            optimizer.step()
            steps += 1
            sums.add(loss, logits, y)
            bar.advance(len(y))
    result = sums.result()
    if ogm is not None:
        k = (coeff_sum / max(steps, 1)).tolist()
        result.update({"ogm_coeff_audio": k[0], "ogm_coeff_visual": k[1]})
    return result


@torch.no_grad()
def _evaluate_fusion(ctx: Context, model: FusionModel, split: str) -> dict[str, Any]:
    """Fused, audio-only, visual-only and neither accuracy (the head with the other half, or
    both halves, zeroed), and the halves' mean true-class scores (OGM-GE's split of the head)."""
    ctx.dist.sync_buffers(model)
    model.eval()
    sums = [0.0] * 8  # loss, fused, audio, visual, none, score_a, score_v, count
    for batch in _eval_batches(ctx, split, 2 * ctx.config.stage2.batch_size):
        a = _inputs(ctx, batch, "audio", False, None)
        v = _inputs(ctx, batch, "visual", False, None)
        y = batch["label"].to(ctx.device)
        with ctx.autocast():
            logits, fa, fv = model(a, v)
        fa, fv = fa.float(), fv.float()
        la, lv = model.partial_logits(fa, fv)
        neither = model.head.bias.float().expand_as(la)
        logits = logits.float()
        sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
        for k, out in enumerate((logits, la, lv, neither), start=1):
            sums[k] += float((out.argmax(1) == y).sum())
        scores = balance.true_class_scores(*balance.half_logits(model.head, fa, fv), y)
        sums[5] += float(scores[0])
        sums[6] += float(scores[1])
        sums[7] += len(y)
    loss, fused, audio, visual, none, score_a, score_v, count = ctx.dist.sum(sums)
    if count == 0:
        return {k: None for k in ("loss", "fused", "audio", "visual", "none", "imbalance_ratio")}
    return {
        "loss": loss / count,
        "fused": fused / count,
        "audio": audio / count,
        "visual": visual / count,
        "none": none / count,
        "imbalance_ratio": score_a / score_v if score_v > 0 else None,
    }


def contribution(val: dict[str, Any]) -> dict[str, Any]:
    """Shapley values of the two modalities for the fused accuracy, and the imbalance ratio."""
    from bnfix.fusion.stats import shapley

    return {
        "acc_none": val["none"],
        **shapley(val["fused"], val["audio"], val["visual"], val["none"]),
        "imbalance_ratio": val["imbalance_ratio"],
    }


def run_stage2(ctx: Context, arm: Arm, phase: str) -> dict[str, Any]:
    """Joint training from the stage-1 encoders: the arm's input masks, and OGM-GE's gradient
    modulation when the arm has it."""
    rd = ctx.rundir
    done = rd.result(phase)
    if done is not None:
        return done
    cfg, bal = ctx.config.stage2, ctx.config.balance
    rule = arm.rule
    ratio_a, ratio_v, mask_stats = mask_ratios(ctx, rule)
    # Paired arms: every stage-2 arm of a seed draws its head initialisation, data order,
    # crops and flips from the same streams (named STAGE2, whatever the phase); only the
    # masks (and OGM-GE's noise) come from streams of their own.
    rd.seed_phase(STAGE2)
    model = _prepare(ctx, _build_fusion(ctx))
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    state: dict[str, Any] = {
        "epoch": 0, "best": None, "best_loss": None, "best_epoch": None, "best_val": None,
    }  # fmt: skip
    saved = rd.load_state(phase, model, optimizer, scheduler) if ctx.resume else None
    if saved is not None:
        state.update(saved)
    if ctx.dist.main:
        ctx.console.print(
            f"stage 2 ({arm.name}): masking audio on {mask_stats['audio_masked_fraction']:.0%} "
            f"of training samples (mean ratio {mask_stats['mean_ratio_audio']:.3f}), visual on "
            f"{mask_stats['visual_masked_fraction']:.0%} "
            f"(mean ratio {mask_stats['mean_ratio_visual']:.3f})"
            + (f"; OGM-GE alpha {bal.alpha}" if arm.ogm else ""),
            highlight=False,
        )
    batches = EpochBatches(ctx.positions["train"], cfg.batch_size, rd.phase_seed(STAGE2), ctx.dist)
    loader = _loader(ctx, batches, ("audio", "visual"))
    net = ctx.dist.wrap(model)
    ratios = None if rule == "none" else (ratio_a, ratio_v)
    for epoch in range(state["epoch"], cfg.epochs):
        gen = rd.seed_epoch(STAGE2, epoch, ctx.device)
        mask_gen = rd.arm_generator("mask", STAGE2, epoch)
        ogm = None
        if arm.ogm and bal.active(epoch + 1):
            ogm = (bal.alpha, rd.arm_generator("ogm-ge", STAGE2, epoch, per_rank=False))
        batches.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        label = f"stage 2 {arm.name} {epoch + 1}/{cfg.epochs}"
        sums = _train_epoch_fusion(
            ctx, net, model, optimizer, loader, ratios, gen, mask_gen, ogm, label
        )
        seconds = time.perf_counter() - start
        loss_sum, correct, count = ctx.dist.sum([sums["loss_sum"], sums["correct"], sums["count"]])
        scheduler.step()
        val = _evaluate_fusion(ctx, model, "val")
        contrib = contribution(val)
        record = {
            "phase": phase,
            "stage": 2,
            "rule": rule,
            "arm": arm.name,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "val_loss": val["loss"],
            "val_acc": val["fused"],
            "val_acc_audio": val["audio"],
            "val_acc_visual": val["visual"],
            "val_acc_none": val["none"],
            "shapley_audio": contrib["shapley_audio"],
            "shapley_visual": contrib["shapley_visual"],
            "share_audio": contrib["share_audio"],
            "imbalance_ratio": contrib["imbalance_ratio"],
        }
        if arm.ogm:
            record["ogm_coeff_audio"] = sums.get("ogm_coeff_audio", 1.0)
            record["ogm_coeff_visual"] = sums.get("ogm_coeff_visual", 1.0)
        record.update({"samples_per_s": count / seconds, "seconds": seconds})
        improved = _improved(val["fused"], val["loss"], state["best"], state.get("best_loss"))
        if improved:
            state["best"], state["best_loss"] = val["fused"], val["loss"]
            state["best_epoch"] = epoch + 1
            state["best_val"] = {"epoch": epoch + 1, **contrib}
        state["epoch"] = epoch + 1
        meta = {"stage": "2", "rule": rule, "arm": arm.name, "epoch": str(epoch + 1)}
        rd.end_epoch(
            phase, record, model, optimizer, scheduler, state,
            best=export_stage2(model) if improved else None,
            best_meta={**meta, **input_meta(ctx, ("audio", "visual"))},
        )  # fmt: skip
        _print_epoch(ctx, record)
    rd.barrier_after_write()
    _load_stage2_best(model, rd.read_best(phase))
    model.to(ctx.device)
    test = _evaluate_fusion(ctx, model, "test")
    probe = {m: linear_probe(ctx, getattr(model, m), m) for m in ("audio", "visual")}
    result = {
        "arm": arm.name,
        "val": state["best"],
        "val_loss": state.get("best_loss"),
        "best_epoch": state["best_epoch"],
        "test": {k: test[k] for k in ("fused", "audio", "visual")},
        "probe": probe,
        "mask": mask_stats,
        "contribution": {"val": state.get("best_val"), "test": contribution(test)},
        "epochs": cfg.epochs,
        "world": ctx.dist.world,
    }
    if arm.ogm:
        result["ogm"] = {
            "alpha": bal.alpha,
            "start_epoch": bal.start_epoch,
            "end_epoch": bal.end_epoch,
        }
    rd.finish(phase, result)
    if ctx.dist.main:
        ctx.console.print(
            f"stage 2 ({arm.name}): test fused {_pct(test['fused'])}, audio-only "
            f"{_pct(test['audio'])}, visual-only {_pct(test['visual'])}; linear probes audio "
            f"{_pct(probe['audio'])}, visual {_pct(probe['visual'])}",
            highlight=False,
        )
    return rd.result(phase)


# --------------------------------------------------------------------------------------------
# The stage-1 ensemble: late fusion of the two stage-1 models, no stage 2


def _stage1_model(ctx: Context, modality: str) -> UniModal:
    """The stage-1 model of a modality as its best epoch left it (encoder and head)."""
    cfg = ctx.config.model
    encoder, _ = build_encoder(
        modality, cfg.arch(modality), cfg.init(modality), ctx.input_shape(modality),
        frames=ctx.config.data.visual.frames,
    )  # fmt: skip
    head = load_stage1_encoder(encoder, ctx.rundir.read_best(f"stage1/{modality}"))
    model = UniModal(encoder, ctx.classes)
    model.head.load_state_dict(head.state_dict())
    return _prepare(ctx, model).eval()


@torch.no_grad()
def _evaluate_ensemble(ctx: Context, models: dict[str, UniModal], split: str) -> dict[str, Any]:
    """Accuracy of the mean of the two models' softmax probabilities, and of each alone."""
    for model in models.values():
        ctx.dist.sync_buffers(model)
    sums = [0.0] * 4  # fused, audio, visual, count
    for batch in _eval_batches(ctx, split, 2 * ctx.config.stage1.batch_size):
        y = batch["label"].to(ctx.device)
        probs = {}
        for m, model in models.items():
            x = _inputs(ctx, batch, m, False, None)
            with ctx.autocast():
                probs[m] = model(x).float().softmax(1)
        mean = (probs["audio"] + probs["visual"]) / 2
        for k, p in enumerate((mean, probs["audio"], probs["visual"])):
            sums[k] += float((p.argmax(1) == y).sum())
        sums[3] += len(y)
    fused, audio, visual, count = ctx.dist.sum(sums)
    if count == 0:
        return {"fused": None, "audio": None, "visual": None}
    return {"fused": fused / count, "audio": audio / count, "visual": visual / count}


def run_ensemble(ctx: Context, phase: str) -> dict[str, Any]:
    """The ``ensemble`` arm: average the stage-1 models' probabilities (no training)."""
    rd = ctx.rundir
    done = rd.result(phase)
    if done is not None:
        return done
    models = {m: _stage1_model(ctx, m) for m in ("audio", "visual")}
    val = _evaluate_ensemble(ctx, models, "val")
    test = _evaluate_ensemble(ctx, models, "test")
    probe = {m: linear_probe(ctx, models[m].encoder, m) for m in ("audio", "visual")}
    zero = {"audio_masked_fraction": 0.0, "visual_masked_fraction": 0.0}
    result = {
        "arm": "ensemble",
        "val": val["fused"],
        "test": test,
        "probe": probe,
        "mask": {"rule": "none", **zero, "mean_ratio_audio": 0.0, "mean_ratio_visual": 0.0},
        "world": ctx.dist.world,
    }
    rd.finish(phase, result)
    if ctx.dist.main:
        ctx.console.print(
            f"ensemble of the stage-1 models: test {_pct(test['fused'])} (audio model "
            f"{_pct(test['audio'])}, visual model {_pct(test['visual'])}); linear probes "
            f"audio {_pct(probe['audio'])}, visual {_pct(probe['visual'])}",
            highlight=False,
        )
    return rd.result(phase)


def _load_stage2_best(model: FusionModel, state: dict[str, Tensor]) -> None:
    for prefix, encoder in (("audio", model.audio), ("visual", model.visual)):
        own = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        encoder.backbone.load_state_dict(own)
    model.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})


# --------------------------------------------------------------------------------------------
# Linear probes: how much each encoder learned, read by a classifier on frozen features


@torch.no_grad()
def _encode(ctx: Context, encoder: Encoder, modality: str, split: str) -> tuple[Tensor, Tensor]:
    """Frozen features of a split (eval mode, no augmentation), gathered on every rank."""
    encoder.eval()
    feats, labels, positions = [], [], []
    for batch in _eval_batches(ctx, split, 2 * ctx.config.stage2.batch_size):
        x = _inputs(ctx, batch, modality, False, None)
        with ctx.autocast():
            f = encoder(x)
        feats.append(f.float().cpu())
        labels.append(batch["label"])
        positions.append(batch["index"])
    dim = encoder.dim
    local = (
        torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64),
        torch.cat(feats) if feats else torch.zeros(0, dim),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
    )
    parts = ctx.dist.gather_objects(local)
    pos = torch.cat([p[0] for p in parts])  # type: ignore[index]
    order = pos.argsort()
    x = torch.cat([p[1] for p in parts])[order]  # type: ignore[index]
    y = torch.cat([p[2] for p in parts])[order]  # type: ignore[index]
    return x, y


def fit_linear(x: Tensor, y: Tensor, classes: int, l2: float = 1e-3, steps: int = 100) -> nn.Linear:
    """Multinomial logistic regression on standardised features, full batch (L-BFGS).

    Deterministic (zero init, no sampling); the standardisation is folded into the returned
    layer, so it applies to raw features.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    layer = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        layer.weight.copy_((w / std).float())
        layer.bias.copy_((b - (w * (mean / std)).sum(1)).float())
    return layer


def linear_probe(ctx: Context, encoder: Encoder, modality: str) -> float | None:
    """Test accuracy of a linear classifier fitted on the encoder's frozen train features."""
    if len(ctx.positions["test"]) == 0:
        return None
    train_x, train_y = _encode(ctx, encoder, modality, "train")
    test_x, test_y = _encode(ctx, encoder, modality, "test")
    layer = fit_linear(train_x, train_y, ctx.classes)
    with torch.no_grad():
        return float((layer(test_x).argmax(1) == test_y).double().mean())


# --------------------------------------------------------------------------------------------
# Reporting


def _pct(value: float | None) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{100 * value:.1f}%")
    )


def _print_epoch(ctx: Context, r: dict[str, Any]) -> None:
    if not ctx.dist.main:
        return
    if r["stage"] == 1:
        head = f"stage 1 {r['modality']:<6} epoch {r['epoch']:>3}"
        val = f"val {_pct(r['val_acc'])}"
    else:
        head = f"stage 2 {r.get('arm', r['rule']):<6} epoch {r['epoch']:>3}"
        val = (
            f"val fused {_pct(r['val_acc'])} audio {_pct(r['val_acc_audio'])} "
            f"visual {_pct(r['val_acc_visual'])}"
        )
    ctx.console.print(
        f"{head}  loss {r['train_loss']:.3f}  train {_pct(r['train_acc'])}  {val}  "
        f"{r['samples_per_s']:.0f} samples/s",
        highlight=False,
    )
