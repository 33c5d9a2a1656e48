"""Load a model, choose device and dtype, run the forward and split its tokens.

One code path for every source: a Hub id, a local HF-format folder, an official .pth, or
`random:<arch>` (which builds the architecture with random weights, saves nothing, and says
loudly that it is random). What differs between DINOv3 and DINOv2 is asked of the model's
family (families/). Token order is the one transformers and the official repos emit:
    [CLS] [register_1 .. register_R] [patch (0,0) .. patch (rows-1, cols-1)]   (row-major)
R comes from the config, never hard-coded.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError, untrusted
from .families import FAMILIES, Family, architectures, family_of_config, load_official
from .names import DEFAULT_MODEL, NORM_FILE

log = logging.getLogger("dinocache")

RANDOM_PREFIX = "random:"

# random:<arch> -> its config fields, and its family (families/<name>.py holds the shapes)
ARCHITECTURES: dict[str, dict] = {arch: fields for f in FAMILIES for arch, fields in f.architectures.items()}
FAMILY_OF_ARCH: dict[str, Family] = architectures()

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Tokens:
    """One forward's tokens, [B, prefix + rows*cols, D] each: `prenorm` is the last block's output
    (hidden_states[-1]), `normed` the final LayerNorm of it (last_hidden_state)."""

    prenorm: torch.Tensor
    normed: torch.Tensor
    layers: dict[int, torch.Tensor]  # block k's output (1-based), not normed
    pooled: torch.Tensor | None = None  # [B, D]: a pooling head's output (SigLIP), from `normed`


class _TokenForward(torch.nn.Module):
    """The transformers model with its final LayerNorm applied here, so that the input of that
    norm (the last block's output) is available too; what `torch.compile` compiles."""

    def __init__(self, vit: torch.nn.Module, final_norm: torch.nn.Module, family: Family):
        super().__init__()
        self.vit, self.final_norm, self.family = vit, final_norm, family

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        return self.family.tokens(self.vit, self.final_norm, pixel_values, output_hidden_states)


@dataclass
class LoadedModel:
    """A ViT (any family) ready for inference, with what the manifest must record about it.

    `model` is the transformers model with its final LayerNorm moved to `final_norm` (the
    model's own is an Identity), so one forward yields the tokens before and after that norm."""

    model: torch.nn.Module
    model_id: str
    revision: str | None
    patch_size: int
    hidden_size: int
    num_registers: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    final_norm: torch.nn.Module = field(repr=False, default=None)
    config: dict = field(repr=False, default_factory=dict)
    sdpa_backend: str = "auto"
    compiled: torch.nn.Module | None = field(repr=False, default=None)
    spec: "ModelSpec | None" = field(repr=False, default=None)

    def __post_init__(self):
        self._forward = _TokenForward(self.model, self.final_norm, self.family)

    @property
    def family(self) -> Family:
        return self.spec.family if self.spec is not None else FAMILIES[0]

    @property
    def norm_eps(self) -> float:
        return float(self.final_norm.eps)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """last_hidden_state (final LayerNorm applied) for a batch of one exact shape."""
        return self.forward_tokens(pixels).normed

    @torch.inference_mode()
    def forward_tokens(self, pixels: torch.Tensor, layers: tuple[int, ...] = ()) -> Tokens:
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        run = self.compiled if self.compiled is not None else self._forward
        with sdpa_context(self.sdpa_backend):
            prenorm, normed, hidden_states, pooled = run(pixels, bool(layers))
        # hidden_states[0] is the embedding output, hidden_states[k] the output of block k.
        return Tokens(prenorm, normed, {k: hidden_states[k] for k in layers}, pooled)

    def enable_compile(self, mode: str | None = None) -> None:
        """torch.compile with static shapes: one graph per bucket shape, compiled on first use.
        On GPUs max-autotune (GEMM autotuning; CUDA graphs off: batches end in host copies)."""
        import torch._dynamo

        if mode is None:
            mode = "max-autotune-no-cudagraphs" if self.device.type == "cuda" else "default"
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled = torch.compile(self._forward, dynamic=False, mode=mode)


SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def sdpa_context(backend: str):
    """Force one scaled-dot-product-attention kernel (cuDNN beat flash on the H200), or leave
    torch's choice ("auto")."""
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel(kernel)


def split_tokens(hidden: torch.Tensor, num_registers: int, grid: tuple[int, int], cls: bool = True):
    """Split [B, 1 + R + rows*cols, D] into cls [B, D], registers [B, R, D], patches [B, rows*cols, D];
    without a CLS token (`cls` False: SigLIP) [B, R + rows*cols, D], and cls is None."""
    rows, cols = grid
    first = int(cls)
    expected = first + num_registers + rows * cols
    if hidden.shape[1] != expected:
        raise RuntimeError(
            f"model returned {hidden.shape[1]} tokens, expected {first} CLS + {num_registers} registers + "
            f"{rows}x{cols} patches = {expected}; the input size is not a multiple of the patch size"
        )
    return (
        hidden[:, 0] if cls else None,
        hidden[:, first : first + num_registers],
        hidden[:, first + num_registers :],
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            "--device cuda was asked for but torch sees no CUDA GPU",
            "use --device cpu, or install a CUDA build of torch",
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (2.65x fp32 for ViT-S on this project's CPUs)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(DTYPES)}")
    if dtype == "float16":
        log.warning("float16 is reported to overflow in DINOv3 (dinov3 issue 181); prefer bfloat16")
    return DTYPES[dtype]


def check_model_spec(spec: str) -> None:
    """What can be wrong with --model without reading anything: an unknown random:<arch>, or a
    path (./, /, ~) that does not exist. Checked before the cache's own model is compared, so a
    typo is named as a typo."""
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX) :]
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"unknown architecture {arch!r} in random:{arch}",
                f"use one of: {', '.join('random:' + a for a in ARCHITECTURES)}",
            )
    elif (spec.startswith((".", "/", "~")) or spec.endswith((".pth", ".pt"))) and not Path(
        spec
    ).expanduser().exists():  # a path (or a checkpoint file name), never a Hub id
        raise ModelLoadError(
            f"model path {spec} does not exist",
            "pass the folder save_pretrained wrote, a Hub id (owner/name), an official .pth, or random:vits16",
        )
    elif Path(spec).is_file() and not spec.endswith((".pth", ".pt")):  # e.g. my_model/config.json
        raise ModelLoadError(
            f"--model {spec} is a file; a transformers checkpoint is the folder that holds config.json and the weights",
            f"pass the folder: --model {Path(spec).parent}",
        )


def random_config(arch: str):
    check_model_spec(RANDOM_PREFIX + arch)
    return FAMILY_OF_ARCH[arch].random_config(arch)


@dataclass
class ModelSpec:
    """A model without its weights: what the cache's settings need, so that a run can be refused
    (other settings, a held lock, nothing to do) before minutes of loading. Only the final
    LayerNorm's weight and bias are read, cheaply, because the cache records them (the flavours
    are derived with them, and a changed checkpoint is caught by their hash)."""

    id: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    config: object = field(repr=False)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    norm_weight: torch.Tensor = field(repr=False)
    norm_bias: torch.Tensor = field(repr=False)
    kind: str = "pretrained"  # "random", "official" or "pretrained"
    seed: int = 0
    preloaded: torch.nn.Module | None = field(repr=False, default=None)  # official .pth: loaded to read it
    family: Family = field(repr=False, default=FAMILIES[0])
    fingerprint: str | None = None  # of a local checkpoint's weights (weights_fingerprint); None: Hub or random
    # a recipe's position-embedding interpolation (one of family.interpolations); None: the family's own
    pos_embed_interpolation: str | None = None

    @property
    def patch_size(self) -> int:
        return self.family.patch_size(self.config)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_registers(self) -> int:
        return self.family.num_registers(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def norm_eps(self) -> float:
        return float(self.config.layer_norm_eps)

    def config_fields(self) -> dict:
        return {k: getattr(self.config, k) for k in self.family.config_fields if hasattr(self.config, k)}

    def norm_file(self) -> bytes:
        """The final LayerNorm as a small safetensors file (weight, bias float32; eps in metadata)."""
        from safetensors.torch import save

        return save(
            {"weight": self.norm_weight.float().contiguous(), "bias": self.norm_bias.float().contiguous()},
            metadata={"eps": repr(self.norm_eps)},
        )

    def record(self) -> dict:
        """The manifest's `model` section. Random weights depend on the seed and on the device
        that drew them (CPU and CUDA generators differ), so both are recorded."""
        import hashlib

        extra = {"random_init": {"seed": self.seed, "device": self.device.type}} if self.kind == "random" else {}
        if self.fingerprint is not None:
            extra["weights_fingerprint"] = self.fingerprint
        return (
            extra
            | self.family.record(self.config, self.pos_embed_interpolation)
            | {
                "id": self.id,
                "revision": self.revision,
                "patch_size": self.patch_size,
                "hidden_size": self.hidden_size,
                "num_registers": self.num_registers,
                "compute_dtype": str(self.dtype).removeprefix("torch."),
                "config": self.config_fields(),
                "final_norm": {
                    "file": NORM_FILE,
                    "sha256": hashlib.sha256(self.norm_file()).hexdigest(),
                    "eps": self.norm_eps,
                },
            }
        )


def resolve_model(
    spec: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    image_mean=None,
    image_std=None,
    seed: int = 0,
) -> ModelSpec:
    """Everything about a model but its weights: Hub id, local folder, official .pth, or random:<arch>."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    preloaded, fingerprint = None, None
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX) :]
        config = random_config(arch)
        family, kind, processor_cfg = FAMILY_OF_ARCH[arch], "random", {}
        # transformers initialises every LayerNorm to the identity affine
        weight, bias = torch.ones(config.hidden_size), torch.zeros(config.hidden_size)
    elif spec.endswith((".pth", ".pt")) and Path(spec).is_file():  # an official Meta checkpoint
        preloaded, config, family = load_official(spec, torch_dtype)
        kind, processor_cfg = "official", {}
        norm = getattr(preloaded, family.norm_attr)
        weight, bias = norm.weight.detach(), norm.bias.detach()
        fingerprint = module_fingerprint(preloaded)
    else:
        config = _load_config(spec, revision)
        family, kind = family_of_config(config), "pretrained"
        config = family.encoder_config(config)
        processor_cfg = _load_processor_config(spec, revision)
        found = _read_final_norm(spec, revision, family)
        if found is None:  # not a safetensors checkpoint: read the norm from the loaded model
            preloaded = _from_pretrained(spec, revision, config, family=family)
            norm = getattr(preloaded, family.norm_attr)
            found = (norm.weight.detach(), norm.bias.detach())
        weight, bias = found
        if Path(spec).is_dir():  # a local checkpoint: known by content, not by the spelling of its path
            files = _safetensors_files(Path(spec))
            fingerprint = file_fingerprint(files) if files else module_fingerprint(preloaded)
    mean = tuple(image_mean or processor_cfg.get("image_mean") or family.image_mean)
    std = tuple(image_std or processor_cfg.get("image_std") or family.image_std)
    _check_normalization(mean, std)
    return ModelSpec(
        spec,
        revision,
        dev,
        torch_dtype,
        config,
        mean,
        std,
        weight.float().cpu(),
        bias.float().cpu(),
        kind,
        seed,
        preloaded,
        family,
        fingerprint,
    )


FINGERPRINT_VERSION = "v1"
FINGERPRINT_BLOCK = 4096  # bytes sampled at a tensor's start, middle and end


def _fingerprint(tensors) -> str:
    """A checkpoint's identity from its content: every tensor's name, dtype, shape and size, and
    its first, middle and last 4 KiB. Reads ~12 KiB a tensor (milliseconds for any DINOv3), yet
    any other training, fine-tune or re-initialisation changes it. `tensors`: (name, dtype,
    shape, nbytes, read(offset, size) -> bytes) each."""
    import hashlib

    digest = hashlib.sha256(f"dinocache-weights-{FINGERPRINT_VERSION}".encode())
    for name, dtype, shape, nbytes, read in sorted(tensors, key=lambda t: t[0]):
        digest.update(json.dumps([name, dtype, list(shape), nbytes]).encode())
        half = max(0, nbytes // 2 - FINGERPRINT_BLOCK // 2)
        for offset in sorted({0, half, max(0, nbytes - FINGERPRINT_BLOCK)}):
            digest.update(read(offset, min(FINGERPRINT_BLOCK, nbytes - offset)))
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained would load from a local folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            raise ModelLoadError(f"{index} is not a readable index", _weights_hint(str(folder))) from None
        return [folder / name for name in names if isinstance(name, str) and "/" not in name]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def file_fingerprint(paths: list[Path]) -> str:
    """`_fingerprint` of safetensors files, read from their headers and a few sampled blocks
    (no tensor is loaded)."""
    import os

    from .stfile import MAX_HEADER_BYTES, parse_json_bounded

    tensors, fds = [], []
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            size = os.fstat(fd).st_size
            length = int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{path.name} has no safetensors header")
            header = parse_json_bounded(os.pread(fd, length, 8), path.name)
            for name, info in header.items() if isinstance(header, dict) else ():
                if name == "__metadata__":
                    continue
                start, stop = info["data_offsets"]
                if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= size - 8 - length):
                    raise ValueError(f"{path.name}: tensor {name} lies outside the file")
                base = 8 + length + start
                tensors.append(
                    (
                        name,
                        str(info["dtype"]),
                        info["shape"],
                        stop - start,
                        lambda o, n, fd=fd, b=base: os.pread(fd, n, b + o),
                    )
                )
        return _fingerprint(tensors)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"could not read the weights in {paths[0].parent}: {str(exc).splitlines()[0]}",
            _weights_hint(str(paths[0].parent)),
        ) from None
    finally:
        for fd in fds:
            os.close(fd)


def module_fingerprint(module: torch.nn.Module) -> str:
    """`_fingerprint` of a loaded model's tensors (a .pth or pytorch_model.bin checkpoint)."""
    tensors = []
    for name, tensor in module.state_dict().items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        read = lambda o, n, raw=raw: raw[o : o + n].numpy().tobytes()  # noqa: E731
        tensors.append((name, str(tensor.dtype), tuple(tensor.shape), raw.numel(), read))
    return _fingerprint(tensors)


def load_weights(mspec: ModelSpec, compile: bool = False, sdpa_backend: str = "auto") -> LoadedModel:
    """The model itself, in eval mode, on its device and in its compute dtype."""
    family = mspec.family
    if sdpa_backend not in SDPA_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {sdpa_backend!r}", f"use one of {', '.join(SDPA_BACKENDS)}")
    if mspec.preloaded is not None:
        model = mspec.preloaded
        mspec.preloaded = None
    elif mspec.kind == "random":
        log.warning(
            "%s has RANDOM weights: use it for smoke tests and benchmarks only, never for training data", mspec.id
        )
        # Built where it runs, in its compute dtype: no float32 copy on the host (a 7B would be 28 GB).
        torch.manual_seed(mspec.seed)
        with torch.device(mspec.device):
            model = family.model_class(mspec.config)._from_config(mspec.config, dtype=mspec.dtype)
    else:
        model = _from_pretrained(mspec.id, mspec.revision, mspec.config, mspec.dtype, mspec.device, family)
    model = model.to(device=mspec.device, dtype=mspec.dtype).eval()  # eval: no RoPE jitter, no drop-path
    model = family.prepare(model, mspec.pos_embed_interpolation)
    final_norm = getattr(model, family.norm_attr)
    setattr(model, family.norm_attr, torch.nn.Identity())
    loaded = LoadedModel(
        model=model,
        model_id=mspec.id,
        revision=mspec.revision,
        patch_size=mspec.patch_size,
        hidden_size=mspec.hidden_size,
        num_registers=mspec.num_registers,
        image_mean=mspec.image_mean,
        image_std=mspec.image_std,
        device=mspec.device,
        dtype=mspec.dtype,
        final_norm=final_norm,
        config=mspec.config_fields(),
        sdpa_backend=sdpa_backend,
        spec=mspec,
    )
    _check_attention_backend(loaded)
    if compile:
        loaded.enable_compile()
    return loaded


def _check_attention_backend(loaded: LoadedModel) -> None:
    """A forced --sdpa-backend that cannot run here (cuDNN on a CPU, flash in float32) would fail
    in the first batch with torch's 'No viable backend'; a 2x2-patch forward finds out first."""
    if loaded.sdpa_backend == "auto":
        return
    side = 2 * loaded.patch_size
    try:
        loaded.forward(torch.zeros(1, 3, side, side))
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the attention backend {loaded.sdpa_backend!r} cannot run on {loaded.device} in "
            f"{str(loaded.dtype).removeprefix('torch.')}: {str(exc).splitlines()[0]}",
            "drop --sdpa-backend (auto: torch picks one that runs), or use math",
        ) from None


def load_model(
    spec: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    image_mean=None,
    image_std=None,
    seed: int = 0,
    compile: bool = False,
    sdpa_backend: str = "auto",
    pos_embed_interpolation: str | None = None,
) -> LoadedModel:
    """Load a ViT from a Hub id, a local folder, an official .pth or `random:<arch>`."""
    if sdpa_backend not in SDPA_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {sdpa_backend!r}", f"use one of {', '.join(SDPA_BACKENDS)}")
    mspec = resolve_model(spec, revision, device, dtype, image_mean, image_std, seed)
    use_interpolation(mspec, pos_embed_interpolation)
    return load_weights(mspec, compile, sdpa_backend)


def use_interpolation(mspec: ModelSpec, name: str | None) -> None:
    """Interpolate the position embeddings as a recipe's code does (`name`, one the family
    offers), or as the family's official code does (None). Recorded in the manifest's model."""
    if name is not None and name not in mspec.family.interpolations:
        offered = ", ".join(mspec.family.interpolations) or "none"
        raise ModelLoadError(
            f"{mspec.id} ({mspec.family.name}) cannot interpolate its position embeddings by {untrusted(repr(name))}",
            f"this family offers: {offered}",
        )
    mspec.pos_embed_interpolation = name


def _from_pretrained(
    spec: str,
    revision: str | None,
    config,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    family: Family = FAMILIES[0],
):
    """Weights loaded in the compute dtype (never a float32 copy first), memory-mapped from the
    safetensors files; with `accelerate` installed, straight to the GPU shard by shard."""
    model_class = family.model_class(config)

    kwargs: dict = {"revision": revision, "config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None and device.type == "cuda":
        try:
            import accelerate  # noqa: F401 - transformers needs it for device_map

            kwargs["device_map"] = str(device)
        except ImportError:
            pass
    import warnings

    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)  # we report it
    try:
        try:
            return model_class.from_pretrained(spec, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            kwargs["torch_dtype"] = kwargs.pop("dtype", None)
            return model_class.from_pretrained(spec, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load the weights of {spec}: {str(exc).splitlines()[0]}", _weights_hint(spec)
        ) from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met more than tensors
        raise ModelLoadError(
            f"the weights of {spec} are not plain tensors: torch.load(weights_only=True) refused the file "
            "(damaged, or a pickle holding more than tensors; dinocache never unpickles code, nothing of it ran)",
            "use a checkpoint saved as safetensors (save_pretrained), or the official .pth",
        ) from None
    except (ValueError, RuntimeError, EOFError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as exc:  # damaged
        raise ModelLoadError(
            f"could not load the weights of {spec}: {untrusted(str(exc).splitlines()[0] if str(exc) else exc)}",
            _weights_hint(spec),
        ) from None


def _read_final_norm(spec: str, revision: str | None, family: Family):
    """(weight, bias) of the final LayerNorm read straight from a safetensors checkpoint (one
    small read), or None when the checkpoint is not in safetensors form."""
    from safetensors import safe_open

    def fetch(name: str) -> Path | None:
        if Path(spec).is_dir():
            return Path(spec) / name if (Path(spec) / name).is_file() else None
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec, name, revision=revision))
        except Exception:
            return None

    index = fetch("model.safetensors.index.json")
    weight_map = json.loads(index.read_text()).get("weight_map", {}) if index else {}
    files = [next((weight_map[k] for k in family.norm_keys if k in weight_map), None)] if index else []
    path = fetch(files[0]) if files and files[0] else fetch("model.safetensors")
    if path is None:
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            name = next((k for k in family.norm_keys if k in keys), None)
            if name is None:
                return None
            return fh.get_tensor(name), fh.get_tensor(name[: -len("weight")] + "bias")
    except Exception as exc:  # a damaged file: from_pretrained will say so
        raise ModelLoadError(
            f"could not read the weights of {spec}: {str(exc).splitlines()[0]}", _weights_hint(spec)
        ) from None


def check_layers(layers, mspec: ModelSpec) -> None:
    bad = [k for k in layers if not 1 <= k <= mspec.num_layers]
    if bad:
        raise ConfigError(
            f"--layers {','.join(map(str, bad))}: this model has blocks 1..{mspec.num_layers}",
            "pick block numbers in that range",
        )


def check_registers(keep_registers: bool, mspec: ModelSpec) -> None:
    if keep_registers and mspec.num_registers == 0:
        raise ConfigError(
            f"--keep-registers: {mspec.id} has no register tokens (a {mspec.family.name} without registers)",
            "drop --keep-registers, or use a model with registers (e.g. facebook/dinov2-with-registers-base)",
        )


def _check_normalization(mean, std) -> None:
    import math

    ok = (
        len(mean) == 3
        and len(std) == 3
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*mean, *std))
        and all(v > 0 for v in std)
    )
    if not ok or any(abs(v) > 1e3 for v in (*mean, *std)):
        raise ModelLoadError(
            f"image mean {list(mean)} / std {list(std)} cannot normalize pixels in [0, 1]: each must "
            "be a finite number (std above 0)",
            "use e.g. --image-mean 0.485,0.456,0.406 --image-std 0.229,0.224,0.225 (ImageNet's)",
        )


def _weights_hint(spec: str) -> str:
    import huggingface_hub.constants as hub_constants

    if Path(spec).exists():
        return f"{spec} must be a folder saved by save_pretrained (config.json + model.safetensors)"
    if "/" not in spec.strip("/") or spec.startswith((".", "/")):
        return (
            f"{spec!r} is neither a local folder nor a Hub id (owner/name); pass a folder, a Hub id, "
            "an official .pth file, or random:vits16 for a smoke test"
        )
    if hub_constants.HF_HUB_OFFLINE:
        return (
            f"working offline (no connection to the Hub, or HF_HUB_OFFLINE=1) and {spec} is not in the local "
            f"Hub cache: where there is network, accept its licence on the Hub page, run `hf auth login` and "
            f"`hf download {spec}`, or pass a local folder; for a smoke test use --model random:vits16"
        )
    return (
        f"if {spec} is a gated Hub repo, accept its license on the Hub page and run `hf auth login`; "
        "offline, download it once and pass the local folder to --model; for a smoke test use --model random:vits16"
    )


def quiet_libraries() -> None:
    """transformers' and huggingface_hub's own progress bars and retry chatter say nothing our
    errors do not; they reset their loggers when imported, so this runs after importing them."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as tf_logging

    hub_logging.set_verbosity_error()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # older huggingface_hub
        pass


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub, so that offline the user learns it in seconds rather
    than after huggingface_hub's retries (about 30 s, for every file)."""
    import os
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _use_hub_offline_if_unreachable(spec: str) -> None:
    import os

    import huggingface_hub.constants as hub_constants

    if Path(spec).exists() or hub_constants.HF_HUB_OFFLINE:
        return
    if not hub_reachable():
        log.warning(
            "no connection to the Hugging Face Hub: using the local Hub cache only "
            "(set HF_HUB_OFFLINE=1 to skip this check)"
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants.HF_HUB_OFFLINE = True


def _load_config(spec: str, revision: str | None):
    from transformers import AutoConfig

    quiet_libraries()
    check_model_spec(spec)
    _use_hub_offline_if_unreachable(spec)
    try:
        config = AutoConfig.from_pretrained(spec, revision=revision)  # never trust_remote_code
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model {spec!r}: {str(exc).splitlines()[0]}", _weights_hint(spec)
        ) from None
    if family_of_config(config) is None:
        hint = (
            "ConvNeXt DINOv3 models have no CLS/register tokens and are not supported yet"
            if "convnext" in config.model_type
            else "pass a DINOv3, DINOv2 or SigLIP ViT, e.g. " + DEFAULT_MODEL + " or facebook/dinov2-base"
        )
        known = ", ".join(t for f in FAMILIES for t in f.model_types)
        raise ModelLoadError(f"{spec} is a {config.model_type!r} model; dinocache loads {known}", hint)
    return config


def _load_processor_config(spec: str, revision: str | None) -> dict:
    """The checkpoint's preprocessor_config.json (mean/std differ for the SAT models), or {}."""
    local = Path(spec) / "preprocessor_config.json"
    if Path(spec).is_dir():
        return json.loads(local.read_text()) if local.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec, "preprocessor_config.json", revision=revision)).read_text())
    except Exception as exc:  # no file on the Hub, or offline with the weights cached: ImageNet defaults
        log.info("no preprocessor_config.json for %s (%s); using ImageNet mean/std", spec, type(exc).__name__)
        return {}
