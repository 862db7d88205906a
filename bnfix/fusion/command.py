"""``bnfix fusion-tune``: the click layer over :func:`bnfix.fusion.run.fusion_tune`.

Imports of torch and the training code happen inside the command, so ``bnfix --help`` and a
rejected config stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfix.errors import BnfixError


@click.command(
    "fusion-tune",
    epilog="Overrides: any config key as section.key=value, e.g. stage1.lr=0.05 "
    "mask.rule=none run.out_dir=runs/b (values parsed as TOML, else a string). "
    "Under torchrun: torchrun --nproc-per-node N -m bnfix fusion-tune ...",
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="TOML config (see examples/fusion_tune.toml).",
)
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
@click.option(
    "--stage",
    type=click.Choice(["1", "2", "all"]),
    default="all",
    show_default=True,
    help="Stage 1 only, stage 2 only (from a finished stage 1 in run.out_dir), or both.",
)
@click.option("--resume", is_flag=True, help="Continue a stopped run in run.out_dir.")
@click.option("--force", is_flag=True, help="Start over in a non-empty run.out_dir.")
@click.option(
    "--compare",
    is_flag=True,
    help="Also run stage 2 with mask rule none from the same stage 1; print both.",
)
def fusion_tune(
    config_path: Path,
    overrides: tuple[str, ...],
    stage: str,
    resume: bool,
    force: bool,
    compare: bool,
) -> None:
    """Two-stage Fusion Tuning (FusT) of an audio-visual model."""
    from bnfix.fusion.config import load_config
    from bnfix.fusion.distributed import rank_from_env

    try:
        config = load_config(config_path, list(overrides))
        if resume and force:
            raise BnfixError("--resume and --force contradict each other; pass one")
        from bnfix.cli import make_console
        from bnfix.fusion.run import fusion_tune as run

        run(config, stage=stage, resume=resume, force=force, compare=compare,
            console=make_console())  # fmt: skip
    except BnfixError:
        if rank_from_env() != 0:  # rank 0 says it; the other ranks exit quietly
            sys.exit(2)
        raise
