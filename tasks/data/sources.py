"""Reading raw labelled data: files, folders, split mappings, saved `datasets` folders and `hf://` ids.

Every row keeps where it came from (`_file`, `_row`: 1-based data row after any header) so that
validation can name the exact place of a problem.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.files import sha256_file, sha256_tree

if TYPE_CHECKING:  # pandas is imported where rows are read: a cached run's stage keys need only the hashes
    import pandas as pd

SUPPORTED = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
SPLIT_NAMES_HELP = "train/training, validation/valid/val/dev, test/testing"


class DataError(ValueError):
    """Problems with the input data; each line names the file, column, row(s) and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        n = len(problems)
        super().__init__(
            f"the data has {n} problem{'s' * (n != 1)}; nothing was written:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass
class RawPart:
    """Rows read from one file (or one split of a saved/hub dataset)."""

    split: str | None  # train / validation / test, or None for a pool to be split
    file: str
    frame: pd.DataFrame  # the file's columns plus _file and _row


@dataclass
class RawData:
    parts: list[RawPart]
    sources: dict[str, str] = field(default_factory=dict)  # file -> sha256 (or dataset fingerprint)
    problems: list[str] = field(default_factory=list)  # files that could not be read (load_source(collect=True))

    def by_split(self) -> dict[str | None, pd.DataFrame]:
        import pandas as pd

        out: dict[str | None, list[pd.DataFrame]] = {}
        for p in self.parts:
            out.setdefault(p.split, []).append(p.frame)
        return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"row{'s' * (len(rows) != 1)} {shown}{more}"


def _where(df: pd.DataFrame, mask) -> list[str]:
    """Group masked rows by file: ['file.csv rows 3, 9', ...] (rows are the `_row` each row was read with)."""
    out = []
    for file, sub in df[mask].groupby("_file", sort=False):
        out.append(f"{file} {_rows(sub['_row'].tolist())}")
    return out


def _fail(msg: str):
    raise DataError([msg])


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    sep = "\t" if path.suffix == ".tsv" else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8")
    except pd.errors.EmptyDataError:
        _fail(f"{path}: the file is empty (no header, no rows); fix: point data.source at a file with data")
    except UnicodeDecodeError as exc:
        _fail(
            f"{path}: not valid UTF-8 (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "fix: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    except pd.errors.ParserError as exc:
        _fail(
            f"{path}: cannot be parsed as {'TSV' if sep == chr(9) else 'CSV'} ({exc}); fix: check quoting and the delimiter"
        )
    _check_header(path, sep)
    return df


def _check_header(path: Path, sep: str) -> None:
    """Duplicated column names, read from the raw header (pandas would silently rename the second to `name.1`)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except csv.Error:  # a header pandas could parse but the csv module cannot (e.g. a giant field): nothing to add
        return
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, start=1):
        seen.setdefault(name.strip(), []).append(i)
    dups = [
        f"'{n}' {'twice' if len(c) == 2 else f'{len(c)} times'} (columns {', '.join(map(str, c))})"
        for n, c in seen.items()
        if len(c) > 1
    ]
    if dups:
        _fail(
            f"{path}: the header names column {'; '.join(dups)}; fix: give every column its own name "
            "(pandas would read the later one as '<name>.1' and ignore it)"
        )


def _read_jsonl(path: Path) -> pd.DataFrame:
    import pandas as pd

    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"{path}: not valid UTF-8 (byte {exc.start}); fix: re-save the file as UTF-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        rows = data
    else:
        bad = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"line {i} ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                bad.append(f"line {i} (not a JSON object)")
                continue
            rows.append(obj)
        if bad:
            _fail(
                f"{path}: invalid JSON lines: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; fix: one JSON object per line"
            )
    if not rows and not text.strip():
        _fail(f"{path}: the file is empty; fix: point data.source at a file with data")
    return pd.DataFrame(rows)


def load_split(prepared_dir: str | Path, split: str) -> pd.DataFrame:
    """One split of a prepared dataset (`<workspace>/datasets/<fingerprint>/<split>.parquet`)."""
    import pandas as pd

    return pd.read_parquet(Path(prepared_dir) / f"{split}.parquet")


def read_table(path: Path) -> pd.DataFrame:
    """Read one supported file into a DataFrame with `_file` and `_row` columns."""
    import pandas as pd

    if path.suffix in (".csv", ".tsv"):
        df = _read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        df = _read_jsonl(path)
    elif path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            _fail(f"{path}: cannot be read as Parquet ({exc}); fix: re-export the file")
    else:
        _fail(f"{path}: unsupported file type '{path.suffix}'; fix: use one of {', '.join(SUPPORTED)}")
    df = df.reset_index(drop=True)
    df["_file"] = str(path)
    df["_row"] = range(1, len(df) + 1)
    return df


def _split_name(stem: str) -> str | None:
    return SPLIT_ALIASES.get(stem.lower())


def _not_regular(path: Path, where: str) -> str | None:
    """A problem when `path` is a FIFO, device or socket (checked with stat: such a file is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = (
        "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
    )
    return (
        f"{where}: {path} is {kind}, not a regular file (it was not opened: reading it could block or never end); "
        "fix: point data.source at a data file or a folder of them"
    )


def _load_hf(spec: str) -> RawData:
    import datasets

    name, _, config = spec.removeprefix("hf://").partition("/")
    if "/" in config:  # org/name/config
        org_name, _, config = spec.removeprefix("hf://").rpartition("/")
        name = org_name
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as exc:
        _fail(
            f"{spec}: could not load from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}); "
            "fix: check the name and your network, or download the data and point data.source at the files"
        )
    return _from_dataset_dict(ds, spec)


def _from_dataset_dict(ds, label: str) -> RawData:
    import datasets

    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    parts, sources = [], {}
    mapped = {k: _split_name(k) for k in ds}
    use_splits = all(mapped.values())
    for key, split_ds in ds.items():
        df = split_ds.to_pandas().reset_index(drop=True)
        where = f"{label}[{key}]"
        df["_file"] = where
        df["_row"] = range(1, len(df) + 1)
        parts.append(RawPart(mapped[key] if use_splits else None, where, df))
        sources[where] = split_ds._fingerprint
    return RawData(parts, sources)


def source_files(source: str | dict[str, str]) -> tuple[str, list[tuple[str | None, Path]]]:
    """Where `data.source` lives, without reading it: (kind, [(split or None, path)]).

    kind is "files", "saved" (a `datasets.save_to_disk` folder) or "hf". Raises DataError for
    missing paths, FIFOs and devices (never opened), so a bad source fails before any work.
    """
    if isinstance(source, dict):
        problems = []
        for split, file in source.items():
            odd = _not_regular(Path(file), f"data.source.{split}")
            if odd:
                problems.append(odd)
            elif Path(file).is_dir():
                problems.append(f"data.source.{split}: {file} is a folder; fix: name one data file per split")
            elif not Path(file).is_file():
                problems.append(
                    f"data.source.{split}: file {file} does not exist; fix: check the path (relative to {Path.cwd()})"
                )
        if problems:
            raise DataError(problems)
        return "files", [(split, Path(file)) for split, file in source.items()]
    if source.startswith("hf://"):
        return "hf", []
    path = Path(source)
    odd = _not_regular(path, "data.source")
    if odd:
        _fail(odd)
    if not path.exists():
        _fail(f"data.source: {path} does not exist; fix: check the path (relative to {Path.cwd()})")
    if path.is_file():
        return "files", [(None, path)]
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        return "saved", [(None, path)]
    return "files", _folder_files(path)


def _folder_files(path: Path) -> list[tuple[str | None, Path]]:
    """A folder's data files: named by split (train.csv, dev.jsonl, ...) or, when no name is a split's, a pool."""
    entries = sorted(p for p in path.iterdir() if p.suffix in SUPPORTED and not p.is_dir())
    odd = [msg for p in entries if (msg := _not_regular(p, "data.source"))]
    if odd:
        raise DataError(odd)
    files = [p for p in entries if p.is_file()]
    if not files:
        _fail(f"data.source: folder {path} holds no {', '.join(SUPPORTED)} files; fix: add data files or point at one")
    names = [_split_name(f.stem) for f in files]
    if not any(names):
        return [(None, f) for f in files]
    problems = []
    unknown = [f.name for f, n in zip(files, names, strict=True) if n is None]
    if unknown:
        split_files = ", ".join(f.name for f, n in zip(files, names, strict=True) if n)
        one = len(unknown) == 1
        problems.append(
            f"data.source: folder {path} holds split files ({split_files}) and {', '.join(unknown)}, whose "
            f"{'name is not a split name' if one else 'names are not split names'}; fix: rename or move "
            f"{'it' if one else 'them'} (split names the loader understands: {SPLIT_NAMES_HELP}), or use a folder "
            "in which no file is named after a split to have the splits carved out of all of them"
        )
    for split in dict.fromkeys(n for n in names if n):
        same = [f.name for f, n in zip(files, names, strict=True) if n == split]
        if len(same) > 1:
            problems.append(
                f"data.source: folder {path} has {len(same)} files for the {split} split ({', '.join(same)}: "
                f"{'both' if len(same) == 2 else 'all'} name it); fix: merge them into one file or move the others away"
            )
    if problems:
        raise DataError(problems)
    return list(zip(names, files, strict=True))


def source_hashes(source: str | dict[str, str]) -> dict[str, str]:
    """file -> sha256 of its bytes (a saved folder: hash of its files; hf://: the id, hashed at load)."""
    kind, files = source_files(source)
    if kind == "hf":
        return {}
    if kind == "saved":
        return {str(files[0][1]): sha256_tree(files[0][1])}
    return {str(path): sha256_file(path) for _, path in files}


def load_source(source: str | dict[str, str], hashes: dict[str, str] | None = None, collect: bool = False) -> RawData:
    """Read `data.source` in any of its forms. Paths are relative to the current directory.

    Every file is read even when one fails; the problems of all files are raised together, or (collect=True)
    returned in `RawData.problems` with the files that could be read, so validation can add its own to them."""
    kind, files = source_files(source)
    if kind == "hf":
        return _load_hf(source)
    hashes = hashes if hashes is not None else source_hashes(source)
    if kind == "saved":
        import datasets

        raw = _from_dataset_dict(datasets.load_from_disk(str(files[0][1])), str(files[0][1]))
        raw.sources = hashes
        return raw
    parts, problems = [], []
    for split, path in files:
        try:
            parts.append(RawPart(split, str(path), read_table(path)))
        except DataError as exc:
            problems += exc.problems
    if problems and not collect:
        raise DataError(problems)
    return RawData(parts, hashes, problems)
