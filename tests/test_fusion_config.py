"""fusion-tune configuration: TOML + overrides, checked before anything runs or is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import one_error_line, run_cli

from bnfix.errors import BnfixError
from bnfix.fusion.config import (
    FusionConfig,
    MaskConfig,
    StageConfig,
    config_from_toml,
    load_config,
    render_toml,
    valid_keys,
)
from bnfix.fusion.extract import SAMPLE_TIMEOUT

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fusion_tune.toml"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.csv").write_text("id,audio,label,split\n")
    (tmp_path / "init.pt").write_bytes(b"x")
    return tmp_path


def parse(folder: Path, text: str, *overrides: str) -> FusionConfig:
    return config_from_toml(text, folder, list(overrides), source=folder / "c.toml", cwd=folder)


BASE = '[data]\nmanifest = "data/m.csv"\n'


def error(folder: Path, text: str, *overrides: str) -> str:
    with pytest.raises(BnfixError) as info:
        parse(folder, text, *overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_and_relative_paths(folder: Path) -> None:
    config = parse(folder, BASE + '[run]\nout_dir = "runs/a"\n', "data.cache_dir=cache")
    assert config.data.manifest == folder / "data" / "m.csv"
    assert config.run.out_dir == folder / "runs" / "a"
    assert config.data.cache_dir == folder / "cache"  # command line: from the current folder
    assert config.stage1 == StageConfig() and config.mask == MaskConfig()
    assert config.mask.audio_patch == (32, 8) and config.mask.visual_patch == (10, 10)
    assert config.model.audio_arch == "resnet18" and config.model.visual_init == "scratch"
    assert config.data.sample_timeout == SAMPLE_TIMEOUT  # the library's default, not a copy


def test_default_cache_is_next_to_the_manifest(folder: Path) -> None:
    assert parse(folder, BASE).data.cache_dir == folder / "data" / ".bnfix-cache"


def test_overrides_are_parsed_as_toml(folder: Path) -> None:
    config = parse(
        folder,
        BASE,
        "stage1.lr=1e-3",
        "stage2.epochs=7",
        "run.amp=false",
        "mask.audio_patch=[16, 4]",
        "mask.eta={audio = 1, visual = 3.5}",
        "mask.rho=0.25",
        "model.audio_init=init.pt",
        "model.visual_arch=pkg.mod:factory",
    )
    assert config.stage1.lr == 1e-3 and config.stage2.epochs == 7 and config.run.amp is False
    assert config.mask.audio_patch == (16, 4)
    assert config.mask.eta == (1.0, 3.5) and config.mask.rho == (0.25, 0.25)
    assert config.model.audio_init == folder / "init.pt"
    assert config.model.visual_arch == "pkg.mod:factory"


def test_rendered_config_reads_back_equal(folder: Path) -> None:
    config = parse(folder, BASE, "mask.eta=[1.5, 2]", "run.seed=9", "data.audio.mean=-4.5")
    text = render_toml(config, ["a comment"])
    assert text.startswith("# a comment\n")
    (folder / "again.toml").write_text(text)
    assert load_config(folder / "again.toml") == config


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (
            BASE + "[stage1]\nlrr = 0.1\n",
            (),
            "unknown config key stage1.lrr; did you mean stage1.lr?",
        ),
        (BASE + "[stage3]\nlr = 0.1\n", (), "unknown config section [stage3]; did you mean [stage"),
        (BASE + "[data.audo]\nmel_bins = 64\n", (), "did you mean [data.audio]?"),
        ("seed = 3\n" + BASE, (), "unknown config key seed; did you mean run.seed?"),
        (BASE + "seed = 3\n", (), "unknown config key data.seed; did you mean run.seed?"),
        (BASE, ("run.sed=3",), "unknown config key run.sed; did you mean run.seed?"),
        (BASE, ("lr=3",), "did you mean stage1.lr?"),
        (BASE, ("stage1.lr",), "expected section.key=value"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_one(folder, text, overrides, expected) -> None:
    assert expected in error(folder, text, *overrides)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage1.lr=fast", "stage1.lr must be a number > 0 (got 'fast'"),
        ("stage1.lr=0", "stage1.lr must be a number > 0"),
        ("data.sample_timeout=0", "data.sample_timeout must be a number > 0"),
        ("stage1.epochs=2.5", "stage1.epochs must be an integer ≥ 1"),
        ("stage2.batch_size=1", "stage2.batch_size must be an integer ≥ 2"),
        ("stage1.epochs=true", "stage1.epochs must be an integer"),
        ("stage1.optimizer=adam", "must be one of sgd, adamw"),
        ("stage2.scheduler=linear", "must be one of none, cosine, step"),
        ("mask.rule=random", "must be one of adaptive, mean, none, reference"),
        ("mask.tau=1.5", "mask.tau must be a number in [0, 1]"),
        ("mask.rho=[0.5]", "two values [audio, visual]"),
        ("mask.rho=[0.5, 2]", "mask.rho"),
        ("mask.eta={audio = 1}", "exactly the keys audio and visual"),
        ("mask.audio_patch=[32]", "two positive integers"),
        ("mask.visual_patch=[10, 0]", "two positive integers"),
        ("run.device=gpu", "must be one of auto, cpu, cuda"),
        ("run.amp=yes", "must be true or false"),
        ("data.visual.size=4", "data.visual.size must be an integer ≥ 8"),
        ("data.audio.std=0", "data.audio.std must be a number > 0"),
        ("model.audio_init=missing.pt", "model.audio_init: no such file"),
        ("model.visual_init=data", "is a folder"),
        ("data.manifest=nope.csv", "data.manifest: no such file"),
        ("model.audio_arch=", "must be a torchvision model name"),
    ],
)
def test_bad_values_say_what_was_expected(folder: Path, override: str, expected: str) -> None:
    message = error(folder, BASE, override)
    assert expected in message
    assert "from the command line" in message


def test_errors_from_the_file_name_the_file(folder: Path) -> None:
    message = error(folder, BASE + "[stage1]\nlr = -1\n")
    assert message.startswith(f"{folder / 'c.toml'}: stage1.lr must be")
    assert "from the config file" in message
    assert "data.manifest is required" in error(folder, "[stage1]\nlr = 1\n")
    assert "not valid TOML" in error(folder, "[data\n")
    assert "must be a table" in error(folder, "data = 3\n")


def test_the_example_config_names_every_key(folder: Path) -> None:
    text = EXAMPLE.read_text()
    for key in valid_keys():
        section, name = key.rsplit(".", 1)
        assert f"[{section}]" in text, section
        assert re.search(rf"^#? ?{name} = ", text, re.M), key
    config = load_config(EXAMPLE, [f"data.manifest={folder / 'data' / 'm.csv'}"])
    assert config.stage1 == StageConfig() and config.mask == MaskConfig()
    assert config.run.out_dir == EXAMPLE.parent / "runs" / "fusion"


def test_cli_refuses_bad_configs_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.csv").write_text("id,audio,split\nx,a.wav,train\n")  # no label column
    config = tmp_path / "c.toml"
    config.write_text('[data]\nmanifest = "data/bad.csv"\n[run]\nout_dir = "out"\n')
    cases = [
        (["--config", tmp_path / "missing.toml"], "no such config file"),
        (["--config", config, "data.manifest=data/none.csv"], "data.manifest: no such file"),
        (["--config", config], "missing column 'label'"),
    ]
    for args, expected in cases:
        result = run_cli("fusion-tune", *args, cwd=tmp_path)
        assert result.code == 2, result.stderr
        assert expected in one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "data"]
    assert sorted(p.name for p in data.iterdir()) == ["bad.csv"]
