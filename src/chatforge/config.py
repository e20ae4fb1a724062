"""One config system: typed dataclasses, YAML presets (configs/*.yaml), `key.sub=value` CLI overrides.

A preset names only what differs from the defaults below. Unknown keys are an error that names the key
and lists the valid ones, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)  # files/folders/globs; empty -> Python stdlib corpus
    text_field: str = "text"  # field holding the text in .jsonl/.json/.csv/.parquet records
    val_fraction: float = 0.05  # share of documents in the validation split (by document hash)
    split_salt: str = "chatforge"  # changes which documents land in validation
    min_chars: int = 32  # documents shorter than this (after cleaning) are dropped
    max_chars: int = 1_000_000  # longer documents are dropped
    max_docs: int = 0  # stop after this many documents (0 = all)
    max_bytes: int = 0  # stop after this many bytes of kept text (0 = all)
    lowercase: bool = False  # off by default: a generative model should learn real casing
    remove_stopwords: bool = False  # off by default: removing words makes the model write broken text
    near_dedup: bool = False  # MinHash LSH near-duplicate removal (datasketch)
    near_dedup_threshold: float = 0.8
    workers: int = 1  # >1: a process pool cleans and filters; output is byte-identical to workers=1
    strict: bool = False  # a JSON record without text_field stops prepare (default: rejected with file:line)
    near_dedup_ngram: int = 5  # MinHash shingle size in words
    near_dedup_num_perm: int = 128  # MinHash permutations (more: slower, more precise)
    weights: list[float] = field(default_factory=list)  # one per input: 2 = train docs twice, 0.5 = half
    mask_pii: bool = False  # replace e-mail and IP addresses with <EMAIL> / <IP>
    # Gopher-style quality rules. Off by default: they are written for web prose and drop Python source
    # (comments start with '#', lines repeat). Each threshold below is ignored when 0.
    quality_filters: bool = False
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    min_alpha_ratio: float = 0.6  # alphabetic / non-space characters
    max_symbol_ratio: float = 0.1  # ('#' + '...') per word
    max_duplicate_line_fraction: float = 0.3  # chars in lines repeating an earlier line
    max_repeated_ngram_fraction: float = 0.15  # chars covered by word n-grams seen twice or more
    repeated_ngram_size: int = 5
    languages: list[str] = field(default_factory=list)  # e.g. [en]; needs langid or langdetect installed
    min_language_score: float = 0.5
    # Where prepare/encode run their per-document work: "local" (this machine) or "ray" (Ray tasks; pip install
    # 'chatforge[ray]'). Output is byte-identical either way.
    executor: str = "local"
    ray_address: str = ""  # Ray cluster to join, e.g. "ray://head:10001" or "auto"; empty: start Ray locally


@dataclass
class SFTDataConfig:
    inputs: list[str] = field(default_factory=list)  # chat JSONL; empty -> docstring Q&A from the stdlib
    val_fraction: float = 0.1  # by question hash: no question is in both splits
    max_examples: int = 0  # 0 = all


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (byte-level BPE, HF tokenizers) or "char"
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_bytes: int = 200_000_000  # train the vocabulary on at most this much text


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    n_embd: int = 256
    intermediate_size: int = 0  # SwiGLU hidden size; 0 -> about 8/3 * n_embd, rounded up to 64
    seq_len: int = 256  # context length
    vocab_size: int = 0  # 0 -> taken from the tokenizer
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # on -> maps to Qwen3 on export, off -> Llama
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def hidden(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        h = int(8 * self.n_embd / 3)
        return (h + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | sgd | muon
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1  # matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.9  # sgd / muon
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 100  # steps between validations (0 = only at the end)
    eval_batches: int = 20  # validation micro-batches per evaluation
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept besides best
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 autocast where the GPU/CPU has bf16 units that measure faster) | fp32 | bf16
    compile: str = "auto"  # auto (on for CUDA; on CPU for long single-process runs, see distributed.use_compile) | on | off
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    log_every: int = 10
    # Global batch in tokens per optimizer step (all processes). 0 = batch_size * grad_accum * world * seq_len;
    # when set, grad_accum is derived from it and batch_size * world * seq_len must divide it.
    global_batch_tokens: int = 0
    early_stop_patience: int = 0  # stop after this many evaluations without a better val loss (0 = off)
    sample_every_eval: bool = True  # write fixed-prompt samples at each evaluation (when the stage gives prompts)
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)
    wandb_project: str = ""  # also log to this Weights & Biases project (needs wandb; "" = off)
    strategy: str = "ddp"  # under torchrun: ddp (replicate) | fsdp (FSDP2 fully_shard, for models that don't fit)


@dataclass
class DPOConfig:
    """finetune.mode=dpo: preference pairs (prompt, chosen, rejected) in finetune.inputs."""
    beta: float = 0.1  # strength of the pull towards the reference model
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    val_fraction: float = 0.1  # pairs held out (by prompt hash) for reward margin and accuracy


@dataclass
class GRPOConfig:
    """finetune.mode=grpo: RL with verifiable rewards on a task's prompts."""
    task: str = "addition"  # a registered reward task (addition, gsm8k) or FILE.py:FUNCTION(prompt, completion, **item)
    prompts: str = ""  # JSONL of prompts for the task ({"prompt", ...}); empty -> the task's own
    group: int = 8  # samples per prompt (advantages are normalised within a group)
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    epsilon: float = 0.2  # clip range of the probability ratio
    beta: float = 0.0  # KL penalty towards the reference model (0 = none, as TRL's default)
    eval_prompts: int = 64  # held-out prompts scored greedily before/after


@dataclass
class FinetuneConfig(TrainConfig):
    """The training settings (the same loop as pretraining) plus what only fine-tuning has."""
    init_from: str = ""  # checkpoint, HF folder or hub name to start from ("" -> the run's latest model)
    inputs: list[str] = field(default_factory=list)  # chat JSONL (sft) or domain text (cpt); empty -> the run's chat set
    mode: str = "sft"  # sft (chat, loss on assistant tokens) | cpt (continued pretraining on domain text)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 -> 2 * rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # empty -> all attention and MLP projections
    eval_prompts: int = 20  # held-out prompts whose replies are checked for ending at end-of-turn
    eval_sampled: bool = True  # also decode them as `chat` does (sampled), besides greedily
    # A conversation longer than the context: "turns" keeps the whole turns that fit (drops it if none does),
    # so every example ends with <|end|>; "cut" keeps the first seq_len tokens, long replies without their end.
    too_long: str = "turns"
    seq_len: int = 0  # training context; 0 = the model's own (an imported model's can be far longer than needed)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_batches: int = 0  # 0 = the whole split


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0
    weights: str = "fp32"  # int4: one-row CPU decoding reads 4-bit weight copies (~2.4x faster, see cpu_decode.py)
    precision: str = "auto"  # of the prompt's forward (prefill): auto | fp32 | bf16 (autocast); decoding stays fp32
    device: str = "auto"  # where generate/chat/serve/eval run: auto | cpu | cuda | mps


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # requests decoded together (continuous batching); 1 = one at a time
    max_body_mb: float = 1.0  # larger request bodies get 413


@dataclass
class DemoConfig:
    """`chatforge demo`, after the from-scratch stages: fine-tune a real pre-trained model on the same chat set
    (in RUN/pretrained/) and let chat/serve/export of RUN use whichever answers the held-out questions better."""
    pretrained: str = "smollm2-135m"  # anything `chatforge import` takes; "" = the from-scratch model alone
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        steps=60, batch_size=8, lr=1e-3, lora_rank=16, seq_len=128, warmup_steps=5, eval_every=0,
        weight_decay=0.0, eval_prompts=40, eval_sampled=False))
    eval_batches: int = 8  # validation batches for its before/after losses (a 135M model: ~1 s each on a CPU)


@dataclass
class Config:
    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        steps=200, lr=1e-3, warmup_steps=20, eval_every=50, weight_decay=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the declared field type, or raise a UserError naming the key."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, key) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}")
    return value


# Fields with a fixed set of values, checked when the config is read: a typo is an error before any stage
# starts (and before --force removes anything), not after.
CHOICES = {"TrainConfig": {"precision": ("auto", "fp32", "bf16"), "optimizer": ("adamw", "sgd", "muon"),
                           "schedule": ("cosine", "wsd", "constant"), "strategy": ("ddp", "fsdp")},
           "FinetuneConfig": {"mode": ("sft", "cpt", "dpo", "grpo")}, "DPOConfig": {"loss": ("sigmoid", "ipo")},
           "DataConfig": {"executor": ("local", "ray")},
           "GenerateConfig": {"weights": ("fp32", "int4"), "precision": ("auto", "fp32", "bf16")},
           "TokenizerConfig": {"kind": ("bpe", "char")}}


def _choices(obj: Any, key: str) -> tuple[str, ...] | None:
    for cls in type(obj).__mro__:
        if key in CHOICES.get(cls.__name__, {}):
            return CHOICES[cls.__name__][key]
    return None
RETIRED = {"train.init_from"}  # keys older runs' config.yaml may hold; read and ignored (now finetune.init_from)


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RETIRED:
            continue
        if key not in names:
            raise UserError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' is a section; give it as a mapping of its keys")
            _apply(current, value, full + ".")
        else:
            value = _coerce(value, hints[key], full)
            allowed = _choices(obj, key)
            if allowed and str(value).lower() not in allowed:
                raise UserError(f"config key '{full}': {value!r} is not one of {', '.join(allowed)}")
            setattr(obj, key, value)


def resolve_preset(path_or_name: str) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    cand = PRESET_DIR / f"{path_or_name}.yaml"
    if cand.is_file():
        return cand
    presets = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise UserError(f"config '{path_or_name}' not found; give a YAML file or a preset name ({presets})")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.sub=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path_or_name: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file/preset <- `key.sub=value` overrides."""
    cfg = Config()
    if path_or_name:
        p = resolve_preset(path_or_name)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping of config sections at the top level")
        _apply(cfg, data)
    for ov in overrides or []:
        key, value = parse_override(ov)
        node: dict = {}
        cur = node
        parts = key.split(".")
        for part in parts[:-1]:
            cur[part] = {}
            cur = cur[part]
        cur[parts[-1]] = value
        _apply(cfg, node)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
