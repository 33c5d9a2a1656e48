"""The model's forward over decoded batches: chunks of each bucket's batch size, out-of-memory
halving (the same images retried: none is lost), the first batch's memory measured on a GPU,
and the rows whose features are not finite."""

from __future__ import annotations

import logging
import time

import torch

from .buckets import Bucket
from .decoding import BatchSizes, resize_on
from .errors import DinocacheError
from .faults import fault_point
from .features import stored_features
from .model import LoadedModel
from .runlog import RunRecord, StageTimer

log = logging.getLogger("dinocache")


class GpuMemory:
    """Measures what one forward needs: its peak over the memory in use before it (weights and
    batches in flight), and the budget there is: free device memory plus torch's cached blocks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        activation = torch.cuda.max_memory_allocated(self.device) - self.base
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return activation, budget


class Forward:
    """Features of whole batches for one run; the batch sizes it learns and halves are the ones
    the decode sampler asks (`sizes`), and what it learns is recorded in the run (`run`)."""

    def __init__(self, loaded: LoadedModel, layout, sizes: BatchSizes, run: RunRecord, timer: StageTimer):
        self.loaded, self.layout, self.sizes, self.run, self.timer = loaded, layout, sizes, run, timer

    def features(self, pixels, bucket: Bucket) -> dict[str, torch.Tensor]:
        """Features of a batch, in chunks of the bucket's batch size; on out-of-memory the size is
        halved for the rest of the bucket and the same images are retried: no image is lost."""
        start, outputs = 0, []
        count = len(pixels)
        while start < count:
            n = min(self.sizes.for_bucket(bucket), count - start)
            try:
                outputs.append(self._chunk(pixels[start : start + n], bucket, n))
            except torch.OutOfMemoryError as exc:
                self._halve(bucket, n, exc)
                continue
            start += n
        if len(outputs) == 1:
            return outputs[0]
        return {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}

    def _chunk(self, chunk, bucket: Bucket, n: int) -> dict[str, torch.Tensor]:
        loaded = self.loaded
        measure = GpuMemory(loaded.device) if self.sizes.needs_measuring(bucket) else None
        began = time.perf_counter()
        if isinstance(chunk, list):
            size = (bucket.input_width, bucket.input_height)
            chunk = resize_on(loaded.device, chunk, size, loaded.image_mean, loaded.image_std)
            self.timer.add("upload", time.perf_counter() - began)
            began = time.perf_counter()
        if measure:
            measure.start()
        fault_point("forward")
        output = stored_features(loaded, chunk, bucket.grid, self.layout)
        if measure:
            chosen = self.sizes.learn(bucket, n, *measure.stop())
            if chosen:
                self.run.batch_sizes[bucket.name] = chosen
                log.info("batches of %d images for %s (measured on the first batch)", chosen, bucket.name)
        self.timer.add("forward", time.perf_counter() - began)
        return output

    def _halve(self, bucket: Bucket, n: int, exc: torch.OutOfMemoryError) -> None:
        """Halve the bucket's batch size after an out-of-memory (a single image that does not fit
        is a DinocacheError)."""
        loaded = self.loaded
        if n == 1:
            raise DinocacheError(
                f"{loaded.model_id} runs out of memory on a single "
                f"{bucket.input_width}x{bucket.input_height} image (bucket {bucket.name}) on {loaded.device}: "
                f"{str(exc).splitlines()[0]}",
                "use a GPU with more memory, a smaller bucket, or --dtype bfloat16",
            ) from None
        self.sizes.halved[bucket.index] = max(1, n // 2)
        self.run.oom_retries += 1
        self.run.batch_sizes[bucket.name] = self.sizes.halved[bucket.index]
        log.warning(
            "out of memory with %d images of %s: retrying with batches of %d",
            n,
            bucket.name,
            self.sizes.halved[bucket.index],
        )
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()


def nonfinite_rows(tensors: dict[str, torch.Tensor]) -> list[int]:
    """Rows of a batch whose features hold NaN or Inf (float16 overflow, a broken checkpoint)."""
    bad = None
    for value in tensors.values():
        row_bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
        bad = row_bad if bad is None else bad | row_bad
    if bad is None or not bool(bad.any()):
        return []
    return bad.nonzero().flatten().tolist()
