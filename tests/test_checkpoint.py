"""Checkpoint I/O on real files: every format and nesting, refusals, atomic writes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bnfix.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from bnfix.errors import BnfixError


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A small real network's state dict: conv, BN (with its int64 counter) and a classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 7),
    )  # fmt: skip
    model.train()(torch.randn(4, 3, 16, 16))  # non-trivial running statistics
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


NESTINGS = {
    "plain": (lambda sd: sd, []),
    "state_dict": (lambda sd: {"state_dict": sd, "epoch": 3}, ["unwrapped 'state_dict'"]),
    "model": (lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, ["unwrapped 'model'"]),
    "model_state_dict": (
        lambda sd: {"model_state_dict": sd, "epoch": 1},
        ["unwrapped 'model_state_dict'"],
    ),
    "net": (lambda sd: {"net": sd}, ["unwrapped 'net'"]),
    "dataparallel": (
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        ["stripped prefix 'module.'"],
    ),
    "lightning": (
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 9},
        ["unwrapped 'state_dict'", "stripped prefix 'model.'"],
    ),
    "compiled-ddp": (
        lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        ["stripped prefix 'module.'", "stripped prefix '_orig_mod.'"],
    ),
    "ema": (
        lambda sd: {"model": sd, "model_ema": {k: v * 2 for k, v in sd.items()}},
        ["unwrapped 'model' (also present, not used: model_ema)"],
    ),
    "ema-only": (lambda sd: {"state_dict_ema": sd}, ["unwrapped 'state_dict_ema'"]),
}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".legacy.pt"])
@pytest.mark.parametrize("nesting", sorted(NESTINGS))
def test_torch_formats_and_nestings_round_trip(tmp_path, state, suffix, nesting):
    wrap, notes = NESTINGS[nesting]
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(state), path, _use_new_zipfile_serialization=not suffix.startswith(".legacy"))
    ckpt = load_checkpoint(path)
    assert_same(ckpt.state_dict, state)
    assert ckpt.unwrapped == notes
    assert ckpt.format == ("torch-legacy" if "legacy" in suffix else "torch-zip")
    assert ckpt.sha256 == sha256_file(path)


def test_safetensors_round_trip_with_prefix(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, path, {"who": "me"})
    ckpt = load_checkpoint(path)
    assert_same(ckpt.state_dict, state)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"who": "me"}
    assert ckpt.unwrapped == ["stripped prefix 'module.'"]


def test_format_is_sniffed_not_trusted_from_suffix(tmp_path, state):
    path = tmp_path / "actually-safetensors.pt"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    assert load_checkpoint(path).format == "safetensors"


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x480, 0x580])
def test_safetensors_whose_header_length_looks_like_a_pickle_keep_their_metadata(
    tmp_path, header_len
):
    """A header of 0x480 bytes starts the file with ``80 04``, a pickle's protocol-4 opcode:
    it was read as a legacy torch file, which loads the tensors and drops the metadata (a
    fusion checkpoint's audio normalisation with it). Sized by padding one metadata value."""
    state = {"bn.weight": torch.randn(4), "bn.num_batches_tracked": torch.tensor(3)}
    path = tmp_path / "m.safetensors"
    for pad in range(2048):
        meta = {"bnfix_version": "x", "pad": "p" * pad}
        save_checkpoint(state, path, meta, force=True)
        if int.from_bytes(path.read_bytes()[:8], "little") == header_len:
            break
    else:
        pytest.fail(f"no padding gives a {header_len}-byte header")
    assert path.read_bytes()[:1] == b"\x80"
    back = load_checkpoint(path)
    assert back.format == "safetensors"
    assert back.metadata == meta
    assert_same(back.state_dict, state)


def test_select_picks_one_sub_model(tmp_path, state):
    path = tmp_path / "av.pt"
    both = {f"audio_net.{k}": v for k, v in state.items()}
    both |= {f"visual_net.{k}": v + 1 for k, v in state.items()}
    torch.save(both, path)
    ckpt = load_checkpoint(path, select="visual_net")
    assert ckpt.state_dict["0.weight"].equal(state["0.weight"] + 1)
    with pytest.raises(BnfixError, match=r"no key starts with 'fusion\.'"):
        load_checkpoint(path, select="fusion.")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_writes_metadata_atomically_and_refuses_overwrites(tmp_path, state, suffix):
    src = tmp_path / "src.pt"
    torch.save(state, src)
    out = tmp_path / f"out{suffix}"
    meta = {"bnfix_version": "x", "source": str(src), "strategy": "abri"}
    save_checkpoint(state, out, meta, inputs=(src,))
    back = load_checkpoint(out)
    assert_same(back.state_dict, state)
    assert back.metadata == meta
    before = out.read_bytes()
    with pytest.raises(BnfixError, match="pass --force"):
        save_checkpoint({k: v + 1 for k, v in state.items()}, out, meta)
    assert out.read_bytes() == before
    save_checkpoint({k: v * 0 for k, v in state.items()}, out, meta, force=True)
    assert load_checkpoint(out).state_dict["0.weight"].abs().sum() == 0
    src_bytes = src.read_bytes()
    with pytest.raises(BnfixError, match="overwrite the input"):
        save_checkpoint(state, src, meta, force=True, inputs=(src,))
    assert src.read_bytes() == src_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.pt", out.name])


def test_save_handles_tensors_sharing_storage(tmp_path):
    base = torch.arange(12.0)
    shared = {"a.weight": base[:6], "b.weight": base[6:], "c.weight": base.view(3, 4).t()}
    out = save_checkpoint(shared, tmp_path / "s.safetensors", {})
    back = load_checkpoint(out).state_dict
    for key, tensor in shared.items():
        assert torch.equal(back[key], tensor)


class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("use_zip", [True, False])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, state, use_zip):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "hook": _Payload(str(marker))}, path,
               _use_new_zipfile_serialization=use_zip)  # fmt: skip
    with pytest.raises(BnfixError, match=r"refused: .*pickled code \(posix.system\)"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is real: an unsafe load runs it, so the assertion above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_text("epoch,acc\n1,0.5\n"), "not a checkpoint"),
        (lambda p: p.write_bytes(pickle.dumps({"a": 1})), "not a tensor checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(range(200))), "truncated or corrupt"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: torch.save([1, 2, 3], p), "holds a list, not a state dict"),
        (lambda p: torch.save({"epoch": 3, "cfg": {"lr": 1}}, p), "found no state dict"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(BnfixError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("head", [b"\x80\x02", b"\x80\x04", b"PK\x03\x04", b"\x40\x00" + bytes(6)])
def test_garbage_after_a_valid_header_is_one_clear_error(tmp_path, head):
    """Whatever exception torch's unpickler or safetensors trips on, the user sees one line."""
    rng = np.random.default_rng(len(head) + head[1])
    for i in range(150):
        path = tmp_path / f"garbage{i}.pt"
        path.write_bytes(head + rng.bytes(int(rng.integers(1, 400))))
        with pytest.raises(BnfixError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files_are_refused(tmp_path, state, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(state, good)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, good)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BnfixError, match="truncated or corrupt"):
        load_checkpoint(cut)


def test_missing_file(tmp_path):
    with pytest.raises(BnfixError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("name", ["model_best.pth.tar", "OUT.PT", "w.Pth", "x.ckpt"])
def test_pytorch_names_in_any_case_are_written_as_pytorch(tmp_path, state, name):
    """``--out model_best.pth.tar`` (the ImageNet example's name) or ``OUT.PT`` was written as
    safetensors, which ``torch.load`` then cannot read."""
    out = save_checkpoint(state, tmp_path / name, {"strategy": "keep"})
    back = torch.load(out, weights_only=True)
    assert_same(dict(back), state)
    assert load_checkpoint(out).metadata == {"strategy": "keep"}


def test_models_side_by_side_are_read_as_prefixes_for_select(tmp_path, state):
    """``{"audio_net": sd, "visual_net": sd}`` and DINO's ``{"student", "teacher"}`` were
    "found no state dict ... use --select", and --select gave the same error: the nesting is
    read as key prefixes now, and a selected sub-model loses its own wrapper prefix."""
    path = tmp_path / "av.pt"
    torch.save({"audio_net": state, "visual_net": {k: v + 1 for k, v in state.items()},
                "epoch": 7}, path)  # fmt: skip
    both = load_checkpoint(path)
    assert set(both.state_dict) == {f"{m}.{k}" for m in ("audio_net", "visual_net") for k in state}
    assert "nested entries audio_net, visual_net read as key prefixes" in both.unwrapped
    visual = load_checkpoint(path, select="visual_net")
    assert_same(visual.state_dict, {k: v + 1 for k, v in state.items()})

    dino = tmp_path / "dino.pth"
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    torch.save({"student": {f"module.{k}": v * 2 for k, v in teacher.items()},
                "teacher": teacher, "epoch": 100}, dino)  # fmt: skip
    picked = load_checkpoint(dino, select="teacher")
    assert_same(picked.state_dict, state)
    assert "stripped prefix 'backbone.'" in picked.unwrapped
    student = load_checkpoint(dino, select="student")
    assert_same(student.state_dict, {k: v * 2 for k, v in state.items()})


def test_a_config_under_a_nesting_key_does_not_hide_the_weights(tmp_path, state):
    """``{"model": {"name": "resnet", "depth": 18}, "weights": sd}``: the first nesting key
    that is a mapping was taken, although it holds no tensor."""
    path = tmp_path / "cfg.pt"
    torch.save({"model": {"name": "resnet", "depth": 18}, "weights": state}, path)
    back = load_checkpoint(path)
    assert_same(back.state_dict, state)
    assert "unwrapped 'weights'" in back.unwrapped[0]
