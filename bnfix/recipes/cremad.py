"""CREMA-D: 91 actors speaking 12 sentences in six emotions; split by actor.

Layout under ROOT (the public release)::

    ROOT/AudioWAV/<clip>.wav        16 kHz speech
    ROOT/VideoFlash/<clip>.flv      the same take as video (a VideoMP4/ folder of .mp4 also works)

with clip names ``<actor>_<sentence>_<emotion>_<level>``, e.g. ``1001_DFA_ANG_XX``. The id is
the clip name, the label the emotion code (ANG, DIS, FEA, HAP, NEU, SAD). Each row names the wav
in ``audio`` and the flv in ``frames`` (the video is read for its frames only: the wav is the
release's own audio track, so decoding it from the flv again would add nothing). A clip found in
one folder only is reported as missing its other file.

The release has no official split, and a split by clip would put one actor's voice and face in
both training and test (a model then recognises the actor, not the emotion). So whole actors go
to one split: the sorted actors are shuffled with ``random.Random(seed)`` and cut by
``ratios`` (train, val, test; default 0.7, 0.1, 0.2, seed 0), counts rounded by largest
remainder so they add up: 91 actors give 64 / 9 / 18. The split is a function of the seed and
of the set of actors present, so a copy missing an actor's every clip splits differently.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

from bnfix.errors import BnfixError
from bnfix.recipes.common import SPLITS, VIDEO_EXTENSIONS, Recipe, Row, index_files

DEFAULT_RATIOS = (0.7, 0.1, 0.2)
DEFAULT_SEED = 0
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
CLIP = re.compile(r"(?P<actor>\d+)_(?P<sentence>[A-Z]+)_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]+)")
VIDEO_FOLDERS = ("VideoFlash", "VideoMP4")
LAYOUT = "ROOT/AudioWAV/<clip>.wav and ROOT/VideoFlash/<clip>.flv"


def build(
    root: Path, seed: int = DEFAULT_SEED, ratios: Sequence[float] | str = DEFAULT_RATIOS
) -> Recipe:
    """One row per clip with both files, in split order then clip name."""
    if not root.is_dir():
        raise BnfixError("no such dataset folder", root)
    if not (root / "AudioWAV").is_dir():
        raise BnfixError(f"no AudioWAV/ folder; expected {LAYOUT}", root)
    video_dir = next((root / d for d in VIDEO_FOLDERS if (root / d).is_dir()), None)
    if video_dir is None:
        raise BnfixError(f"no VideoFlash/ (or VideoMP4/) folder; expected {LAYOUT}", root)
    fractions = check_ratios(ratios)
    audio = index_files([root / "AudioWAV"], (".wav",))
    video = index_files([video_dir], VIDEO_EXTENSIONS)
    recipe = Recipe("cremad", root)
    names = sorted(set(audio) | set(video))
    odd = [n for n in names if not _parse(n)]
    if odd:
        recipe.notes.append(
            f"ignored {len(odd)} files whose names are not actor_sentence_emotion_level "
            f"(first: {odd[0]})"
        )
    clips = [n for n in names if _parse(n)]
    if not clips:
        raise BnfixError(f"no clips named like 1001_DFA_ANG_XX; expected {LAYOUT}", root)
    actor_split = split_actors(sorted({_parse(n)[0] for n in clips}), seed, fractions)
    per_split = {s: sum(v == s for v in actor_split.values()) for s in SPLITS}
    recipe.notes.append(
        "split by actor (seed {}): {}".format(
            seed,
            ", ".join(
                f"{s} {per_split[s]} actor{'s' if per_split[s] != 1 else ''}" for s in SPLITS
            ),
        )
    )
    order = {s: i for i, s in enumerate(SPLITS)}
    for name in sorted(clips, key=lambda n: (order[actor_split[_parse(n)[0]]], n)):
        actor, emotion = _parse(name)
        split = actor_split[actor]
        wav, flv = audio.get(name), video.get(name)
        if wav is None or flv is None:
            what = f"no {video_dir.name} video" if flv is None else "no AudioWAV wav"
            recipe.missing.append((name, f"{split}: {what}"))
            continue
        recipe.rows.append(Row(name, emotion, split, audio=wav, frames=flv))
    return recipe


def check_ratios(ratios: Sequence[float] | str) -> tuple[float, float, float]:
    """Three finite shares (train, val, test), train > 0, with a finite sum, scaled to sum to
    1; ``"7,1,2"`` (the command line's form) works too."""
    try:
        values = tuple(float(r) for r in (ratios.split(",") if isinstance(ratios, str) else ratios))
    except (TypeError, ValueError) as e:
        raise BnfixError(f"--ratios {ratios!r}: expected three numbers, e.g. 0.7,0.1,0.2") from e
    if len(values) != 3:
        raise BnfixError(f"--ratios needs three numbers train,val,test; got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values) or values[0] <= 0:
        raise BnfixError(
            f"--ratios {','.join(f'{v:g}' for v in values)}: shares must be finite and ≥ 0, "
            "train > 0"
        )
    total = sum(values)
    if not math.isfinite(total):  # 1e308,1e308,0: each finite, the sum not
        raise BnfixError(
            f"--ratios {','.join(f'{v:g}' for v in values)}: the shares' sum overflows; "
            "use smaller numbers, e.g. 0.7,0.1,0.2"
        )
    return values[0] / total, values[1] / total, values[2] / total


def split_actors(
    actors: Sequence[str], seed: int, ratios: tuple[float, float, float]
) -> dict[str, str]:
    """``{actor: split}``: the sorted actors shuffled by ``seed``, cut by ``ratios``.

    Counts are rounded by largest remainder (ties to the earlier split), so they sum to the
    number of actors; train always gets at least one.
    """
    order = sorted(actors)
    random.Random(seed).shuffle(order)
    n = len(order)
    exact = [r * n for r in ratios]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if counts[0] == 0:
        donor = max((1, 2), key=lambda i: counts[i])
        counts[donor] -= 1
        counts[0] += 1
    result = {}
    start = 0
    for split, count in zip(SPLITS, counts, strict=True):
        for actor in order[start : start + count]:
            result[actor] = split
        start += count
    return result


def _parse(name: str) -> tuple[str, str] | None:
    """``(actor, emotion)`` of a clip name, or None for a name outside the convention."""
    m = CLIP.fullmatch(name)
    if m is None or m["emotion"] not in EMOTIONS:
        return None
    return m["actor"], m["emotion"]
