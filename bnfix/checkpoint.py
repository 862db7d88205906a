"""Checkpoint I/O: read any common layout into a flat state dict, write atomically with metadata.

Reading never executes pickled code (``torch.load(weights_only=True)`` or safetensors), and
the format is sniffed from the file's first bytes rather than trusted from its suffix, so a
renamed file still reads and a text file gets a clear message instead of a pickle error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from bnfix.abri_keys import from_official
from bnfix.architectures import canonical_keys
from bnfix.errors import BnfixError, one_line

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Keys under which training frameworks nest the weights, most specific first. EMA variants
#: come after the plain weights: the plain model is what a user fine-tunes from.
NESTING_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "weights",
    "params",
    "state_dict_ema",
    "model_ema",
    "ema_state_dict",
    "ema",
)
#: Prefixes that wrappers add to every key (DataParallel, Lightning, torch.compile).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "backbone.", "encoder.")
#: Prefixes only a wrapper ever adds (never a real sub-module's name), so they are stripped
#: even from a mere majority of keys: a DataParallel state dict with a few keys added later.
PURE_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Where a ``.pt`` file bnfix writes keeps its metadata: the state dict's own ``_metadata``
#: (which ``load_state_dict`` reads by module path), under a name no module path can be, so
#: ``model.load_state_dict(torch.load(path))`` works unchanged.
TORCH_METADATA_KEY = "__bnfix__"


@dataclass
class Checkpoint:
    """A state dict read from disk, and the story of how it was found inside the file."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    sha256: str
    format: str  # "torch-zip" | "torch-legacy" | "safetensors"
    unwrapped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def natural_key(key: str) -> list[tuple[int, int | str]]:
    """Sort key comparing digit runs as numbers: ``features.2`` before ``features.10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key) if p]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sniff_format(head: bytes, size: int | None = None) -> str | None:
    """Tell a checkpoint's format from its first bytes (and the file's size); None for
    anything else.

    safetensors is tried first: its first byte is the low byte of the header's length, so a
    header of 640, 896, 1152 or 1408 bytes starts ``\x80\x02``..``\x80\x05`` exactly like a
    pickle. Its ninth byte is the header's ``{``, which a legacy ``torch.save`` file never has
    there (bytes 2..9 are its magic number), and its header fits in the file."""
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        fits = header_len + 8 <= size if size is not None else header_len < 100_000_000
        if header_len > 0 and fits:
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    return None


def load_checkpoint(path: str | Path, select: str | None = None) -> Checkpoint:
    """Read ``path`` and return the flat tensor state dict inside it.

    ``select`` keeps only the keys under one prefix (``audio_net.`` of a two-encoder model) and
    strips it, for files that hold several sub-models.
    """
    path = Path(path)
    if not path.exists():
        raise BnfixError("no such file", path)
    if path.is_dir():
        raise BnfixError("is a folder, expected a checkpoint file", path)
    size = path.stat().st_size
    if size == 0:
        raise BnfixError("file is empty (an interrupted download or save?)", path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    fmt = sniff_format(head, size)
    if fmt is None:
        raise BnfixError(
            "not a checkpoint: expected a PyTorch (.pt/.pth/.bin/.ckpt) or .safetensors file",
            path,
        )
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        raw, metadata = _read_safetensors(path)
        # safetensors stores keys sorted as strings (layer10 before layer2); natural order
        # puts them back in module order for the usual numbered layouts, so reports read
        # top to bottom as the network does.
        raw = {k: raw[k] for k in sorted(raw, key=natural_key)}
    else:
        raw = _read_torch(path, fmt)
        metadata = torch_metadata(raw)
    state, notes = unwrap(raw, path)
    if select:
        prefix = select if select.endswith(".") else select + "."
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            raise BnfixError(f"no key starts with {prefix!r}; check --select", path)
        notes.append(f"selected keys under '{prefix}'")
        state = _strip_prefixes(picked, notes)  # the sub-model's own wrapper, if any
    state, official = from_official(state)
    if official:
        notes.append("renamed the official ABRi ResNet layout (bn*_addition, fusion_weight*)")
    state, legacy = canonical_keys(state)
    if legacy:
        # Renamed here, not only when a model is built, so every layer a scan reports is named
        # as the model's module is (a probe matches layers to modules by name).
        notes.append("legacy DenseNet key names (norm.1 → norm1) mapped to torchvision's")
    return Checkpoint(path, state, sha256_file(path), fmt, notes, metadata)


def torch_metadata(raw: object) -> dict[str, str]:
    """bnfix's metadata in a loaded ``.pt``: in the state dict's ``_metadata`` (what bnfix
    writes now), or the ``bnfix_metadata`` entry that versions before 0.2 wrote next to it."""
    holder = getattr(raw, "_metadata", None)
    found = holder.get(TORCH_METADATA_KEY) if isinstance(holder, Mapping) else None
    if found is None and isinstance(raw, Mapping):
        found = raw.get("bnfix_metadata")
    if not isinstance(found, Mapping):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def _zip_kind(path: Path) -> str | None:
    """Name the zip archives torch.load cannot read as a state dict (TorchScript, export)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "a TorchScript archive (torch.jit.save)"
    if any("/models/" in n and n.endswith(".json") for n in names):
        return "a torch.export program (.pt2)"
    return None


def _read_torch(path: Path, fmt: str) -> object:
    kind = _zip_kind(path) if fmt == "torch-zip" else None
    if kind is not None:
        raise BnfixError(
            f"is {kind}, not a state dict; bnfix reads weights only: re-save the weights with "
            "torch.save(model.state_dict(), ...) or as .safetensors",
            path,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol chatter from torch
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise BnfixError(
                f"refused: loading it would run pickled code ({found.group(1)}); bnfix never "
                "does that. Re-save it with torch.save(model.state_dict(), ...) or as .safetensors",
                path,
            ) from None
        raise BnfixError(
            "not a tensor checkpoint torch can read safely (a plain pickle?); re-save it with "
            "torch.save(model.state_dict(), ...) or as .safetensors",
            path,
        ) from None
    except Exception as exc:
        # Corrupt bytes reach torch's weights-only unpickler, which fails with whatever the
        # broken opcode stream triggers (IndexError, KeyError, struct.error, ...), not only
        # RuntimeError; every one of them means the same thing to the user.
        raise BnfixError(
            f"cannot read this PyTorch file, it looks truncated or corrupt ({one_line(exc)})", path
        ) from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise BnfixError(
            f"cannot read this safetensors file, it looks truncated or corrupt ({one_line(exc)})",
            path,
        ) from None
    return tensors, dict(header.get("__metadata__") or {})


def unwrap(obj: object, path: Path | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Dig the tensor state dict out of the nesting that training code wraps around it.

    At each level the weights are either the level's own tensors or one of its nested
    mappings (``state_dict``, ``model``, ...). The nested mapping wins when it holds more
    tensors than the level itself: ``{"state_dict": sd, "best_acc1": tensor(71.2)}`` is ``sd``,
    not a one-tensor model.
    """
    notes: list[str] = []
    for _ in range(8):  # nesting is shallow in practice; the bound only guards against cycles
        if not isinstance(obj, Mapping):
            raise BnfixError(
                f"holds a {type(obj).__name__}, not a state dict; save model.state_dict()", path
            )
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        # the first nesting key that holds weights: {"model": {"depth": 18}, "weights": sd}
        key = next((k for k in NESTING_KEYS if _tensor_count(obj.get(k)) > 0), None)
        nested_wins = key is not None and _tensor_count(obj[key]) > len(tensors)
        if tensors and not nested_wins:
            if len(tensors) < len(obj):
                dropped = sorted(str(k) for k in obj if k not in tensors)
                notes.append(f"ignored non-tensor entries: {', '.join(dropped[:5])}")
            state = {str(k): v for k, v in tensors.items()}
            return _strip_prefixes(state, notes), notes
        if key is None:
            holding = [k for k, v in obj.items() if _tensor_count(v) > 0]
            if len(holding) > 1:
                # Several models side by side ({"audio_net": sd, "visual_net": sd}, DINO's
                # student and teacher): one state dict with their names as prefixes, for
                # --select to pick from.
                notes.append(
                    f"nested entries {', '.join(map(str, holding[:4]))} read as key prefixes"
                )
                return _flatten(obj), notes
            if len(holding) == 1:
                notes.append(f"unwrapped '{holding[0]}'")
                obj = obj[holding[0]]
                continue
            nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
            hint = f" (nested entries: {', '.join(map(str, nested[:6]))})" if nested else ""
            raise BnfixError(f"found no state dict inside{hint}; re-save model.state_dict()", path)
        others = [k for k in NESTING_KEYS if k != key and isinstance(obj.get(k), Mapping)]
        note = f"unwrapped '{key}'"
        if others:
            note += f" (also present, not used: {', '.join(others)})"
        if tensors:
            note += (
                f" (ignored loose tensors beside it: {', '.join(sorted(map(str, tensors))[:5])})"
            )
        notes.append(note)
        obj = obj[key]
    raise BnfixError("nesting too deep to find a state dict", path)


def _flatten(obj: Mapping, prefix: str = "", depth: int = 4) -> dict[str, torch.Tensor]:
    """Every tensor under ``obj`` by its dotted path (``audio_net.conv1.weight``)."""
    flat: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            flat[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping) and depth > 0:
            flat.update(_flatten(v, f"{prefix}{k}.", depth - 1))
    return flat


def _tensor_count(obj: object, depth: int = 4) -> int:
    """Tensors in a mapping and the mappings under it (bounded: nesting is shallow)."""
    if not isinstance(obj, Mapping) or depth == 0:
        return 0
    return sum(
        1 if isinstance(v, torch.Tensor) else _tensor_count(v, depth - 1) for v in obj.values()
    )


def _strip_prefixes(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes: any of them from every key, and a pure wrapper's (``module.``
    of DataParallel, ``_orig_mod.`` of torch.compile) from most keys, when that renames no key
    onto another."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            carrying = sum(k.startswith(prefix) for k in state)
            everywhere = carrying == len(state)
            if not everywhere and not (
                prefix in PURE_WRAPPER_PREFIXES and carrying > len(state) / 2
            ):
                continue
            renamed = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(renamed) < len(state):
                continue  # two keys would become one: the prefix is part of the names
            state = renamed
            extent = "" if everywhere else f" (from {carrying} of {len(state)} keys)"
            notes.append(f"stripped prefix '{prefix}'{extent}")
            changed = True
    return state


def check_writable(out: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would replace an input (even with ``force``), an existing file
    without ``force``, or a missing folder. Callers check before the work, writers again."""
    resolved = Path(out).resolve()
    if any(resolved == Path(p).resolve() for p in inputs):
        raise BnfixError("refusing to overwrite the input checkpoint; pick another --out", out)
    if Path(out).exists() and not force:
        raise BnfixError("exists; pass --force to replace it", out)
    if not Path(out).parent.is_dir():
        raise BnfixError("folder does not exist", Path(out).parent)


def writes_torch(out: Path) -> bool:
    """Whether ``out``'s name asks for a PyTorch file: ``.pt .pth .bin .ckpt`` in any case,
    and ``.pth.tar`` (the ImageNet example's ``model_best.pth.tar``); anything else is
    safetensors."""
    suffixes = [x.lower() for x in out.suffixes]
    if suffixes[-2:] == [".pth", ".tar"]:
        return True
    return bool(suffixes) and suffixes[-1] in TORCH_SUFFIXES


def cpu_state_dict(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``module.state_dict()`` detached on the CPU, keeping its ``_metadata``: the module
    versions a ``.pt`` file carries (MNASNet refuses to load a state dict without them)."""
    state = module.state_dict()
    plain: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k, v.detach().cpu()) for k, v in state.items()
    )
    plain._metadata = getattr(state, "_metadata", {})  # type: ignore[attr-defined]
    return plain


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    out: str | Path,
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write ``state_dict`` to ``out`` atomically: a temporary file in the same folder, renamed.

    ``.safetensors`` unless the name ends in a PyTorch suffix; a ``.pt`` file holds the bare
    state dict (``model.load_state_dict(torch.load(path))`` works) with the metadata in its
    ``_metadata`` under :data:`TORCH_METADATA_KEY`. Refuses to overwrite any of
    ``inputs`` (even with ``force``) and an existing ``out`` without ``force``.
    """
    out = Path(out)
    check_writable(out, force, inputs)
    meta = {str(k): str(v) for k, v in metadata.items()}
    if writes_torch(out):
        plain: OrderedDict[str, torch.Tensor] = OrderedDict(state_dict)
        versions = getattr(state_dict, "_metadata", None)
        plain._metadata = dict(versions or {})  # type: ignore[attr-defined]
        plain._metadata[TORCH_METADATA_KEY] = meta  # type: ignore[attr-defined]
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        payload = buffer.getvalue()
    else:
        payload = safetensors_save(_unshared(state_dict), metadata=meta)
    write_atomic(out, payload)
    return out


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask: mkstemp's
    temporary files are 0600, and renamed into place they made every output private."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(out: Path, payload: bytes) -> None:
    """Write bytes so that ``out`` is either untouched or complete, never half written."""
    try:
        # a short prefix: out's own name in it made a legal 250-character name too long
        fd, tmp = tempfile.mkstemp(prefix=".bnfix-", suffix=".tmp", dir=out.parent)
    except OSError as exc:  # read-only folder, no permission, disk full...
        raise BnfixError(f"cannot write here: {exc.strerror or one_line(exc)}", out) from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BnfixError(f"cannot write here: {exc.strerror or one_line(exc)}", out) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage; give each its own contiguous copy."""
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        t = tensor.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        result[key] = t
    return result
