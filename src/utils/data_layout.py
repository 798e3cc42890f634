"""Where Theta's data lives: the user's files, the shipped sample, the held-out set, and what Theta writes.

    from src.utils.data_layout import resolve_sources, resolve_test_set
    sources = resolve_sources(Path("Datasets"))        # which data a run reads, and why
    print(sources.describe())                          # the one line a run prints about it
    resolve_test_set(Path("Datasets"))                 # the held-out set preparation and evaluation agree on
    python -m src.utils.data_layout --datasets_dir Datasets   # print that line and the held-out set's path

The layout, in the paragraph README.md gives the user ("Bring your own data"):
your files go in ``Datasets/`` (sub-folders too). The shipped sample (its Q&A files, its ``knowledge/`` notes and
its held-out ``test_set.json``) sits in ``Datasets/sample/`` and is read only when ``Datasets/`` holds no data of
your own, or when asked (``--include_sample``). The held-out set is yours when ``Datasets/test_set.json`` exists;
else the sample's when the sample is all the data; else preparation draws one from your data and writes it to
``Datasets/enhanced_test_set.json``, again on every run. Theta writes only files named ``enhanced_*`` and the
``knowledge_base/`` folder, and never reads them as data; a file named ``test_set.json`` is never trained on.

Why the sample's held-out set is not used when the sample is only *added* to the user's data: it holds no
question of the user's domains, so the numbers of the morning report would say nothing about them.

This module is the one definition of "a data file" (suffixes, the folders and names left out) that preparation,
the knowledge step, the survey of problems, theta-tiny's tokenizer and the evaluator share. Standard library only:
every layer may import it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_DIR = "sample"
KNOWLEDGE_DIR = "knowledge"  # notes for retrieval, never Q&A records
KNOWLEDGE_INDEX_DIR = "knowledge_base"  # what the knowledge step writes
PREPARED_NAME = "enhanced_training_data.json"
STATS_NAME = "enhanced_data_stats.json"
GENERATED_TEST_NAME = "enhanced_test_set.json"
TEST_SET_NAME = "test_set.json"
GENERATED_NAMES = frozenset({PREPARED_NAME, STATS_NAME, GENERATED_TEST_NAME})
NOT_DATA_DIRS = frozenset({KNOWLEDGE_DIR, KNOWLEDGE_INDEX_DIR})
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def is_readable_name(path: Path) -> bool:
    """Whether preparation has a reader for this file name (JSON, JSON Lines, gzipped ones, CSV, TSV, Parquet)."""
    return path.name.lower().endswith(JSON_SUFFIXES) or path.suffix.lower() in TABLE_SUFFIXES


def is_readme(path: Path) -> bool:
    """A folder's README (the project's own ``Datasets/README.md`` among them): documentation, never data, and not
    worth a "skipped" line on every run."""
    return path.name.lower().split(".")[0] == "readme"


def _candidates(datasets_dir: Path, in_sample: bool) -> tuple[list[Path], list[Path]]:
    """``(data files, other files)`` under ``datasets_dir`` (``in_sample``: only under ``sample/``; else all but
    ``sample/``), sorted. Left out of both: hidden entries, ``knowledge/`` and ``knowledge_base/`` (also inside
    ``sample/``), READMEs, what Theta writes and every ``test_set.json``."""
    data, other = [], []
    base = datasets_dir / SAMPLE_DIR if in_sample else datasets_dir
    if not base.is_dir():
        return data, other
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(datasets_dir).parts
        inner = rel[1:] if rel[0] == SAMPLE_DIR else rel
        if not in_sample and rel[0] == SAMPLE_DIR:
            continue
        if any(part.startswith(".") for part in rel) or (len(inner) > 1 and inner[0] in NOT_DATA_DIRS):
            continue
        if not path.is_file() or is_readme(path) or path.name in GENERATED_NAMES or path.name == TEST_SET_NAME:
            continue
        (data if is_readable_name(path) else other).append(path)
    return data, other


@dataclass(frozen=True)
class DataSources:
    """What a run reads from ``datasets_dir``: its own files, the sample, or both; the held-out set; the notes.

    ``test_set_kind`` is ``yours`` (``Datasets/test_set.json``), ``sample`` or ``generated`` (drawn by preparation
    into ``Datasets/enhanced_test_set.json``). ``empty``: nothing to read at all (no data and no sample).
    """
    datasets_dir: Path
    user_files: tuple[Path, ...]
    sample_files: tuple[Path, ...]
    read_user: bool
    read_sample: bool
    test_set: Path
    test_set_kind: str
    knowledge_dirs: tuple[Path, ...]
    other_files: tuple[Path, ...] = field(default=())

    @property
    def files(self) -> list[Path]:
        """The data files this run reads, sorted by path."""
        chosen = (self.user_files if self.read_user else ()) + (self.sample_files if self.read_sample else ())
        return sorted(chosen)

    @property
    def empty(self) -> bool:
        return not self.files

    @property
    def sample_only(self) -> bool:
        return self.read_sample and not self.read_user

    def describe(self) -> str:
        """One line: which data, and which held-out set, in words."""
        return f"{self.data_line()}; {self.test_line()}"

    def test_line(self) -> str:
        test = {"yours": "yours", "sample": "the sample's",
                "generated": "drawn from the data by preparation, rewritten on every run"}[self.test_set_kind]
        return f"held-out set: {_shown(self.test_set)} ({test})"

    def data_line(self) -> str:
        """Which data this run reads, and why, in words."""
        where = _shown(self.datasets_dir)
        n_user, n_sample = len(self.user_files), len(self.sample_files)
        if self.empty:
            return (f"data: {where}/ holds no data file (JSON, JSON Lines, CSV, TSV or Parquet) and no sample; "
                    "put your files there (documentation/DATASETS.md)")
        if self.sample_only:
            data = (f"data: {where}/ holds no data of your own, so this run uses the sample in {where}/{SAMPLE_DIR}/ "
                    f"({n_sample} files); put your files in {where}/ to train on them")
        elif self.read_sample:
            data = (f"data: your {n_user} file{'s' * (n_user != 1)} in {where}/ and the sample in "
                    f"{where}/{SAMPLE_DIR}/ (--include_sample)")
        else:
            data = f"data: your {n_user} file{'s' * (n_user != 1)} in {where}/"
            if n_sample:
                data += f" (the sample in {where}/{SAMPLE_DIR}/ is not read; --include_sample adds it)"
        return data


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def resolve_sources(datasets_dir: Path | str, include_sample: bool = False) -> DataSources:
    """Which data a run reads (see the module docstring): the user's files when there are any (plus the sample
    with ``include_sample``), else the sample; the held-out set; the knowledge folders."""
    datasets_dir = Path(datasets_dir)
    user, other = _candidates(datasets_dir, in_sample=False)
    sample, sample_other = _candidates(datasets_dir, in_sample=True)
    read_user = bool(user)
    read_sample = bool(sample) and (include_sample or not user)
    sample_dir = datasets_dir / SAMPLE_DIR
    if (datasets_dir / TEST_SET_NAME).is_file():
        test_set, kind = datasets_dir / TEST_SET_NAME, "yours"
    elif read_sample and not read_user and (sample_dir / TEST_SET_NAME).is_file():
        test_set, kind = sample_dir / TEST_SET_NAME, "sample"
    else:
        test_set, kind = datasets_dir / GENERATED_TEST_NAME, "generated"
    knowledge = [datasets_dir / KNOWLEDGE_DIR] if (datasets_dir / KNOWLEDGE_DIR).is_dir() else []
    if read_sample and (sample_dir / KNOWLEDGE_DIR).is_dir():
        knowledge.append(sample_dir / KNOWLEDGE_DIR)
    return DataSources(datasets_dir, tuple(user), tuple(sample), read_user, read_sample, test_set, kind,
                       tuple(knowledge), tuple(other + (sample_other if read_sample else [])))


def resolve_test_set(datasets_dir: Path | str) -> Path:
    """The held-out set: ``Datasets/test_set.json`` (yours), else the sample's when the sample is all the data,
    else the one preparation draws (``Datasets/enhanced_test_set.json``). ``--include_sample`` never changes it."""
    return resolve_sources(datasets_dir).test_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Say which data and which held-out set a run in this folder uses.",
                                allow_abbrev=False)
    p.add_argument("--datasets_dir", type=Path, default=Path(__file__).resolve().parents[2] / "Datasets",
                   help="the data folder (default Datasets/)")
    p.add_argument("--include_sample", action=argparse.BooleanOptionalAction, default=False,
                   help="also read the sample in <datasets_dir>/sample/ next to your own files")
    args = p.parse_args(argv)
    sources = resolve_sources(args.datasets_dir, args.include_sample)
    print(sources.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
