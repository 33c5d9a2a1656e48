"""Decode workers and batches: the work items of a run become model-ready batches of one exact
shape, in DataLoader worker processes. Failures come back as values, never as exceptions."""

from __future__ import annotations

import hashlib
import os
import signal

import torch
from torch.utils.data import Dataset

from .buckets import Bucket
from .errors import DecodeError
from .faults import fault_point
from .imaging import Preprocessing, model_input, preprocess
from .scan import max_image_bytes

# Default batch = this many patch tokens: 16 images at 1024x1024 on a GPU. On a CPU large batches
# only delay the first forward (nothing overlaps decoding) and run no faster: ~4 images at 448x448.
TOKENS_PER_BATCH = {"cuda": 65536, "cpu": 4096}
MAX_DEFAULT_BATCH = 256


def default_batch_size(bucket: Bucket, device_type: str = "cuda") -> int:
    tokens = TOKENS_PER_BATCH.get(device_type, TOKENS_PER_BATCH["cuda"])
    return max(1, min(MAX_DEFAULT_BATCH, tokens // bucket.num_patches))


class DecodeDataset(Dataset):
    """Read, hash, decode and preprocess one work item; failures are returned, not raised."""

    def __init__(
        self, work: list, buckets: list[Bucket], prep: Preprocessing, max_pixels: int, crop_only: bool = False
    ):
        self.work, self.buckets, self.prep, self.max_pixels = work, buckets, prep, max_pixels
        self.crop_only = crop_only  # return the cropped (uint8) region; the device resizes

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int):
        item = self.work[i]
        bucket = self.buckets[item.bucket]
        fault_point("decode")
        try:
            data = item.source.read(item, max_image_bytes(*item.source_size))
            sha256 = hashlib.sha256(data).hexdigest()
            x = model_input(
                data,
                item.source_size,
                item.box,
                (bucket.input_width, bucket.input_height),
                self.prep,
                self.max_pixels,
                crop_only=self.crop_only,
                bucket_size=(bucket.width, bucket.height),
            )
            return i, x, sha256, None
        except DecodeError as exc:
            if exc.reason == "changed" and item.hinted:  # placed by the list's size, not the header's
                width, height = item.source_size
                detail = (
                    f"the list file gives {width}x{height}, which is not the upright size (EXIF orientation "
                    "applied); the next run reads the size from the image's header"
                )
                return i, None, None, ("size_hint", detail)
            return i, None, None, (exc.reason, exc.detail)
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return i, None, None, ("decode_error", f"{type(exc).__name__}: {exc}")


def collate_decoded(items):
    """Model-ready images stack into one batch; cropped regions of different sizes (resize on the
    device) stay a list."""
    ok = [(i, x, h) for i, x, h, err in items if err is None]
    failed = [(i, err) for i, x, h, err in items if err is not None]
    pixels = [x for _, x, _ in ok] if ok else None
    if pixels and len({x.shape for x in pixels}) == 1 and pixels[0].dtype == torch.float32:
        pixels = torch.stack(pixels)
    return [i for i, _, _ in ok], [h for _, _, h in ok], pixels, failed


def resize_on(device: torch.device, regions: list[torch.Tensor], size: tuple[int, int], mean, std) -> torch.Tensor:
    """Upload each cropped region (uint8 where the source was 8-bit) and resize + normalize it on
    `device`: the same math as the workers' path, without its CPU cost (~40 ms per 3 MP image)."""
    return torch.stack(
        [preprocess(r.to(device, non_blocking=True), (0, 0, r.shape[2], r.shape[1]), size, mean, std) for r in regions]
    )


class BatchSizes:
    """Images per forward, per bucket. Fixed when --batch-size or the config says so; otherwise a
    first guess from the bucket's token count, then, on a GPU, sized from the memory the first
    batch of each bucket really used and the memory free; halved for the rest of a bucket when a
    forward runs out of memory. The batch sampler asks it for every batch it forms."""

    HEADROOM = 0.8  # of the memory free for activations
    MAX = 512

    def __init__(self, fixed: int | None, device_type: str):
        self.fixed, self.device_type = fixed, device_type
        self.sized: dict[int, int] = {}  # bucket -> from measured memory
        self.halved: dict[int, int] = {}  # bucket -> after out-of-memory

    def for_bucket(self, bucket: Bucket) -> int:
        i = bucket.index
        return self.halved.get(i) or self.fixed or self.sized.get(i) or default_batch_size(bucket, self.device_type)

    def needs_measuring(self, bucket: Bucket) -> bool:
        return (
            self.device_type == "cuda"
            and not self.fixed
            and bucket.index not in self.sized
            and bucket.index not in self.halved
        )

    def learn(self, bucket: Bucket, images: int, activation_bytes: int, budget_bytes: int) -> int | None:
        """Size this bucket's batches from one measured forward of `images` images."""
        if not self.needs_measuring(bucket) or images <= 0 or activation_bytes <= 0:
            return None
        per_image = activation_bytes / images
        self.sized[bucket.index] = max(1, min(self.MAX, int(budget_bytes * self.HEADROOM // per_image)))
        return self.sized[bucket.index]


class BucketBatches:
    """Consecutive index chunks of the work list, never crossing a bucket (one exact shape per
    batch), as large as BatchSizes says when each batch is formed. Generated lazily: a list of
    lists would cost ~100 bytes per image."""

    def __init__(self, work: list, buckets: list[Bucket], sizes: BatchSizes):
        self.work, self.buckets, self.sizes = work, buckets, sizes

    def __iter__(self):
        work, start = self.work, 0
        while start < len(work):
            bucket = self.buckets[work[start].bucket]
            size = self.sizes.for_bucket(bucket)
            end = start
            while end < len(work) and end - start < size and work[end].bucket == bucket.index:
                end += 1
            yield list(range(start, end))
            start = end

    def __len__(self) -> int:
        return sum(1 for _ in self)


def decode_worker_init(_worker_id: int, nice: bool = True) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which stops them in order (a Ctrl-C
    would otherwise kill them mid-batch). On a CPU-only machine they also yield to the forward:
    they share cores with the model's threads, whose spin-waiting barriers lose far more than a
    decode gains when preempted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        try:
            os.nice(10)
        except OSError:
            pass


def cpu_worker_init(worker_id: int) -> None:
    decode_worker_init(worker_id, nice=True)


def gpu_worker_init(worker_id: int) -> None:
    decode_worker_init(worker_id, nice=False)
