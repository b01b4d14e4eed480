"""MR sequence names: BraTS aliases, a run's list of sequences, and the checks on inputs.

A run reads one sequence (`"t2"`) or several co-registered ones stacked as image channels
(`"flair,t2"`: channel 0 is FLAIR, channel 1 T2, in the order given). BraTS renamed its
sequences over the years; the names of one group below are the same sequence.
"""

from pathlib import Path

from jaxvae.base.errors import ConfigError
from jaxvae.data import nifti

# BraTS renamed its modalities over the years (2023: t1n, t1c, t2w, t2f).
_MODALITY_GROUPS = (("t1", "t1n"), ("t1ce", "t1c", "t1gd"), ("t2", "t2w"), ("flair", "t2f"))
KNOWN_SEQUENCES = tuple(m for group in _MODALITY_GROUPS for m in group)


def modality_aliases(modality: str) -> tuple[str, ...]:
    m = modality.lower()
    for group in _MODALITY_GROUPS:
        if m in group:
            return group
    return (m,)


def same_modality(a: str, b: str) -> bool:
    """Whether two modality names are the same sequence (BraTS aliases included)."""
    return b.lower() in modality_aliases(a)


def modality_of(path) -> str | None:
    """The BraTS modality a file's name ends in (`<ID>_flair.nii.gz` -> "flair"), or None."""
    stem = nifti.volume_stem(Path(path)).lower()
    return next((m for m in KNOWN_SEQUENCES if stem.endswith((f"_{m}", f"-{m}"))), None)


def parse_modalities(modality, *, canonical: bool = True) -> tuple[str, ...]:
    """The sequences of a --modality value: "flair,t2" -> ("flair", "t2"), in that order.

    Args:
      modality: a comma-separated string or a sequence of names; each a BraTS sequence
        (t1, t1ce, t2, flair) or a BraTS 2023 alias (t1n, t1c / t1gd, t2w, t2f),
        case-insensitive.
      canonical: False: the names as given, lower-cased (for messages).

    Returns:
      The names in the order given (the channel order), each as its group's first name
      ("T2W" -> "t2", "t2f" -> "flair"): one name per sequence in rows and records.

    Raises:
      ConfigError: empty, an unknown name, or one sequence twice (aliases included).
    """
    names = modality.split(",") if isinstance(modality, str) else list(modality)
    names = tuple(str(n).strip().lower() for n in names)
    known = ", ".join(KNOWN_SEQUENCES)
    if not names or not all(names):
        raise ConfigError(f"no sequence in modality {modality!r}; give e.g. flair or "
                          f"flair,t2 (known: {known})")
    for i, n in enumerate(names):
        if n not in KNOWN_SEQUENCES:
            raise ConfigError(f"unknown sequence {n!r} in modality {modality!r}; known: {known}")
        twice = next((m for m in names[:i] if same_modality(m, n)), None)
        if twice is not None:
            raise ConfigError(f"sequence {n!r} given twice in modality {modality!r}"
                              + ("" if twice == n else f" (as {twice!r} and {n!r})"))
    return tuple(modality_aliases(n)[0] for n in names) if canonical else names


def modality_text(modality) -> str:
    """The comma-separated form a run records ("flair,t2")."""
    return ",".join(parse_modalities(modality))


def check_sequences(trained, asked) -> None:
    """Refuse inputs of other sequences than a multi-sequence run's (or the other way round).

    Between two single sequences nothing is checked here (`check_modality` does, by file
    name, and --modality may override it); where either side holds several sequences, the
    two must be the same sequences in the same order: they are the model's input channels.

    Args:
      trained: the run's modality (cfg.data["modality"]; None: not checked).
      asked: the user's --modality (None: not given).

    Raises:
      ConfigError: the sequences differ (the message names both).
    """
    if trained is None or asked is None:
        return
    run, want = parse_modalities(trained), parse_modalities(asked)
    if len(run) == len(want) == 1:
        return
    if len(run) != len(want) or not all(map(same_modality, run, want)):
        raise ConfigError(f"this run reads {','.join(run)} ({len(run)} channel(s)); the input "
                          f"was asked as {','.join(want)}: give --modality {','.join(run)} "
                          "(the run's sequences, in its order)")


def check_modality(path, trained, asked):
    """Refuse an input named as another sequence than the run's, unless `asked` says so.

    Args:
      path: the input volume; trained: the run's modality (None: not checked; several
        sequences "flair,t2": the file may be any of them); asked: the user's --modality
        (None: not given).
    """
    named = modality_of(path)
    if trained is None or named is None:
        return
    if any(same_modality(m, named) for m in _names(trained)):
        return
    if asked is None or not any(same_modality(m, named) for m in _names(asked)):
        raise ConfigError(f"{path}: its name says {named}, the run was trained on {trained}; "
                          f"pass --modality {named} to score it anyway")


def _names(modality) -> list[str]:
    """The names of a modality value, unchecked (a run's record is taken as it is)."""
    names = modality.split(",") if isinstance(modality, str) else modality
    return [str(n).strip() for n in names]
