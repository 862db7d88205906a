"""A fusion-tune config that cannot run is refused before anything is created or extracted:
one line, exit 2, no out_dir and no feature cache left behind (in process, through the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import one_error_line, run_inprocess
from test_fusion_train import write_config

from bnfix.checkpoint import save_checkpoint
from bnfix.errors import BnfixError
from bnfix.fusion.synthetic import tiny_cnn, write_synthetic_av

EVIL = "bnfix_evil_factory"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refuse-data")
    return write_synthetic_av(folder, classes=2, per_class=3, seed=3, seconds=0.2, image_size=40)


def _not_a_checkpoint(folder: Path) -> list[str]:
    path = folder / "junk.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    return [f"model.visual_init={path}"]


def _names_a_factory(folder: Path) -> list[str]:
    """A real checkpoint whose metadata names a factory in a module that marks its import."""
    (folder / f"{EVIL}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(folder / 'imported')!r}).write_text('ran')\n"
        "def factory():\n    raise SystemExit('ran')\n"
    )
    path = folder / "named.safetensors"
    save_checkpoint(tiny_cnn().state_dict(), path, {"architecture": f"{EVIL}:factory"})
    return ["model.visual_arch=auto", f"model.visual_init={path}"]


CASES = {
    "unknown architecture": (
        lambda folder: ["model.visual_arch=resnet81"],
        "model.visual_arch: unknown architecture 'resnet81': not a torchvision model; did you mean "
        "resnet18?",
    ),
    "init not a checkpoint": (_not_a_checkpoint, "junk.pt: not a checkpoint"),
    "init names a factory": (_names_a_factory, "bnfix never imports code a file names"),
    "visual patch too large": (
        lambda folder: ["mask.visual_patch=[40, 8]"],
        "mask.visual_patch [40, 8] is larger than the visual crop, data.visual.size (32x32)",
    ),
    "audio patch too large": (
        lambda folder: ["mask.audio_patch=[16, 64]"],
        "mask.audio_patch [16, 64] is larger than the audio input",
    ),
    "random sampling, fewer stored frames than frames": (
        lambda folder: [
            "data.visual.sampling=random",
            "data.visual.frames=4",
            "data.visual.max_frames=3",
        ],
        "fusion.toml: data.visual.max_frames (3) must be at least data.visual.frames (4)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_that_cannot_run_leaves_no_out_dir_and_no_cache(
    case: str, small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, expected = CASES[case]
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, EVIL, raising=False)
    config = write_config(tmp_path / "cfg", small_set)
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_inprocess(
        "fusion-tune", "--config", config, f"run.out_dir={out}", f"data.cache_dir={cache}",
        *make(tmp_path),
    )  # fmt: skip
    assert result.code == 2, result.stderr
    assert expected in one_error_line(result.stderr)
    assert not out.exists() and not cache.exists()
    assert not (tmp_path / "imported").exists() and EVIL not in sys.modules


def test_mask_settings_no_arm_uses_are_not_refused(small_set: Path, tmp_path: Path) -> None:
    """Stage 1 alone, or stage 2 with rule none, masks nothing: a patch that fits no input is
    no reason to refuse them."""
    from bnfix.fusion.arms import parse_arms
    from bnfix.fusion.config import load_config
    from bnfix.fusion.manifest import read_manifest
    from bnfix.fusion.run import _check_models, plan_phases

    config = load_config(write_config(tmp_path / "cfg", small_set), ["mask.visual_patch=[40, 8]"])
    manifest = read_manifest(config.manifest)
    _check_models(config, manifest, plan_phases(manifest.modalities, "1", "adaptive", []), [])
    arms = parse_arms("none,ensemble", "adaptive")
    _check_models(config, manifest, plan_phases(manifest.modalities, "all", "adaptive", arms), arms)
    arms = parse_arms("none,mean", "adaptive")
    phases = plan_phases(manifest.modalities, "all", "adaptive", arms)
    with pytest.raises(BnfixError, match=r"mask\.visual_patch \[40, 8\]"):
        _check_models(config, manifest, phases, arms)


def test_max_frames_binds_only_random_sampling() -> None:
    """``max_frames`` caps what random sampling stores; segment-middle sampling stores exactly
    ``frames`` (16 for s3d) whatever it says."""
    from bnfix.fusion.features import VisualOptions

    assert VisualOptions(frames=16).stored_frames == 16
    with pytest.raises(BnfixError, match=r"max_frames \(10\) must be at least .*frames \(16\)"):
        VisualOptions(frames=16, sampling="random")
