"""The trainer's own crops, in and out: a JSONL file with one line per image,

    {"key": "photos/cat.jpg", "size": [832, 1216], "box": [left, top, right, bottom]}

`size` is the trainer's bucket (width, height); `box` the region of the upright source (EXIF
orientation applied), in integer pixels, that the trainer resized to that size. Importing
(`extract --crops`) extracts each listed key at exactly that size from exactly that box, so DINO
patch (r, c) covers the same pixels as DiT token (r, c). Exporting (`dinocache crops OUT`) writes
the same schema for every cached sample. Every problem in a file is reported with its line,
before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .buckets import MAX_SIDE, MIN_SIDE, make_buckets
from .config import BucketConfig
from .errors import ConfigError
from .keys import key_problem
from .placement import Crop
from .stfile import parse_json_bounded


@dataclass(frozen=True)
class CropLine:
    line: int
    key: str
    size: tuple[int, int]
    box: tuple[int, int, int, int]


def read_crops_file(path: str | Path) -> list[CropLine]:
    """Parse and check the syntax of a crops file (not yet against images or buckets)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"crops file {path} does not exist", "pass --crops with a JSONL file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the crops file {path}: {exc}", "pass a UTF-8 JSONL file") from None
    lines, seen = [], {}
    example = '{"key": "photos/cat.jpg", "size": [832, 1216], "box": [0, 64, 1664, 2496]}'
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = parse_json_bounded(raw, where)  # nesting 100k deep, NaN: an error naming the line
        except ValueError as exc:
            raise ConfigError(f"{exc}", f"write one object per line, e.g. {example}") from None
        if isinstance(obj, list):  # a JSON array of crops, not JSON Lines
            raise ConfigError(
                f"{where} is a JSON array; a crops file is JSON Lines: one object per line, no [ ]",
                f"write each crop on a line of its own, e.g. {example}",
            )
        if not isinstance(obj, dict) or set(obj) - {"key", "size", "box"} or not {"key", "size", "box"} <= set(obj):
            raise ConfigError(f"{where} must have exactly the fields key, size and box", f"e.g. {example}")
        key, size, box = obj["key"], obj["size"], obj["box"]
        problem = key_problem(key)
        if problem:
            raise ConfigError(
                f"{where}: key {key!r} is not a path relative to the image folder ({problem})",
                "write keys as the images' paths relative to the folder given to extract",
            )
        if not (isinstance(size, list) and len(size) == 2 and all(_int(v) and MIN_SIDE <= v <= MAX_SIDE for v in size)):
            raise ConfigError(
                f"{where}: size {size!r} must be [width, height] in {MIN_SIDE}..{MAX_SIDE}", f"e.g. {example}"
            )
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(_int(v) and v >= 0 for v in box)
            and box[0] < box[2]
            and box[1] < box[3]
        ):
            raise ConfigError(
                f"{where}: box {box!r} must be [left, top, right, bottom] integers with left < right and top < bottom",
                f"e.g. {example}",
            )
        if key in seen:
            raise ConfigError(
                f"{where}: key {key!r} is listed twice (first on line {seen[key]})", "keep one line per key"
            )
        seen[key] = number
        lines.append(CropLine(number, key, (size[0], size[1]), (box[0], box[1], box[2], box[3])))
    if not lines:
        raise ConfigError(f"crops file {path} lists no crops", f"write one object per line, e.g. {example}")
    return lines


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def buckets_for_crops(path: str | Path, config: BucketConfig | None) -> BucketConfig:
    """With --crops alone the buckets are the distinct sizes in the file (sorted by aspect, then
    width); with --buckets too, every size must be one of the configured buckets."""
    lines = read_crops_file(path)
    if config is None:
        sizes = sorted({line.size for line in lines}, key=lambda wh: (wh[0] / wh[1], wh[0]))
        return BucketConfig(sizes=sizes, resize="stretch", source=f"{path} (its sizes)")
    known = set(config.sizes)
    for line in lines:
        if line.size not in known:
            raise ConfigError(
                f"{path} line {line.line}: size {list(line.size)} is not a bucket of {config.source}",
                "add it to the bucket config, or drop --buckets to use the crops file's sizes",
            )
    return config


def load_crops(path: str | Path, config: BucketConfig, sources: list) -> dict[str, Crop]:
    """key -> Crop for the scanned images. A key with no file is an error naming the line; a box
    that does not fit its image is that image's recorded failure (`crop_outside`, placement.py)."""
    if config.resize == "adm":  # ADM's pixels come from its own crop, not from a box
        raise ConfigError(
            f"--crops gives each image a box, and {config.source} says resize: adm (ADM's centre crop)",
            "use one of them: drop --crops, or set resize: crop or stretch in the bucket config",
        )
    lines = read_crops_file(path)
    by_key = {s.key: s for s in sources}
    buckets = {(b.width, b.height): b.index for b in make_buckets(config.sizes, 16)}
    crops = {}
    for line in lines:
        if line.key not in by_key:
            raise ConfigError(
                f"{path} line {line.line}: no image {line.key!r} in the input folder",
                "check the key (a path relative to the folder given to extract) or drop the line",
            )
        crops[line.key] = Crop(buckets[line.size], line.box, line.line)
    _warn_about_stretched(path, lines)
    _warn_about_unlisted(path, config, sources, crops)
    return crops


ASPECT_TOLERANCE = 0.05  # a trainer's box is cut to its size's aspect, up to rounding


def _warn_about_stretched(path, lines: list[CropLine]) -> None:
    """A box whose aspect ratio differs from its size's is stretched into it: rare on purpose,
    common when every size is written [height, width]. Say how many, with the first."""
    import logging
    import math

    def off(line: CropLine) -> float:
        box_aspect = (line.box[2] - line.box[0]) / (line.box[3] - line.box[1])
        return abs(math.log(box_aspect / (line.size[0] / line.size[1])))

    stretched = [line for line in lines if off(line) > math.log1p(ASPECT_TOLERANCE)]
    if stretched:
        first = stretched[0]
        logging.getLogger("dinocache").warning(
            "%d of %d crop(s) in %s have a box whose aspect ratio differs from their size's by more than %d%% "
            "(e.g. line %d: box %s into size %s): they are stretched. Sizes are [width, height]; were they "
            "written [height, width]?",
            len(stretched),
            len(lines),
            path,
            round(ASPECT_TOLERANCE * 100),
            first.line,
            list(first.box),
            list(first.size),
        )


def _warn_about_unlisted(path, config: BucketConfig, sources: list, crops: dict) -> None:
    """Images the crops file does not list are placed by the bucket rule, not by the trainer's
    crops: say how many, since a partial crops file is usually a mistake."""
    import logging

    unlisted = [s.key for s in sources if s.key not in crops]
    if unlisted:
        logging.getLogger("dinocache").warning(
            "%d of %d image(s) are not in %s (e.g. %r): they are placed by the nearest aspect ratio "
            "among the buckets of %s, resize %s, not by your trainer's crops",
            len(unlisted),
            len(sources),
            path,
            unlisted[0],
            config.source,
            config.resize,
        )


def export_crops(cache_dir: str | Path, output: str | Path, overwrite: bool = False) -> int:
    """Write every cached sample's size and box in the import schema; returns the line count.
    An existing file is replaced only with `overwrite` (a slip of -o must not eat an image),
    and atomically: a failed write leaves it as it was."""
    from .fileio import atomic_write_bytes

    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"{output} is a folder", "pass --output with a file name, e.g. crops.jsonl")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists", "pass --overwrite to replace it, or another --output")
    lines = crop_lines(cache_dir)
    atomic_write_bytes(output, "".join(lines).encode("utf-8"))
    return len(lines)


def crop_lines(cache_dir: str | Path) -> list[str]:
    """Every cached sample's crop record, as the JSON lines `export_crops` writes."""
    from .location import local_view
    from .manifest import load_samples, read_manifest

    cache_dir = local_view(cache_dir)
    manifest = read_manifest(cache_dir)
    table = load_samples(Path(cache_dir), manifest)
    buckets = manifest["buckets"]
    boxes, bucket_col = table.columns["box"], table.columns["bucket"]
    lines = []
    for i, key in enumerate(table.iter_keys()):
        b = buckets[int(bucket_col[i])]
        lines.append(json.dumps({"key": key, "size": [b["width"], b["height"]], "box": boxes[i].tolist()}) + "\n")
    return lines
