"""Encoders and the fusion model: any CNN bnfix can build, with its classifier taken off.

An encoder is an architecture (torchvision name, ``pkg.module:factory``, or recognised from a
checkpoint) whose final classifier became ``nn.Identity``; its stem takes the modality's
channels (audio 1, visual 3). Stage 1 puts a linear head on one encoder; stage 2 concatenates
both encoders' features into one linear head, and the audio-only / visual-only predictions are
that head with the other half of its input zeroed (the paper's uni-modal readout of a joint
model).

The classifier is found generically as the last ``nn.Linear`` (or an ``nn.Identity`` already in
its place) in module order, so ``fc``, ``classifier.1`` and ``heads.head`` need no table; a model
without one whose last layer is a 1x1(x1) convolution (torchvision's ``s3d``, ``squeezenet``)
has that convolution taken off instead.

Visual inputs arrive as ``[B, T, 3, H, W]`` (T frames, ImageNet-normalised by
:mod:`bnfix.fusion.augment`). A 2-D backbone runs on every frame and its features are averaged
over T; a 3-D backbone (its stem is a ``Conv3d``: torchvision's ``r3d_18``, ``mc3_18``,
``r2plus1d_18``, ``s3d``, or any such model) sees the clip once, as ``[B, 3, T, H, W]``.
torchvision's video models were trained on inputs normalised with the Kinetics-400 mean and
std, so a 3-D encoder first turns the ImageNet normalisation into that one: per channel
``x * (std_imagenet / std_kinetics) + (mean_imagenet - mean_kinetics) / std_kinetics``, which
equals ``(pixel - mean_kinetics) / std_kinetics``. It is one multiply-add with constants (no
buffer: checkpoints keep the architecture's own keys). A masked patch (0 after the ImageNet
normalisation, i.e. the ImageNet mean colour) stays that colour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bnfix import stem
from bnfix.errors import BnfixError, one_line
from bnfix.fusion.augment import IMAGENET_MEAN, IMAGENET_STD
from bnfix.probe_clip import KINETICS_MEAN, KINETICS_STD

__all__ = [
    "CHANNELS",
    "Encoder",
    "EncoderInfo",
    "FusionModel",
    "UniModal",
    "adapt_stem",
    "build_encoder",
    "export_stage1",
    "export_stage2",
    "load_pretrained",
    "load_stage1_encoder",
    "to_float32",
    "video_affine",
]

CHANNELS = {"audio": 1, "visual": 3}
DEFAULT_ARCH = "resnet18"


# --------------------------------------------------------------------------------------------
# Building a backbone


def load_pretrained(path: Path, arch: str | None, option: str = "--arch") -> nn.Module:
    """Rebuild a model, plain or ABRi-repaired, from a checkpoint (``arch`` None: recognise).

    ``option`` is the config key the architecture comes from, so that errors name it.
    """
    from bnfix import load

    return load(path, arch=arch, option=option)


def _create(arch: str, option: str = "--arch") -> nn.Module:
    """A randomly initialised model of the named architecture (never downloads weights)."""
    from bnfix.architectures import create_model

    return create_model(arch, option=option)


def to_float32(model: nn.Module) -> str | None:
    """Convert floating-point weights stored in another precision to float32, with a note.

    fp16/bf16 checkpoints are common (they halve the download); training them as stored would
    fail on float32 inputs, and float32 master weights are what SGD needs anyway.
    """
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    other = sorted(str(d).removeprefix("torch.") for d in dtypes if d != torch.float32)
    if not other:
        return None
    model.to(torch.float32)
    return f"weights stored as {'/'.join(other)}, converted to float32 for training"


def _classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final classifier: the last Linear or Identity leaf in module order, else a last
    layer that is a 1x1(x1) convolution (a convolutional classifier, as in ``s3d``)."""
    found = None
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Linear | nn.Identity):
            found = (name, module)
    if found is not None:
        return found
    weighted = [(n, m) for n, m in model.named_modules() if n and m._parameters]
    if weighted:
        name, last = weighted[-1]
        conv = isinstance(last, nn.Conv1d | nn.Conv2d | nn.Conv3d) and not last.transposed
        if conv and set(last.kernel_size) == {1} and last.groups == 1:
            return name, last
    return None


def adapt_stem(model: nn.Module, channels: int, pretrained: bool) -> str | None:
    """Give the first conv ``channels`` inputs; returns a note when something changed.

    A pretrained stem is adapted by :mod:`bnfix.stem` (RGB -> 1 sums the weights, 1 -> RGB
    repeats them ÷3); a scratch stem is simply re-created with the right width.
    """
    if pretrained:
        return stem.adapt_stem(model, channels)
    name, conv = stem.stem_conv(model)
    if conv.in_channels == channels:
        return None
    if conv.groups != 1:
        raise BnfixError(f"stem {name} is a grouped conv; cannot change its input channels")
    weight = torch.empty(conv.out_channels, channels, *conv.kernel_size)
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    conv.in_channels = channels
    conv.weight = nn.Parameter(weight)
    return f"scratch stem {name} built for {channels} channel(s)"


def video_affine() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(scale, shift)`` that turn ImageNet-normalised pixels into
    Kinetics-normalised ones (what torchvision's video models were trained on)."""
    scale = tuple(si / sk for si, sk in zip(IMAGENET_STD, KINETICS_STD, strict=True))
    shift = tuple(
        (mi - mk) / sk
        for mi, mk, sk in zip(IMAGENET_MEAN, KINETICS_MEAN, KINETICS_STD, strict=True)
    )
    return scale, shift


def _feature_dim(backbone: nn.Module, shape: tuple[int, ...], label: str) -> int:
    """The backbone's output size, from one forward pass on a zero input of the real size."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, *shape))
    except Exception as exc:
        raise BnfixError(
            f"{label} cannot run on inputs of shape {list(shape)}: {one_line(exc)}"
        ) from exc
    finally:
        backbone.train(was_training)
    if not isinstance(out, Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise BnfixError(f"{label}: without its classifier the model returns {got}, not [B, D]")
    return out.shape[1]


# --------------------------------------------------------------------------------------------
# Modules


class Encoder(nn.Module):
    """A backbone without classifier; ``temporal``: input [B, T, C, H, W], mean over T.

    ``video`` (a 3-D backbone, visual): input [B, T, 3, H, W] as well, renormalised to the
    Kinetics statistics (:func:`video_affine`) and passed once as the clip [B, 3, T, H, W].
    ``head_kernel``: the trailing weight dims of a convolutional classifier (``(1, 1, 1)`` for
    s3d's), so exports give the classifier its own shape back; ``()`` for a Linear.
    """

    def __init__(
        self, backbone: nn.Module, dim: int, temporal: bool, head_path: str, *,
        video: bool = False, head_kernel: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.temporal = temporal
        self.video = video
        self.head_path = head_path  # where the classifier was, for stock-layout exports
        self.head_kernel = head_kernel
        self.channels_last = False
        self._affine: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @property
    def memory_format(self) -> torch.memory_format:
        """The channels-last layout of this backbone's inputs."""
        return torch.channels_last_3d if self.video else torch.channels_last

    def to_channels_last(self) -> None:
        """Channels-last convolution weights (``channels_last`` for 2-D, ``channels_last_3d``
        for 3-D ones, each by its own rank) and inputs: what CUDA convolutions run fastest on."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
            elif isinstance(module, nn.Conv3d):
                module.to(memory_format=torch.channels_last_3d)
        self.channels_last = True

    def clip(self, x: Tensor) -> Tensor:
        """[B, T, 3, H, W] ImageNet-normalised frames -> the [B, 3, T, H, W] Kinetics-normalised
        clip a 3-D backbone takes."""
        key = (x.device, x.dtype)
        if key not in self._affine:  # constants, made once per device and dtype
            scale, shift = video_affine()
            shape = (1, 1, 3, 1, 1)
            self._affine[key] = (
                torch.tensor(scale, dtype=x.dtype).view(shape).to(x.device),
                torch.tensor(shift, dtype=x.dtype).view(shape).to(x.device),
            )
        scale, shift = self._affine[key]
        return torch.addcmul(shift, x, scale).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.video:
            x = self.clip(x)
            if self.channels_last:
                x = x.contiguous(memory_format=self.memory_format)
            return self.backbone(x)
        if self.temporal:
            b, t = x.shape[:2]
            x = x.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        if self.temporal:
            features = features.view(b, t, -1).mean(dim=1)
        return features


class UniModal(nn.Module):
    """Stage 1: one encoder and a linear classifier."""

    def __init__(self, encoder: Encoder, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class FusionModel(nn.Module):
    """Stage 2: both encoders, features concatenated, one linear head."""

    def __init__(self, audio: Encoder, visual: Encoder, classes: int) -> None:
        super().__init__()
        self.audio = audio
        self.visual = visual
        self.head = nn.Linear(audio.dim + visual.dim, classes)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused logits and the two feature vectors (for the uni-modal readouts)."""
        fa, fv = self.audio(audio), self.visual(visual)
        return self.head(torch.cat([fa, fv], dim=1)), fa, fv

    def partial_logits(self, fa: Tensor, fv: Tensor) -> tuple[Tensor, Tensor]:
        """Audio-only and visual-only logits: the head with the other half zeroed."""
        d = self.audio.dim
        w, b = self.head.weight, self.head.bias
        return fa @ w[:, :d].T + b, fv @ w[:, d:].T + b


# --------------------------------------------------------------------------------------------
# Encoders from the config


@dataclass(frozen=True)
class EncoderInfo:
    """What was built, for the run log."""

    arch: str
    init: str
    dim: int
    params: int
    notes: tuple[str, ...]


def build_encoder(
    modality: str, arch: str, init: str | Path, input_shape: tuple[int, ...], frames: int = 1
) -> tuple[Encoder, EncoderInfo]:
    """Build the modality's encoder on the CPU, in training mode.

    ``input_shape`` is one sample (one frame) as a 2-D backbone sees it ([C, H, W]);
    ``frames`` is T of a visual sample, the clip length a 3-D backbone sees ([C, T, H, W]).
    The backbone is run once on that shape to find the feature size, so a model that cannot
    take the configured input fails here, clearly.
    """
    option = f"model.{modality}_arch"
    label = f"{option} {arch}"
    channels = CHANNELS[modality]
    notes: list[str] = []
    pretrained = init != "scratch"
    if pretrained:
        backbone = load_pretrained(Path(init), None if arch == "auto" else arch, option)
        notes.append(f"initialised from {init}")
        converted = to_float32(backbone)  # before the stem is adapted: sums in float32
        if converted:
            notes.append(converted)
    else:
        backbone = _create(DEFAULT_ARCH if arch == "auto" else arch, option)
    note = adapt_stem(backbone, channels, pretrained)
    if note:
        notes.append(note)
    video = stem.stem_dimensions(backbone) == 3
    if video and modality != "visual":
        raise BnfixError(
            f"{label} is a 3-D (video) model; {modality} inputs are 2-D ([C, H, W]): use a 2-D "
            "architecture"
        )
    found = _classifier(backbone)
    if found is None:
        raise BnfixError(f"{label}: no nn.Linear classifier found to replace")
    head_path, head = found
    head_kernel = (
        tuple(head.kernel_size) if isinstance(head, nn.Conv1d | nn.Conv2d | nn.Conv3d) else ()
    )
    if not isinstance(head, nn.Identity):
        backbone.set_submodule(head_path, nn.Identity())
    shape = (channels, frames, *input_shape[1:]) if video else (channels, *input_shape[1:])
    dim = _feature_dim(backbone, shape, label)
    backbone.train()
    encoder = Encoder(
        backbone, dim, temporal=modality == "visual", head_path=head_path, video=video,
        head_kernel=head_kernel,
    )  # fmt: skip
    params = sum(p.numel() for p in backbone.parameters())
    info = EncoderInfo(arch, "scratch" if not pretrained else str(init), dim, params, tuple(notes))
    return encoder, info


# --------------------------------------------------------------------------------------------
# Exports: stage-1 models in the architecture's own key layout


def export_stage1(model: UniModal) -> dict[str, Tensor]:
    """Backbone keys as the stock architecture names them, the head at the classifier's place.

    A stage-1 ``best.safetensors`` is therefore a plain checkpoint of the architecture with
    ``classes`` outputs (``bnfix scan`` and torchvision load it as is).
    """
    state = {k: v for k, v in model.encoder.backbone.state_dict().items()}
    path = model.encoder.head_path
    weight = model.head.weight
    state[f"{path}.weight"] = weight.reshape(*weight.shape, *model.encoder.head_kernel)
    state[f"{path}.bias"] = model.head.bias
    return {k: v.detach().cpu() for k, v in state.items()}


def load_stage1_encoder(encoder: Encoder, state: Mapping[str, Tensor]) -> nn.Linear:
    """Load an :func:`export_stage1` state into ``encoder``; returns the stage-1 head."""
    path = encoder.head_path
    head_keys = {f"{path}.weight", f"{path}.bias"}
    encoder.backbone.load_state_dict({k: v for k, v in state.items() if k not in head_keys})
    weight = state[f"{path}.weight"].flatten(1)  # a convolutional classifier's [out, in, 1, ..]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": state[f"{path}.bias"]})
    return head


def export_stage2(model: FusionModel) -> dict[str, Tensor]:
    """``audio.*`` / ``visual.*`` backbone keys (``bnfix scan --select audio.``) and ``head.*``."""
    state = {}
    for prefix, encoder in (("audio", model.audio), ("visual", model.visual)):
        for k, v in encoder.backbone.state_dict().items():
            state[f"{prefix}.{k}"] = v
    state["head.weight"] = model.head.weight
    state["head.bias"] = model.head.bias
    return {k: v.detach().cpu() for k, v in state.items()}
