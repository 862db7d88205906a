"""The fusion-tune configuration: a TOML file, ``section.key=value`` overrides, frozen dataclasses.

Every key has a default except ``data.manifest``. Values are checked here, before any file is
read or written, so a typo costs one line on stderr instead of a run: an unknown key names
the nearest valid one, a bad type or range says what was expected. Paths written in the file
are relative to the file; paths given as command-line overrides are relative to the current
folder (where the user typed them).

This module imports neither torch nor the data side, so ``bnfix fusion-tune`` rejects a bad
config in a fraction of a second.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from bnfix.errors import BnfixError

__all__ = [
    "OPTIMIZERS",
    "RULES",
    "SCHEDULERS",
    "AudioConfig",
    "BalanceConfig",
    "DataConfig",
    "FusionConfig",
    "MaskConfig",
    "ModelConfig",
    "RunConfig",
    "StageConfig",
    "VisualConfig",
    "config_from_toml",
    "diff_configs",
    "load_config",
    "parse_override",
    "render_toml",
    "valid_keys",
]

MODALITIES = ("audio", "visual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "cosine", "step")
RULES = ("adaptive", "mean", "none", "reference")
DEVICES = ("auto", "cpu", "cuda")
SCRATCH = "scratch"
AUTO_ARCH = "auto"


# --------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class AudioConfig:
    """Spectrogram front end (``bnfix.probe_audio.AudioOptions``); mean/std: from train."""

    sample_rate: int = 16000
    mel_bins: int = 128
    target_frames: int = 1024
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class VisualConfig:
    """Frames per sample and how they are picked, cropped and resized
    (``bnfix.fusion.features.VisualOptions`` says what each choice means)."""

    frames: int = 3
    size: int = 224
    sampling: str = "middle"  # "middle" (fixed segment middles) or "random" (per epoch)
    crop: str = "fixed-scale"  # training: "fixed-scale" or "random-resized"
    eval_resize: str = "center-crop"  # evaluation: "center-crop" or "full-frame"
    fps: float = 1.0  # sampling "random": frames stored per second of video
    max_frames: int = 10  # sampling "random": frames stored per sample at most


@dataclass(frozen=True)
class DataConfig:
    manifest: Path | None = None
    cache_dir: Path | None = None  # default: <manifest folder>/.bnfix-cache
    workers: int | None = None  # feature-extraction processes; default: the usable cores
    #: Seconds one sample may take to extract (on worker processes) before it is skipped as
    #: stuck: a decoder hanging on one damaged file must not stall the whole dataset. The
    #: same default as ``extract.SAMPLE_TIMEOUT`` (not imported: the config stays light).
    sample_timeout: float = 600.0
    audio: AudioConfig = field(default_factory=AudioConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Architectures (torchvision name, ``pkg.module:factory`` or ``auto``) and initialisation.

    ``auto`` recognises the architecture from the init checkpoint; ``scratch`` builds it with
    random weights (``auto`` then means resnet18).
    """

    audio_arch: str = "resnet18"
    visual_arch: str = "resnet18"
    audio_init: str | Path = SCRATCH
    visual_init: str | Path = SCRATCH

    def arch(self, modality: str) -> str:
        return self.audio_arch if modality == "audio" else self.visual_arch

    def init(self, modality: str) -> str | Path:
        return self.audio_init if modality == "audio" else self.visual_init


@dataclass(frozen=True)
class StageConfig:
    """One training stage's optimisation. The scheduler steps once per epoch."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    step_size: int = 30  # scheduler "step": decay every step_size epochs ...
    gamma: float = 0.1  # ... by this factor


@dataclass(frozen=True)
class MaskConfig:
    """Stage-2 input masking (DESIGN.md, fusion-tune): pairs are (audio, visual)."""

    rule: str = "adaptive"
    tau: float = 0.5
    eta: tuple[float, float] = (2.0, 2.0)
    rho: tuple[float, float] = (0.5, 0.5)
    audio_patch: tuple[int, int] = (32, 8)  # time frames x mel bins
    visual_patch: tuple[int, int] = (10, 10)  # pixels x pixels, per frame


@dataclass(frozen=True)
class BalanceConfig:
    """OGM-GE (arm ``ogm-ge``): modulation strength and its window of stage-2 epochs
    (1-based, both ends included; ``end_epoch`` unset: to the last epoch)."""

    alpha: float = 0.5
    start_epoch: int = 1
    end_epoch: int | None = None

    def active(self, epoch: int) -> bool:
        """Whether 1-based ``epoch`` is inside the modulation window."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)


@dataclass(frozen=True)
class RunConfig:
    out_dir: Path = Path("runs/fusion")
    seed: int = 0
    # Several seeds: the whole configuration once per seed in out_dir/seed-<k>/, summarised
    # over seeds (mean, Student-t interval, paired differences). Unset: one run with ``seed``.
    seeds: tuple[int, ...] | None = None
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    #: DataLoader worker processes reading the feature stores; default: 0 on the CPU (workers
    #: would take cores from the step), up to 4 per process on CUDA (the step does not wait).
    workers: int | None = None
    # Every per-epoch scalar of metrics.jsonl also as TensorBoard curves, in out_dir/tensorboard/
    # (needs the tensorboard extra: pip install 'bnfix[tensorboard]').
    tensorboard: bool = False


@dataclass(frozen=True)
class FusionConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: Path | None = field(default=None, compare=False)  # the TOML file, for messages

    @property
    def manifest(self) -> Path:
        assert self.data.manifest is not None
        return self.data.manifest

    def stage(self, number: int) -> StageConfig:
        return self.stage1 if number == 1 else self.stage2


# --------------------------------------------------------------------------------------------
# Value checkers: raw TOML value (+ the folder relative paths start from) -> typed value.
# Each raises ValueError with the expectation; the caller adds the key and the value.

Check = Callable[[Any, Path], Any]


def _integer(low: int | None = None, high: int | None = None) -> Check:
    def check(v: Any, _base: Path) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(_expect("an integer", low, high))
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(_expect("an integer", low, high))
        return v

    return check


def _number(low: float | None = None, high: float | None = None, open_low: bool = False) -> Check:
    def check(v: Any, _base: Path) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(_expect("a number", low, high, open_low))
        below = low is not None and (v <= low if open_low else v < low)
        if below or (high is not None and v > high):
            raise ValueError(_expect("a number", low, high, open_low))
        return float(v)

    return check


def _expect(kind: str, low: float | None, high: float | None, open_low: bool = False) -> str:
    if low is not None and high is not None:
        return f"must be {kind} in {'(' if open_low else '['}{low}, {high}]"
    if low is not None:
        return f"must be {kind} {'>' if open_low else '≥'} {low}"
    return f"must be {kind}"


def _optional(check: Check) -> Check:
    def optional(v: Any, base: Path) -> Any:
        return None if v is None else check(v, base)

    return optional


def _boolean(v: Any, _base: Path) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _choice(*options: str) -> Check:
    def check(v: Any, _base: Path) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return check


def _path(v: Any, base: Path) -> Path:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a path (a non-empty string)")
    return (base / Path(v).expanduser()).resolve()


def _existing_file(v: Any, base: Path) -> Path:
    path = _path(v, base)
    if not path.exists():
        raise ValueError(f"no such file {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected a file")
    return path


def _arch(v: Any, _base: Path) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(
            "must be a torchvision model name (e.g. resnet18), pkg.module:factory or auto"
        )
    return v.strip()


def _init(v: Any, base: Path) -> str | Path:
    if v == SCRATCH:
        return SCRATCH
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be {SCRATCH!r} or a checkpoint path")
    return _existing_file(v, base)


def _pair(element: Check, what: str) -> Check:
    """One value for both modalities, ``[audio, visual]``, or ``{audio = .., visual = ..}``."""

    def check(v: Any, base: Path) -> tuple[Any, Any]:
        if isinstance(v, Mapping):
            unknown = set(v) - set(MODALITIES)
            if unknown or len(v) != 2:
                raise ValueError(f"as a table must have exactly the keys audio and visual {what}")
            items = [v["audio"], v["visual"]]
        elif isinstance(v, list):
            if len(v) != 2:
                raise ValueError(f"as a list must have two values [audio, visual] {what}")
            items = v
        else:
            items = [v, v]
        return tuple(element(item, base) for item in items)  # type: ignore[return-value]

    return check


def _seeds(v: Any, _base: Path) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative integers."""
    what = "must be a non-empty list of distinct integers ≥ 0, e.g. [0, 1, 2]"
    if not isinstance(v, list) or not v:
        raise ValueError(what)
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        raise ValueError(what)
    if len(set(v)) != len(v):
        raise ValueError(f"{what} (a seed is listed twice)")
    return tuple(v)


def _size_pair(v: Any, base: Path) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("must be two positive integers [height, width]")
    try:
        return (_integer(1)(v[0], base), _integer(1)(v[1], base))
    except ValueError:
        raise ValueError("must be two positive integers [height, width]") from None


_STAGE_KEYS: dict[str, Check] = {
    "epochs": _integer(1),
    "batch_size": _integer(2),
    "lr": _number(0, open_low=True),
    "optimizer": _choice(*OPTIMIZERS),
    "momentum": _number(0, 1),
    "weight_decay": _number(0),
    "scheduler": _choice(*SCHEDULERS),
    "step_size": _integer(1),
    "gamma": _number(0, 1, open_low=True),
}

#: Every section (dotted) and its keys with their checkers: the single source of truth for
#: what a config may contain.
SCHEMA: dict[str, dict[str, Check]] = {
    "data": {
        "manifest": _existing_file,
        "cache_dir": _path,
        "workers": _optional(_integer(1, 256)),
        "sample_timeout": _number(0, open_low=True),
    },
    "data.audio": {
        "sample_rate": _integer(1000),
        "mel_bins": _integer(4),
        "target_frames": _integer(1),
        "mean": _optional(_number()),
        "std": _optional(_number(0, open_low=True)),
    },
    "data.visual": {
        "frames": _integer(1),
        "size": _integer(8),
        "sampling": _choice("middle", "random"),
        "crop": _choice("fixed-scale", "random-resized"),
        "eval_resize": _choice("center-crop", "full-frame"),
        "fps": _number(0, 240, open_low=True),
        "max_frames": _integer(1, 1000),
    },
    "model": {
        "audio_arch": _arch,
        "visual_arch": _arch,
        "audio_init": _init,
        "visual_init": _init,
    },
    "stage1": _STAGE_KEYS,
    "stage2": _STAGE_KEYS,
    "mask": {
        "rule": _choice(*RULES),
        "tau": _number(0, 1),
        "eta": _pair(_number(0, open_low=True), "(each > 0)"),
        "rho": _pair(_number(0, 1), "(each in [0, 1])"),
        "audio_patch": _size_pair,
        "visual_patch": _size_pair,
    },
    "balance": {
        "alpha": _number(0),
        "start_epoch": _integer(1),
        "end_epoch": _optional(_integer(1)),
    },
    "run": {
        "out_dir": _path,
        "seed": _integer(0),
        "seeds": _seeds,
        "device": _choice(*DEVICES),
        "amp": _boolean,
        "workers": _optional(_integer(0, 64)),
        "tensorboard": _boolean,
    },
}


def valid_keys() -> list[str]:
    """Every dotted key a config may set, e.g. ``stage1.lr``."""
    return [f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys]


def _nearest(name: str, candidates: list[str]) -> str:
    # A key in the wrong section ("seed", "data.seed") is nearest to the key of that name.
    tail = name.rsplit(".", 1)[-1]
    close = [c for c in candidates if c.rsplit(".", 1)[-1] == tail]
    close = close or difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_key(key: str, where: Path | None) -> BnfixError:
    return BnfixError(f"unknown config key {key}{_nearest(key, valid_keys())}", where)


def _unknown_section(section: str, where: Path | None) -> BnfixError:
    close = difflib.get_close_matches(section, list(SCHEMA), n=1, cutoff=0.5)
    hint = f"; did you mean [{close[0]}]?" if close else f"; sections: {', '.join(SCHEMA)}"
    return BnfixError(f"unknown config section [{section}]{hint}", where)


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Value:
    raw: Any
    base: Path  # folder relative paths start from
    origin: str  # "the config file" or "the command line", for messages


def _flatten(table: Mapping[str, Any], prefix: str, base: Path, source: Path | None) -> dict:
    """Nested TOML tables -> {dotted key: _Value}, refusing unknown sections and keys."""
    flat: dict[str, _Value] = {}
    for name, value in table.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if not prefix or dotted in SCHEMA:
            if dotted not in SCHEMA and not isinstance(value, Mapping):
                raise _unknown_key(dotted, source)
            if dotted not in SCHEMA:
                raise _unknown_section(dotted, source)
            if not isinstance(value, Mapping):
                raise BnfixError(f"[{dotted}] must be a table, not a value", source)
            flat.update(_flatten(value, dotted, base, source))
        elif name in SCHEMA[prefix]:
            flat[dotted] = _Value(value, base, "the config file")
        elif isinstance(value, Mapping):
            raise _unknown_section(dotted, source)
        else:
            raise _unknown_key(dotted, source)
    return flat


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (``3``, ``1e-3``, ``true``, ``[32, 8]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, parsed value); unknown keys name the nearest valid one."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BnfixError(f"bad override {text!r}: expected section.key=value (e.g. stage1.lr=0.1)")
    if key not in valid_keys():
        raise _unknown_key(key, None)
    return key, _parse_value(value.strip())


def _build(flat: Mapping[str, _Value], base: Path, source: Path | None) -> FusionConfig:
    """Check every value and assemble the frozen dataclasses."""
    checked: dict[str, Any] = {}
    for key, value in flat.items():
        section, name = key.rsplit(".", 1)
        try:
            checked[key] = SCHEMA[section][name](value.raw, value.base)
        except ValueError as exc:
            where = source if value.origin == "the config file" else None
            message = str(exc)
            joined = f"{key} {message}" if message.startswith("must") else f"{key}: {message}"
            raise BnfixError(
                f"{joined} (got {_show(value.raw)} from {value.origin})", where
            ) from None
    if "data.manifest" not in checked:
        raise BnfixError(
            "data.manifest is required: set it under [data] or pass data.manifest=PATH", source
        )
    checked.setdefault("data.cache_dir", checked["data.manifest"].parent / ".bnfix-cache")
    checked.setdefault("run.out_dir", (base / RunConfig.out_dir).resolve())
    config = _assemble(FusionConfig(), "", checked)
    b = config.balance
    if b.end_epoch is not None and b.end_epoch < b.start_epoch:
        origin = flat.get("balance.end_epoch") or flat.get("balance.start_epoch")
        where = source if origin is not None and origin.origin == "the config file" else None
        raise BnfixError(
            f"balance.end_epoch ({b.end_epoch}) must be ≥ balance.start_epoch ({b.start_epoch})",
            where,
        )
    return replace(config, source=source)


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:60] + "…"


def _assemble(obj: Any, prefix: str, checked: Mapping[str, Any]) -> Any:
    changes = {}
    for f in fields(obj):
        if f.name == "source":
            continue
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        current = getattr(obj, f.name)
        if is_dataclass(current):
            changes[f.name] = _assemble(current, dotted, checked)
        elif dotted in checked:
            changes[f.name] = checked[dotted]
    return replace(obj, **changes)


def config_from_toml(
    text: str,
    base: Path,
    overrides: list[str] = (),  # type: ignore[assignment]
    source: Path | None = None,
    cwd: Path | None = None,
) -> FusionConfig:
    """Parse TOML text (paths relative to ``base``) and apply ``section.key=value`` overrides."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BnfixError(f"not valid TOML: {exc}", source) from None
    flat = _flatten(table, "", base, source)
    here = (cwd or Path.cwd()).resolve()
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = _Value(value, here, "the command line")
    return _build(flat, base, source)


def load_config(path: str | Path, overrides: list[str] = ()) -> FusionConfig:  # type: ignore[assignment]
    """Read a config file; relative paths in it start from the file's folder."""
    path = Path(path)
    if not path.exists():
        raise BnfixError("no such config file", path)
    if path.is_dir():
        raise BnfixError("is a folder, expected a .toml config file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BnfixError(f"cannot read the config: {exc}", path) from None
    return config_from_toml(text, path.resolve().parent, list(overrides), source=path)


# --------------------------------------------------------------------------------------------
# Writing


def as_dict(config: FusionConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with dotted section names, None values left out."""
    result: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        obj: Any = config
        for part in section.split("."):
            obj = getattr(obj, part)
        result[section] = {k: getattr(obj, k) for k in keys if getattr(obj, k) is not None}
    return result


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str | Path):
        text = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def render_toml(config: FusionConfig, header: list[str] = ()) -> str:  # type: ignore[assignment]
    """The resolved config as TOML that :func:`load_config` reads back to an equal config.

    Paths are written absolute, pairs as ``[audio, visual]``; ``header`` lines become comments
    (versions, git state), so the file stays a valid config.
    """
    return toml_text(as_dict(config), header)


def toml_text(sections: Mapping[str, Mapping[str, Any]], header: Sequence[str] = ()) -> str:
    """``{"data.audio": {"mel_bins": 64}, ...}`` as TOML: a ``[section]`` of ``key = value``
    lines each (scalars, paths and flat lists: all a config holds)."""
    lines = [f"# {line}" for line in header]
    for section, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def diff_configs(a: FusionConfig, b: FusionConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ (for refusing to resume with another config)."""
    da, db = as_dict(a), as_dict(b)
    keys = []
    for section in SCHEMA:
        for key in sorted(set(da[section]) | set(db[section])):
            dotted = f"{section}.{key}"
            if dotted not in ignore and da[section].get(key) != db[section].get(key):
                keys.append(dotted)
    return keys
