"""``bnfix fusion-tune``: the click layer over :func:`bnfix.fusion.run.fusion_tune`.

Imports of torch and the training code happen inside the command, so ``bnfix --help`` and a
rejected config stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bnfix.errors import BnfixError

#: What a bare ``--compare`` stands for: ``none`` and the configured mask rule.
BARE = "\0bare"


def _split_compare(overrides: list[str], compare: str | None) -> tuple[list[str], bool | str]:
    """``--compare`` takes an optional list of arms; a bare ``--compare`` followed by an
    override (``--compare mask.rho=0``) hands the override back: arm names never hold '='."""
    if compare is None:
        return overrides, False
    if compare == BARE:
        return overrides, True
    if "=" in compare:
        return [compare, *overrides], True
    return overrides, compare


def _seed_list(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]; empty -> [] (refused by the config check, in its words)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if not item.isdigit():
            raise BnfixError(
                f"--seeds: {item!r} is not a seed; give integers ≥ 0 separated by commas, "
                "e.g. --seeds 0,1,2"
            )
    return [int(t) for t in items]


def _plot_only(out: Path) -> None:
    if not out.is_dir():
        raise BnfixError("--plot-only: no such run folder", out)
    try:
        from bnfix.fusion.plot import plot_run
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("matplotlib"):
            raise BnfixError("--plot-only needs matplotlib: pip install 'bnfix[plot]'") from None
        raise
    click.echo(f"wrote {plot_run(out)}")


@click.command(
    "fusion-tune",
    epilog="Overrides: any config key as section.key=value, e.g. stage1.lr=0.05 "
    "mask.rule=none run.out_dir=runs/b (values parsed as TOML, else a string). "
    "Under torchrun: torchrun --nproc-per-node N -m bnfix fusion-tune ...",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="TOML config (see examples/fusion_tune.toml); required unless --plot-only.",
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
    "compare",
    is_flag=False,
    flag_value=BARE,
    default=None,
    metavar="[ARMS]",
    help="Run several stage-2 arms from the same stage 1 and print them side by side: a "
    "comma-separated list of none, adaptive, mean, reference, ogm-ge, RULE+ogm-ge, ensemble "
    "(the first is the baseline of the paired differences). Bare --compare: none and "
    "mask.rule.",
)
@click.option(
    "--seeds",
    "seeds",
    metavar="LIST",
    default=None,
    help="Run the whole configuration once per seed, e.g. --seeds 0,1,2 (same as "
    "run.seeds=[0,1,2]): means, 95% Student-t intervals and paired differences.",
)
@click.option(
    "--plot-only",
    "plot_only",
    type=click.Path(path_type=Path),
    default=None,
    metavar="OUT_DIR",
    help="Redraw OUT_DIR/summary.png from a finished run (needs the plot extra); trains nothing.",
)
def fusion_tune(
    config_path: Path | None,
    overrides: tuple[str, ...],
    stage: str,
    resume: bool,
    force: bool,
    compare: str | None,
    seeds: str | None,
    plot_only: Path | None,
) -> None:
    """Two-stage Fusion Tuning (FusT) of an audio-visual model."""
    from bnfix.fusion.config import load_config
    from bnfix.fusion.distributed import rank_from_env

    try:
        if plot_only is not None:
            _plot_only(plot_only)
            return
        if config_path is None:
            raise BnfixError("--config FILE.toml is required (or --plot-only OUT_DIR)")
        overrides, arms = _split_compare(list(overrides), compare)
        if seeds is not None:
            overrides.append(f"run.seeds=[{seeds}]" if _seed_list(seeds) else "run.seeds=[]")
        config = load_config(config_path, overrides)
        if resume and force:
            raise BnfixError("--resume and --force contradict each other; pass one")
        from bnfix.cli import make_console
        from bnfix.fusion.run import fusion_tune as run

        run(config, stage=stage, resume=resume, force=force, compare=arms,
            console=make_console())  # fmt: skip
    except BnfixError:
        if rank_from_env() != 0:  # rank 0 says it; the other ranks exit quietly
            sys.exit(2)
        raise
