"""Typed run configuration, loaded from YAML and validated once, at the edge.

Every section is a dataclass. `load_config` turns a YAML file plus `key=value`
overrides into a `RunConfig`, and any unknown key, wrong type or out-of-range
value fails here, before any work starts, with an error naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.geometry import CELL, PatchLayout


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds a bad value."""


def _require_positive(section: Any, key: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(section, name)}")


def run_time(default: Any) -> Any:
    """A field that says how a run executes, not what it computes (compilation,
    recomputation, loader processes, retries, the batch's layout over workers): it is
    left out of the stage's fingerprint, so changing it reuses or resumes the same stage."""
    return field(default=default, metadata={"run_time": True})


def identity_dict(section: Any) -> Any:
    """`section` as plain data without its run-time fields: what a stage's fingerprint hashes."""
    if dataclasses.is_dataclass(section):
        kept = {f.name: identity_dict(getattr(section, f.name)) for f in dataclasses.fields(section)
                if not f.metadata.get("run_time")}
        derived = getattr(section, "derived_identity", None)  # what run-time fields fix together
        return {**kept, **(derived() if derived else {})}
    if isinstance(section, (list, tuple)):
        return [identity_dict(v) for v in section]
    if isinstance(section, dict):
        return {k: identity_dict(v) for k, v in section.items()}
    return section


# --------------------------------------------------------------------------- data


@dataclass
class MnistConfig:
    """The single digits: the embedded MNIST sample; a local folder of 28x28 grayscale
    images, either one sub-folder per class (`folder/3/x.png`) or images plus a CSV
    `labels_file` of `filename,label` rows; MNIST's own IDX files (`images`, `labels`,
    gzipped or not); or a Hugging Face dataset (`ylecun/mnist`) streamed by `hf_parts`
    shard tasks per split. `train_digits` > 0 keeps only the first that many training
    digits of a folder or IDX source (validation and test unchanged)."""

    source: Literal["embedded", "folder", "idx", "hf"] = "embedded"
    folder: Optional[str] = None
    labels_file: Optional[str] = None
    images: Optional[str] = None
    labels: Optional[str] = None
    train_digits: int = 0
    hf_dataset: str = "ylecun/mnist"
    hf_parts: int = 4
    image_field: str = "image"
    label_field: str = "label"
    samples_per_shard: int = 1000  # embedded and folder sources; an hf part is one shard

    def validate(self, key: str) -> None:
        _require_positive(self, key, "samples_per_shard", "hf_parts")
        if self.source == "folder" and not self.folder:
            raise ConfigError(f"{key}.folder is required when {key}.source is 'folder'")
        for name in ("images", "labels"):
            if self.source == "idx" and not getattr(self, name):
                raise ConfigError(f"{key}.{name} is required when {key}.source is 'idx'")
        if self.train_digits < 0:
            raise ConfigError(f"{key}.train_digits must be >= 0 (0: all), got {self.train_digits}")


@dataclass
class GridConfig:
    """Grids of digits: R rows drawn uniformly from min_rows..rows, C columns from
    min_cols..cols (a min of 0: exactly rows x cols), each cell blank with probability
    blank_prob. A grid of `eval_grids` has a `name` and no training grids."""

    name: str = "grids"
    rows: int = 2
    cols: int = 2
    min_rows: int = 0
    min_cols: int = 0
    blank_prob: float = 0.0
    train_count: int = 3000
    val_count: int = 200
    test_count: int = 500
    samples_per_shard: int = 1000

    def row_range(self) -> tuple[int, int]:
        return (self.min_rows or self.rows, self.rows)

    def col_range(self) -> tuple[int, int]:
        return (self.min_cols or self.cols, self.cols)

    def validate(self, key: str, for_eval: bool = False) -> None:
        _require_positive(self, key, "val_count", "test_count", "samples_per_shard")
        if for_eval:
            if self.train_count:
                raise ConfigError(f"{key}.train_count must be 0: evaluation grids are never trained on")
            if not self.name.isalnum() or self.name == "grids":
                raise ConfigError(f"{key}.name must be letters and digits only, not 'grids', got {self.name!r}")
        else:
            _require_positive(self, key, "train_count")
        for name in ("rows", "cols"):
            if not 1 <= getattr(self, name) <= 10:
                raise ConfigError(f"{key}.{name} must be in 1..10, got {getattr(self, name)}")
            low = getattr(self, f"min_{name}")
            if not 0 <= low <= getattr(self, name):
                raise ConfigError(f"{key}.min_{name} must be in 0..{key}.{name} ({getattr(self, name)}), got {low}")
        if not 0.0 <= self.blank_prob < 1.0:
            raise ConfigError(f"{key}.blank_prob must be in [0, 1), got {self.blank_prob}")


@dataclass
class TextConfig:
    # stdlib: the Python standard library's own sources (offline);
    # hf: a Hugging Face dataset id; files: local .txt / .parquet paths or globs.
    source: Literal["stdlib", "hf", "files"] = "stdlib"
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    text_field: str = "text"
    paths: list[str] = field(default_factory=list)
    max_bytes: int = 3_000_000
    val_fraction: float = 0.05
    docs_per_shard: int = 200  # files per shard task (a parquet file is one task)
    hf_parts: int = 4  # a Hugging Face dataset is streamed by this many tasks, each its own slice

    def validate(self, key: str) -> None:
        _require_positive(self, key, "max_bytes", "docs_per_shard", "hf_parts")
        if self.source == "hf" and not self.hf_dataset:
            raise ConfigError(f"{key}.hf_dataset is required when {key}.source is 'hf'")
        if self.source == "files" and not self.paths:
            raise ConfigError(f"{key}.paths is required when {key}.source is 'files'")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{key}.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class DataConfig:
    seed: int = 0
    mnist: MnistConfig = field(default_factory=MnistConfig)
    grids: GridConfig = field(default_factory=GridConfig)
    # More grid sets, for evaluation only (val and test splits): e.g. fixed 2x2 grids
    # without blanks next to the ragged grids the captioner trains on.
    eval_grids: list[GridConfig] = field(default_factory=list)
    text: TextConfig = field(default_factory=TextConfig)
    # A shard that fails its checksum or does not decode: "error" stops the training
    # stage naming it; "skip" checks every training shard first and trains without the
    # bad ones, logging each by name (to the log and to the stage's MLflow run).
    on_bad_shard: Literal["error", "skip"] = "error"
    # A directory on each node's own disk where training keeps whole copies of shards it
    # reads from a bucket, shared by the node's readers and kept to `cache_mb` (least
    # recently used copies go first): later epochs and resumed runs read the disk.
    cache_dir: Optional[str] = run_time(None)
    cache_mb: int = run_time(20480)

    def validate(self, key: str) -> None:
        _require_positive(self, key, "cache_mb")
        if self.cache_dir is not None and "://" in self.cache_dir:
            raise ConfigError(f"{key}.cache_dir must be a directory on the node's own disk, got {self.cache_dir!r}")
        names = [g.name for g in self.eval_grids]
        for i, grids in enumerate(self.eval_grids):
            grids.validate(f"{key}.eval_grids[{i}]", for_eval=True)
            if names.count(grids.name) > 1:
                raise ConfigError(f"{key}.eval_grids[{i}].name {grids.name!r} is used twice")

    def grid_sets(self) -> list[GridConfig]:
        """The training grids first, then every evaluation-only set."""
        return [self.grids, *self.eval_grids]


@dataclass
class TokenizeConfig:
    vocab_size: int = 4096
    seq_len: int = 128
    train_bytes: int = 2_000_000  # the tokenizer trains on this much of the training text

    def validate(self, key: str) -> None:
        if self.vocab_size < 257:
            raise ConfigError(f"{key}.vocab_size must be at least 257 (256 bytes + 1), got {self.vocab_size}")
        _require_positive(self, key, "train_bytes")
        if self.seq_len < 8:
            raise ConfigError(f"{key}.seq_len must be at least 8, got {self.seq_len}")


@dataclass
class PatchifyConfig:
    patch_size: int = 7
    # MNIST pixel statistics, used to normalise every image the same way.
    mean: float = 0.1307
    std: float = 0.3081

    def validate(self, key: str) -> None:
        if self.patch_size <= 0 or CELL % self.patch_size:
            raise ConfigError(f"{key}.patch_size must divide the {CELL}-pixel cell, got {self.patch_size}")
        if self.std <= 0:
            raise ConfigError(f"{key}.std must be positive, got {self.std}")

    def layout(self) -> PatchLayout:
        return PatchLayout(self.patch_size, self.mean, self.std)


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    # How the global batch is laid out over workers, micro-batches and accumulation is
    # run-time (a run resumes at another world size); the global batch itself is part
    # of the fingerprint (`derived_identity`).
    num_workers: int = run_time(2)
    use_gpu: bool = run_time(False)
    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    micro_batch_size: int = run_time(32)
    grad_accum: int = run_time(1)
    max_steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = run_time(10)
    # Validation loss and accuracy every this many steps and at the end (0: never).
    eval_every: int = 0
    eval_samples: int = 512  # validation samples, the first of the validation shards
    checkpoint_every: int = 0  # 0: only at the end
    # Loader: DataLoader worker processes per rank (0: read in the training process),
    # batches each worker prepares ahead, and the global order (data/order.py): its parts,
    # fixed when the world size changes (with num_workers x loader_workers dividing them,
    # each loader worker reads only its own parts' shards, about corpus / readers per epoch;
    # 1: every reader reads every shard), and the shuffle block within a part (samples;
    # larger than a shard; a worker holds about a block of each part it reads).
    loader_workers: int = run_time(1)
    prefetch: int = run_time(2)
    data_partitions: int = 1
    shuffle_block: int = 16384
    # A training set whose decoded arrays fit this budget (per loader worker) is decoded
    # once and reused every epoch; a larger one is streamed. 0: always stream.
    loader_cache_mb: int = run_time(128)
    max_failures: int = run_time(0)
    # Peak FLOP/s of one worker's device, for MFU. 180e9: the fp32 matmul rate of one
    # core of the 2-core CI machine (1024-2048 square, measured 176-183 GFLOP/s), as
    # each CPU worker gets one core; an H100 in bf16 is ~989e12 dense.
    peak_flops_per_worker: float = run_time(180e9)
    seed: int = 0
    # Speed switches that keep the math (tests/test_switches.py): torch.compile of the
    # model (DeepSpeed's engine.compile, inductor), and what each transformer block
    # recomputes in its backward pass: none, full or selective (pipeline/models/recompute.py).
    compile: bool = run_time(False)
    activation_checkpointing: Literal["none", "full", "selective"] = run_time("none")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over all workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers

    def derived_identity(self) -> dict[str, int]:
        return {"global_batch": self.global_batch}

    def validate(self, key: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{key}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{key}.offload_optimizer needs {key}.zero_stage >= 1")
        _require_positive(self, key, "num_workers", "micro_batch_size", "grad_accum", "max_steps", "log_every",
                          "eval_samples", "prefetch", "shuffle_block", "data_partitions")
        for name in ("eval_every", "checkpoint_every", "loader_workers", "max_failures", "loader_cache_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"{key}.min_lr must be in (0, {key}.lr], got {self.min_lr}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"{key}.warmup_steps must be in [0, max_steps), got {self.warmup_steps}")


@dataclass
class TransformerConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0

    def validate(self, key: str) -> None:
        _require_positive(self, key, "n_layer", "n_head", "d_model")
        if self.d_model % self.n_head:
            raise ConfigError(f"{key}.d_model ({self.d_model}) must be divisible by {key}.n_head ({self.n_head})")


@dataclass
class AugmentConfig:
    """Random affine distortion of each 28x28 cell while training (all 0: none): up to
    `rotate` and `shear` degrees, `scale` (a fraction) and `shift` pixels either way."""

    rotate: float = 0.0
    shear: float = 0.0
    scale: float = 0.0
    shift: float = 0.0

    def validate(self, key: str) -> None:
        limits = {"rotate": 45.0, "shear": 45.0, "scale": 0.5, "shift": 13.0}
        for name, most in limits.items():
            if not 0.0 <= getattr(self, name) <= most:
                raise ConfigError(f"{key}.{name} must be in [0, {most:g}], got {getattr(self, name)}")

    def active(self) -> bool:
        return any((self.rotate, self.shear, self.scale, self.shift))


@dataclass
class PretrainGPTConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(zero_stage=3))


@dataclass
class PretrainViTConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Random shifts of up to this many whole pixels, a cheap augmentation for small data
    # (on 4,000 digits: 1 px took test accuracy from 93% to 96%; 2 px underfit).
    # An active `augment` (affine) replaces it.
    max_shift: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Channels of a conv stem in front of the patch tokens (`models.vit.ConvStem`; its
    # last convolution has twice as many). 0: the linear patch projection of a stock
    # ViT. The captioner's encoder inherits it.
    stem_channels: int = 0
    # What the head reads of an image, and the captioner of each cell: the class token
    # ("cls", as a stock ViT) or the mean of the patch tokens ("mean"). The captioner's
    # encoder inherits it.
    pool: Literal["cls", "mean"] = "cls"

    def validate(self, key: str) -> None:
        if not 0 <= self.max_shift < 14:
            raise ConfigError(f"{key}.max_shift must be 0..13 pixels (half a 28-pixel cell), got {self.max_shift}")
        if not 0 <= self.stem_channels <= 256:
            raise ConfigError(f"{key}.stem_channels must be 0..256, got {self.stem_channels}")


@dataclass
class FinetuneConfig:
    decoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(n_layer=2))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(zero_stage=1))
    # Learning-rate multiplier for the pretrained encoder (0 freezes it).
    encoder_lr_scale: float = 0.1
    # "scratch": the encoder starts from random weights of the same shape, to measure
    # what pretraining buys at equal fine-tune compute.
    encoder_init: Literal["pretrained", "scratch"] = "pretrained"
    # Safetensors of a GPT with the decoder's shape and the captioner's vocabulary (as
    # bench/decoder_init.py pretrains on digit text): its embeddings, self-attention,
    # MLPs and final norm start the decoder. Empty: a fresh decoder.
    init_decoder: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # each grid cell on its own
    # Add the pretrained ViT head's logits for the cell under the cursor to the decoder's
    # digit logits (models.captioner.Captioner.decode).
    head_logits: bool = False
    # At test time (evaluate, predict, export) the head also reads each cell moved this
    # many pixels left, right, up and down, and its five readings are averaged. 0: once.
    head_shift: int = 0

    def validate(self, key: str) -> None:
        if not 0 <= self.head_shift <= 3:
            raise ConfigError(f"{key}.head_shift must be 0..3 pixels, got {self.head_shift}")
        if self.head_shift and not self.head_logits:
            raise ConfigError(f"{key}.head_shift needs {key}.head_logits: true (it averages the head's logits)")
        if self.encoder_lr_scale < 0:
            raise ConfigError(f"{key}.encoder_lr_scale must be >= 0, got {self.encoder_lr_scale}")
        if self.init_decoder and "://" not in self.init_decoder and not Path(self.init_decoder).is_file():
            raise ConfigError(f"{key}.init_decoder: no file at {self.init_decoder!r}")


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    # False while settings are being chosen: only the validation splits are read, and the
    # pictures and examples show validation grids. The test split is read once, at the end.
    test: bool = True
    max_val_sequences: int = 2000
    use_gpu: bool = False  # evaluation runs as a Ray task; this asks it for a GPU
    num_cpus: int = 1  # and this many CPUs, as many torch threads

    def validate(self, key: str) -> None:
        _require_positive(self, key, "batch_size", "max_val_sequences", "num_cpus")


# --------------------------------------------------------------------------- run


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local cluster
    num_cpus: Optional[int] = None  # local cluster only


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI if set, else SQLite under the workdir
    experiment: str = "thousandwords"
    sweep: Optional[str] = None  # tags every run with `sweep`, for `pipeline scaling fit --sweep`
    # Attach each training stage's final safetensors to its run. Off for models whose
    # weights should not be copied into the artifact store (the workdir keeps them).
    log_weights: bool = True
    # MLflow's system metrics (CPU, memory, disk, network, GPU) on each stage's run,
    # sampled on the driver's node every this many seconds; 0: off.
    system_metrics_every: float = 5.0

    def validate(self, key: str) -> None:
        if self.system_metrics_every < 0:
            raise ConfigError(f"{key}.system_metrics_every must be >= 0 (0: off), got {self.system_metrics_every}")


@dataclass
class StorageConfig:
    # The workdir is a mount every node sees (NFS, a parallel filesystem). Only then
    # may a cluster of several nodes use a local workdir path and a SQLite tracker.
    shared: bool = False


@dataclass
class RunConfig:
    name: str = "run"
    workdir: str = "runs/default"
    # The stages `pipeline run` makes, with what they depend on (empty: every stage),
    # e.g. [evaluate] for the captioner's branch alone.
    targets: list[str] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    patchify: PatchifyConfig = field(default_factory=PatchifyConfig)
    pretrain_gpt: PretrainGPTConfig = field(default_factory=PretrainGPTConfig)
    pretrain_vit: PretrainViTConfig = field(default_factory=PretrainViTConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation`, or raise naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf and .nan; no setting means either
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in hints:
            close = difflib.get_close_matches(str(raw_key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[raw_key] = _check_value(value, hints[raw_key], key)
    obj = cls(**kwargs)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}.{f.name}" if prefix else f.name)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value")
    dotted, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    node: Any = data
    parts = dotted.strip().split(".")
    for i, part in enumerate(parts):
        if isinstance(node, list):  # a list of sections, indexed: data.eval_grids.0.test_count=100
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{part}' is not an index of {parts[i - 1]} (it has {len(node)} entries)")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{parts[i - 1]}' is not a section")
        if i == len(parts) - 1:
            node[part] = value
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]


def config_from_dict(data: dict[str, Any], overrides: Optional[list[str]] = None) -> RunConfig:
    data = dict(data or {})
    for override in overrides or []:
        _apply_override(data, override)
    config = _build(RunConfig, data, "")
    _validate(config, "")
    return config


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def dataclass_from_dict(cls: type, data: Any, what: str) -> Any:
    """Any config dataclass from a mapping, built and validated as a run config is;
    errors name keys under `what`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    obj = _build(cls, data, what)
    _validate(obj, what)
    return obj


def load_dataclass(cls: type, path: str | Path, what: str) -> Any:
    """Any config dataclass from a YAML file, built and validated as a run config is."""
    obj = _build(cls, read_yaml_mapping(path, what), "")
    _validate(obj, "")
    return obj


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    return config_from_dict(read_yaml_mapping(path), overrides)
