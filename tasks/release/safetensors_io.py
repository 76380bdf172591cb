"""Reading and writing safetensors files one tensor at a time, without mapping whole files into memory.

`safe_open` maps the whole file; every page it touches stays resident (and counts in the process's RSS) until
the file is closed, so reading a 4 GB single-file base through it holds 4 GB by the end. Here a tensor is read
with a plain `readinto` at the offsets the header gives (the format: 8 bytes little-endian header length, the JSON
header, then the bytes), and an output file is written tensor by tensor after a header computed up front (shapes and
dtypes are known before any value is), so memory holds one tensor at a time. Files written here load with
`safetensors` and `transformers` (tests/test_shard_merge.py checks both).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})


class SafetensorsFormatError(ValueError):
    """A safetensors file that cannot be read as one (the message names the file)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are (absolute offsets) and what they hold."""

    file: Path
    name: str
    dtype: str  # the safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '64KiB' -> 65536 (the units transformers' max_shard_size takes)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write it like 2GB, 500MB or 64KiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def read_header(path: str | Path) -> dict[str, Entry]:
    """{tensor name: Entry} of one safetensors file, from its header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > MAX_HEADER:
                raise SafetensorsFormatError(f"{path}: header of {size} bytes is not a safetensors header")
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise SafetensorsFormatError(f"{path} is not a readable safetensors file ({exc})") from None
    start = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name} has dtype {info.get('dtype')}, not supported here")
        lo, hi = info["data_offsets"]
        out[name] = Entry(path, name, info["dtype"], tuple(int(s) for s in info["shape"]), start + lo, start + hi)
    return out


def folder_entries(folder: str | Path) -> dict[str, Entry] | None:
    """Every tensor of a model folder's safetensors weights (one file, or the shards its index names), in file
    order; None when the folder holds no safetensors weights."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise SafetensorsFormatError(f"{folder / INDEX_FILE} is not a safetensors index ({exc})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        return None
    out: dict[str, Entry] = {}
    for name in files:
        out.update(read_header(folder / name))
    return out


def read_tensor(fh, entry: Entry):
    """The tensor `entry` from the open binary file `fh`: a fresh CPU tensor (no mapping kept)."""
    import torch

    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fh.seek(entry.start)
    got = 0
    while got < entry.nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise SafetensorsFormatError(f"{entry.file}: tensor {entry.name} is cut short (file truncated?)")
        got += n
    return buf.view(getattr(torch, DTYPES[entry.dtype])).reshape(entry.shape)


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, safetensors dtype code and shape (bytes follow from them)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * ITEMSIZE[self.dtype]


def split_shards(items: Iterable[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most `max_bytes` (a tensor bigger than that gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return [s for s in shards if s]


def write_file(path: Path, items: list[Planned], produce: Callable[[str], object]) -> None:
    """Write one safetensors file: the header first, then each tensor as `produce(name)` returns it."""
    import torch

    items = sorted(items, key=lambda p: -ITEMSIZE[p.dtype])  # stable: wider types first keeps every tensor aligned
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in items:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for p in items:
            t = produce(p.name)
            if CODES.get(str(t.dtype).removeprefix("torch.")) != p.dtype or tuple(t.shape) != p.shape:
                raise ValueError(f"{p.name}: produced {t.dtype} {tuple(t.shape)}, planned {p.dtype} {p.shape}")
            fh.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def write_folder(out_dir: Path, items: list[Planned], produce: Callable[[str], object], max_bytes: int) -> list[str]:
    """Write `items` as `model.safetensors`, or as shards of at most `max_bytes` with
    `model.safetensors.index.json` (transformers' names); returns the file names."""
    from tasks.files import write_json

    shards = split_shards(items, max_bytes)
    if len(shards) <= 1:
        write_file(out_dir / SINGLE_FILE, shards[0] if shards else [], produce)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(out_dir / name, shard, produce)  # each shard is complete on disk before the next is read
        weight_map.update({p.name: name for p in shard})
    total = sum(p.nbytes for p in items)
    write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
