"""Typed pipeline configuration.

One frozen dataclass per stage, nested in :class:`PipelineConfig`. Every field has a default, a type
and a one-line description (``field(metadata={"doc": ...})``). Configs are built from a preset
(``lmpipe/presets/<name>.yaml``), then YAML files, then ``section.key=value`` overrides; unknown keys
and wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


def knob(default: Any, doc: str) -> Any:
    """A config field with its one-line description."""
    return field(default=default, metadata={"doc": doc})


# The knobs of the shared training machinery (lmpipe.trainer) that every training stage (pretrain, sft,
# reward, ppo) has, each described once; each stage picks its own defaults.
TRAINING_KNOBS = {
    "grad_accum": "Micro-batches accumulated into one optimizer step.",
    "lr": "Peak learning rate.",
    "min_lr": "Learning rate at the end of the cosine decay (equal to lr: constant).",
    "warmup_steps": "Optimizer steps of linear learning-rate warmup.",
    "weight_decay": "AdamW weight decay, applied to matrices only.",
    "beta1": "AdamW beta1.",
    "beta2": "AdamW beta2.",
    "grad_clip": "Clip the global gradient norm to this (0: no clipping).",
    "keep_last": "Checkpoints kept on disk (older ones are deleted).",
    "device": "Training device; auto picks CUDA when available.",
    "dtype": "Autocast precision; auto is bf16 where the device computes it natively (GPUs with it, CPUs "
             "with AVX512-BF16 or AMX), else float32.",
    "deterministic": "Ask PyTorch for deterministic kernels (exact resume on CPU).",
    "threads": "CPU threads for PyTorch (0: leave PyTorch's default).",
    "peak_tflops": "Accelerator peak in TFLOP/s for MFU (0: look the GPU up in a table).",
}


def training_knob(name: str, default: Any) -> Any:
    """A knob of the shared training machinery, described in :data:`TRAINING_KNOBS`."""
    return field(default=default, metadata={"doc": TRAINING_KNOBS[name], "training": name})


def check_training(cfg: Any, section: str) -> None:
    """The checks of the shared training knobs that ``cfg`` has (``section`` names it in errors)."""
    has = {f.name for f in dataclasses.fields(cfg)}
    if not 0 <= cfg.min_lr <= cfg.lr or cfg.warmup_steps < 0:
        raise ConfigError(f"{section} needs 0 <= min_lr <= lr and warmup_steps >= 0")
    if "max_steps" in has and cfg.warmup_steps > cfg.max_steps:
        raise ConfigError(f"{section}.warmup_steps must be <= {section}.max_steps")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1) or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ConfigError(f"{section}.beta1/beta2 must be in [0, 1); weight_decay and grad_clip >= 0")
    if "grad_accum" in has and cfg.grad_accum < 1:
        raise ConfigError(f"{section}.grad_accum must be >= 1")
    counts = [k for k in ("save_every", "keep_last", "threads", "peak_tflops") if k in has and getattr(cfg, k) < 0]
    if counts:
        raise ConfigError(f"{section}.{counts[0]} must be >= 0")
    if cfg.log_every < 1:
        raise ConfigError(f"{section}.log_every must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded. Not part of any stage's cache key."""

    experiment: str = knob("lmpipe", "MLflow experiment name (one per workspace by default).")
    tracking_uri: str | None = knob(
        None, "MLflow tracking URI; None means $MLFLOW_TRACKING_URI, else a SQLite store inside the workspace."
    )
    log_system_info: bool = knob(
        True, "Tag runs with the git commit, the hardware (CPU model and cores, memory, GPUs) and library versions."
    )
    registered_model: str = knob(
        "lmpipe-policy", "Model-registry name of the PPO policy, registered after the ppo stage (empty: none)."
    )
    register_reward_model: bool = knob(False, "Also register the reward model (as registered_reward_model).")
    registered_reward_model: str = knob("lmpipe-reward", "Model-registry name of the reward model.")
    register_alias: str = knob("candidate", "Alias set to the version each run registers or reuses (empty: none).")

    def __post_init__(self) -> None:
        for key in ("registered_model", "registered_reward_model"):
            if any(c in getattr(self, key) for c in "/:'"):
                raise ConfigError(f"tracking.{key} may not contain '/', ':' or a quote: {getattr(self, key)!r}")
        alias = self.register_alias
        if not re.fullmatch(r"[\w-]*", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ConfigError(f"tracking.register_alias must be letters, digits, '_' or '-', and not 'latest' "
                              f"or v<number>: {alias!r}")


@dataclass(frozen=True)
class IngestConfig:
    """Corpus ingestion into the DuckDB warehouse."""

    sources: tuple[str, ...] = knob(
        (), "Files, directories, globs or URIs to ingest; empty means the built-in stdlib-docstring corpus."
    )
    unit: Literal["line", "paragraph"] = knob("line", "Document unit of .txt/.md files: one per line or per paragraph.")
    text_field: str = knob("text", "Field (JSON) or column (Parquet/CSV) holding the document text.")
    builtin_modules: tuple[str, ...] = knob(
        (), "Restrict the built-in corpus to these stdlib modules (empty: the whole public standard library)."
    )
    min_chars: int = knob(16, "Drop documents shorter than this many characters after cleaning.")
    max_chars: int = knob(200_000, "Drop documents longer than this many characters after cleaning.")
    near_dedup: bool = knob(False, "Remove near-duplicates with MinHash LSH (exact dedup is always on).")
    near_dedup_threshold: float = knob(0.8, "Estimated Jaccard similarity at which a document is a near-duplicate.")
    minhash_perm: int = knob(128, "Number of MinHash permutations.")
    minhash_shingle: int = knob(5, "Character n-gram size of the MinHash shingles.")
    val_fraction: float = knob(0.05, "Share of documents assigned to the val split (by content hash).")
    test_fraction: float = knob(0.05, "Share of documents assigned to the test split (by content hash).")
    fsspec_schemes: tuple[str, ...] = knob(
        (), "URI schemes (s3, gs, ...) read through fsspec (s3fs, gcsfs) instead of DuckDB's httpfs extension."
    )

    def __post_init__(self) -> None:
        if any(not s.isidentifier() for s in self.fsspec_schemes):
            raise ConfigError(f"ingest.fsspec_schemes are scheme names such as s3 or gs (no '://'): "
                              f"{list(self.fsspec_schemes)}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ConfigError("ingest.val_fraction and ingest.test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("ingest.val_fraction + ingest.test_fraction must be below 1")
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ConfigError("ingest.min_chars must be >= 0 and <= ingest.max_chars")
        if not 0 < self.near_dedup_threshold <= 1:
            raise ConfigError("ingest.near_dedup_threshold must be in (0, 1]")
        if self.minhash_perm < 16 or self.minhash_shingle < 1:
            raise ConfigError("ingest.minhash_perm must be >= 16 and ingest.minhash_shingle >= 1")


@dataclass(frozen=True)
class NgramConfig:
    """Statistical n-gram language models (counting in the warehouse, smoothing, perplexity, ARPA)."""

    orders: tuple[int, ...] = knob((1, 2, 3, 4, 5), "Model orders to fit; counting runs once, at the largest.")
    methods: tuple[Literal["mle", "addk", "katz", "stupid", "jm", "kn"], ...] = knob(
        ("mle", "addk", "katz", "stupid", "jm", "kn"),
        "Smoothing methods: MLE, add-k, Katz back-off, stupid back-off, Jelinek-Mercer, modified Kneser-Ney.",
    )
    min_count: int = knob(2, "Words seen fewer times in the train split map to <unk>.")
    lowercase: bool = knob(False, "Lower-case text before tokenizing.")
    add_k: float = knob(1.0, "Pseudo-count k of add-k smoothing (1 is Laplace).")
    stupid_alpha: float = knob(0.4, "Back-off factor of stupid back-off.")
    prompts: tuple[str, ...] = knob(("The", "Return the", "If the"), "Prompts to sample continuations from.")
    sample_tokens: int = knob(30, "Tokens generated per prompt (fewer if </s> comes first).")
    seed: int = knob(0, "Seed of the sampler.")
    memory_limit: str = knob("2GB", "Memory limit of counting and estimation: DuckDB spills to disk beyond it, and "
                                    "Kneser-Ney uses its sorted engine only where its arrays fit; empty: none.")

    def __post_init__(self) -> None:
        if not self.orders or not all(1 <= o <= 9 for o in self.orders):
            raise ConfigError("ngram.orders must be a non-empty list of orders between 1 and 9")
        if not self.methods:
            raise ConfigError("ngram.methods must name at least one smoothing method")
        if self.min_count < 1 or self.add_k <= 0 or not 0 < self.stupid_alpha <= 1 or self.sample_tokens < 0:
            raise ConfigError("ngram: min_count >= 1, add_k > 0, 0 < stupid_alpha <= 1 and sample_tokens >= 0")


@dataclass(frozen=True)
class EmbeddingsConfig:
    """Neural word-level models on the n-gram stage's tokens: Bengio NNLM, a recurrent LM, word2vec."""

    models: tuple[Literal["nnlm", "rnnlm", "word2vec"], ...] = knob(
        ("nnlm", "rnnlm", "word2vec"), "Which models to train: the NNLM, the recurrent LM, word2vec."
    )
    nnlm_order: int = knob(4, "NNLM order n: it reads the n-1 previous words.")
    nnlm_embd: int = knob(64, "NNLM word-vector size (columns of C).")
    nnlm_hidden: int = knob(128, "NNLM tanh hidden units.")
    nnlm_direct: bool = knob(True, "NNLM direct connections from the concatenated word vectors to the output.")
    rnn_cell: Literal["lstm", "gru"] = knob("lstm", "Recurrent cell of the recurrent LM.")
    rnn_embd: int = knob(64, "Recurrent LM word-vector size.")
    rnn_hidden: int = knob(128, "Recurrent LM hidden units per layer.")
    rnn_layers: int = knob(1, "Recurrent LM layers.")
    bptt: int = knob(32, "Recurrent LM truncated-backpropagation length in tokens.")
    rnn_streams: int = knob(16, "Parallel token streams per recurrent LM batch (rnn_streams × bptt tokens a step).")
    lm_epochs: int = knob(10, "Most passes over the train split for the NNLM and the recurrent LM.")
    lm_patience: int = knob(2, "Stop after this many epochs without a better val loss (the best weights are kept).")
    lm_batch_size: int = knob(64, "NNLM windows (n-grams) per batch.")
    lm_lr: float = knob(2e-3, "Adam learning rate of the NNLM and the recurrent LM.")
    lm_dropout: float = knob(0.1, "Dropout on word vectors and hidden layers of the NNLM and recurrent LM.")
    lm_max_tokens: int = knob(0, "Train the NNLM and recurrent LM on at most this many train tokens (0: all).")
    w2v_variants: tuple[Literal["sg-ns", "sg-hs", "cbow-ns", "cbow-hs"], ...] = knob(
        ("sg-ns",), "word2vec variants: skip-gram or CBOW, with negative sampling or hierarchical softmax."
    )
    w2v_dim: int = knob(100, "word2vec vector size.")
    w2v_window: int = knob(5, "word2vec maximum window (each centre draws its window from 1..window).")
    w2v_negative: int = knob(5, "Noise words per positive example (negative sampling).")
    w2v_cbow_mean: bool = knob(True, "CBOW averages the context vectors (False: sums them).")
    w2v_sample: float = knob(1e-3, "Subsampling threshold t of frequent words (0: no subsampling).")
    w2v_min_count: int = knob(5, "word2vec ignores words seen fewer times in the train split.")
    w2v_epochs: int = knob(5, "word2vec passes over the train split.")
    w2v_alpha: float = knob(0.0, "word2vec initial learning rate (0: word2vec.c's 0.025 skip-gram, 0.05 CBOW).")
    w2v_threads: int = knob(0, "CPU threads of the word2vec kernels (0: all cores).")
    w2v_streams: int = knob(
        0, "Hogwild word2vec: the train split is cut into this many parts, trained side by side (0: one per CPU "
        "thread, as word2vec.c and gensim give each thread its own part of the input; with the "
        "triton GPU engine 2,048 programs, or one per 1,000 words of a smaller corpus)."
    )
    w2v_device: Literal["auto", "cpu", "cuda"] = knob("auto", "word2vec device; auto picks CUDA when available.")
    w2v_gpu_engine: Literal["auto", "torch", "triton"] = knob(
        "auto", "word2vec on a GPU: triton (a Hogwild kernel that applies each example in turn, as the CPU threads "
        "do; needs the triton package, which PyTorch's CUDA builds bring), torch (batched steps whose updates are "
        "summed, capped per row) or auto (triton where it is installed, else torch)."
    )
    w2v_batch_pairs: int = knob(
        1 << 15, "Training examples per step on the GPU path (larger is faster but trains worse vectors)."
    )
    w2v_gpu_row_cap: int = knob(
        64, "GPU path: a vector that more examples of one step update moves by at most this many examples' worth."
    )
    probe_words: tuple[str, ...] = knob(
        ("return", "file", "list", "string", "error"), "Words whose nearest neighbours are logged each epoch."
    )
    neighbours: int = knob(8, "Nearest neighbours listed per probe word.")
    analogy_file: str = knob("", "Analogy questions (questions-words format) to evaluate on; empty: none.")
    similarity_files: tuple[str, ...] = knob((), "Word-pair similarity files (word1 TAB word2 TAB score).")
    eval_top_words: int = knob(30000, "Analogy answers are searched among this many most frequent words.")
    plot_words: int = knob(200, "Frequent words drawn in the 2-D PCA plot.")
    prompts: tuple[str, ...] = knob(("The", "Return the", "If the"), "Prompts the NNLM and recurrent LM continue.")
    sample_tokens: int = knob(30, "Tokens generated per prompt (fewer if </s> comes first).")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "Device of the NNLM and recurrent LM.")
    threads: int = knob(0, "PyTorch CPU threads (0: leave PyTorch's default).")
    seed: int = knob(0, "Seed of initialisation, data order, sampling and generation.")

    def __post_init__(self) -> None:
        if self.nnlm_order < 2 or min(self.nnlm_embd, self.nnlm_hidden, self.rnn_embd, self.rnn_hidden) < 1:
            raise ConfigError("embeddings.nnlm_order must be >= 2 and every layer size >= 1")
        sizes = (self.rnn_layers, self.bptt, self.rnn_streams, self.lm_epochs, self.lm_batch_size, self.w2v_dim,
                 self.w2v_window)
        if min(sizes) < 1:
            raise ConfigError("embeddings: rnn_layers, bptt, rnn_streams, lm_epochs, lm_batch_size, w2v_dim and "
                              "w2v_window must be >= 1")
        if self.lm_lr <= 0 or not 0 <= self.lm_dropout < 1 or self.w2v_alpha < 0 or self.w2v_sample < 0:
            raise ConfigError("embeddings: lm_lr > 0, 0 <= lm_dropout < 1, w2v_alpha >= 0 and w2v_sample >= 0")
        if min(self.lm_patience, self.lm_max_tokens, self.w2v_negative, self.w2v_threads, self.w2v_streams,
               self.threads) < 0:
            raise ConfigError("embeddings: lm_patience, lm_max_tokens, w2v_negative, w2v_threads, w2v_streams and "
                              "threads must be >= 0")
        if min(self.w2v_min_count, self.w2v_epochs, self.w2v_batch_pairs, self.w2v_gpu_row_cap, self.neighbours) < 1:
            raise ConfigError("embeddings: w2v_min_count, w2v_epochs, w2v_batch_pairs, w2v_gpu_row_cap and neighbours "
                              "must be >= 1")
        if any(v.endswith("-ns") for v in self.w2v_variants) and self.w2v_negative < 1:
            raise ConfigError("embeddings.w2v_negative must be >= 1 for a negative-sampling variant")


@dataclass(frozen=True)
class TokenizerConfig:
    """Byte-level BPE tokenizer trained on the train split, and the token shards of every split."""

    vocab_size: int = knob(4096, "Vocabulary size, counting the 6 special tokens and the 256 byte tokens.")
    min_frequency: int = knob(2, "A pair of tokens must occur at least this often in the train split to be merged.")
    split_pattern: Literal["gpt4", "gpt2"] = knob(
        "gpt4", "Pre-tokenization regex: GPT-4's (digits in groups of up to 3, line breaks kept apart) or GPT-2's."
    )
    max_train_bytes: int = knob(0, "Train the BPE on at most this many UTF-8 bytes of the train split (0: all of it).")
    batch_documents: int = knob(4096, "Documents fetched from the warehouse and encoded in parallel per batch.")

    def __post_init__(self) -> None:
        if not 6 + 256 < self.vocab_size <= 2**31:
            raise ConfigError("tokenizer.vocab_size must be above 262 (6 special + 256 byte tokens) and at most 2**31")
        if self.min_frequency < 1 or self.max_train_bytes < 0 or self.batch_documents < 1:
            raise ConfigError("tokenizer.min_frequency and tokenizer.batch_documents must be >= 1, "
                              "tokenizer.max_train_bytes >= 0")


@dataclass(frozen=True)
class PretrainConfig:
    """GPT pretraining on the token shards: model shape, optimisation, evaluation and checkpoints."""

    n_layer: int = knob(4, "Transformer blocks.")
    n_head: int = knob(4, "Attention heads per block.")
    n_embd: int = knob(256, "Width of the residual stream.")
    block_size: int = knob(256, "Context length in tokens.")
    dropout: float = knob(0.0, "Dropout probability in attention, MLP and embeddings.")
    bias: bool = knob(False, "Biases in the linear and layer-norm layers.")
    positions: Literal["learned", "rope"] = knob("learned", "Position encoding: learned embeddings or rotary (RoPE).")
    rope_theta: float = knob(10000.0, "Base of the rotary frequencies.")
    vocab_multiple: int = knob(64, "Pad the model's vocabulary up to a multiple of this (faster matmuls on GPU).")
    batch_size: int = knob(16, "Sequences per micro-batch per process.")
    grad_accum: int = training_knob("grad_accum", 1)
    loss_chunk: int = knob(
        1024,
        "Training tokens per chunk of the fused LM head and cross-entropy, which never holds the (tokens x "
        "vocabulary) logits in full (0: make all the logits, then the loss).",
    )
    max_steps: int = knob(1000, "Optimizer steps.")
    lr: float = training_knob("lr", 1e-3)
    min_lr: float = training_knob("min_lr", 1e-4)
    warmup_steps: int = training_knob("warmup_steps", 50)
    weight_decay: float = training_knob("weight_decay", 0.1)
    beta1: float = training_knob("beta1", 0.9)
    beta2: float = training_knob("beta2", 0.95)
    grad_clip: float = training_knob("grad_clip", 1.0)
    eval_every: int = knob(100, "Evaluate val loss and sample generations every this many steps (0: only at the end).")
    eval_iters: int = knob(20, "Val batches per periodic evaluation (the final one also scores val and test in full).")
    sample_prompts: tuple[str, ...] = knob(
        ("Return the", "The module", "This function"), "Prompts completed at each evaluation and logged as text."
    )
    sample_tokens: int = knob(48, "New tokens per sample generation.")
    temperature: float = knob(0.8, "Sampling temperature of the sample generations (0: greedy).")
    top_k: int = knob(50, "Sample only among the k most likely tokens (0: no limit).")
    save_every: int = knob(250, "Write a checkpoint every this many steps (and always at the end).")
    keep_last: int = training_knob("keep_last", 2)
    log_every: int = knob(10, "Print the progress line every this many steps.")
    device: Literal["auto", "cpu", "cuda"] = training_knob("device", "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = training_knob("dtype", "auto")
    compile: bool = knob(False, "Compile the model with torch.compile.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = knob(
        "default", "torch.compile mode when compile is on."
    )
    seed: int = knob(1337, "Seed of initialisation, data order and sampling.")
    deterministic: bool = training_knob("deterministic", True)
    threads: int = training_knob("threads", 0)
    peak_tflops: float = training_knob("peak_tflops", 0.0)
    export_hf: bool = knob(True, "Also write a Hugging Face transformers folder of the final model.")

    def __post_init__(self) -> None:
        if self.n_layer < 1 or self.n_head < 1 or self.n_embd % self.n_head:
            raise ConfigError("pretrain.n_layer and pretrain.n_head must be >= 1, and n_embd a multiple of n_head")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("pretrain.positions=rope needs an even head size (n_embd / n_head)")
        if self.block_size < 2 or self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("pretrain.block_size must be >= 2; batch_size and max_steps >= 1")
        if not 0 <= self.dropout < 1 or self.vocab_multiple < 1:
            raise ConfigError("pretrain.dropout must be in [0, 1) and pretrain.vocab_multiple >= 1")
        check_training(self, "pretrain")
        if min(self.eval_every, self.eval_iters, self.top_k, self.loss_chunk) < 0:
            raise ConfigError("pretrain.eval_every, eval_iters, top_k and loss_chunk must be >= 0")
        if self.temperature < 0 or not 0 < self.sample_tokens < self.block_size:
            raise ConfigError("pretrain.temperature must be >= 0 and 0 < sample_tokens < block_size")


@dataclass(frozen=True)
class SftConfig:
    """Instruction tuning (SFT) of the pretrained GPT: instruction data, optimisation, early stopping, evaluation."""

    sources: tuple[str, ...] = knob(
        (), "Instruction files (JSONL or Parquet: Alpaca, prompt/response or messages records) to train on."
    )
    builtin: bool = knob(True, "Use the instructions derived from the built-in corpus's documented stdlib objects.")
    phrasings: int = knob(3, "Questions per stdlib object in the built-in set (0: every phrasing).")
    max_response_chars: int = knob(
        300, "Longest built-in answer in characters (a longer first paragraph falls back to its first sentence)."
    )
    batch_size: int = knob(16, "Packed rows of the model's context length per micro-batch per process.")
    grad_accum: int = training_knob("grad_accum", 1)
    loss_chunk: int = knob(
        1024,
        "Training tokens per chunk of the fused LM head and cross-entropy, which never holds the (tokens x "
        "vocabulary) logits in full and, outside torch.compile, runs the head over the response tokens only "
        "(0: make all the logits, then the loss).",
    )
    max_steps: int = knob(300, "Optimizer steps (fewer if early stopping ends training).")
    lr: float = training_knob("lr", 3e-4)
    min_lr: float = training_knob("min_lr", 3e-5)
    warmup_steps: int = training_knob("warmup_steps", 20)
    weight_decay: float = training_knob("weight_decay", 0.1)
    beta1: float = training_knob("beta1", 0.9)
    beta2: float = training_knob("beta2", 0.95)
    grad_clip: float = training_knob("grad_clip", 1.0)
    eval_every: int = knob(50, "Evaluate the val response loss every this many steps (0: only at the start and end).")
    eval_examples: int = knob(256, "Val instructions scored by each periodic evaluation (0: all of them).")
    patience: int = knob(3, "Stop after this many evaluations without a better val response loss (0: never early).")
    min_delta: float = knob(0.0, "Decrease of the val response loss that counts as better.")
    heldout_prompts: int = knob(128, "Test prompts answered greedily by the pretrained and the SFT model, then scored.")
    max_new_tokens: int = knob(64, "Longest generated answer in tokens.")
    sample_rows: int = knob(16, "Held-out prompts in the logged table of both models' answers.")
    save_every: int = knob(100, "Write a checkpoint every this many steps (and always at the end).")
    keep_last: int = training_knob("keep_last", 2)
    log_every: int = knob(10, "Print the progress line every this many steps.")
    device: Literal["auto", "cpu", "cuda"] = training_knob("device", "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = training_knob("dtype", "auto")
    compile: bool = knob(False, "Compile the model with torch.compile.")
    seed: int = knob(1337, "Seed of the data order.")
    deterministic: bool = training_knob("deterministic", True)
    threads: int = training_knob("threads", 0)
    peak_tflops: float = training_knob("peak_tflops", 0.0)

    def __post_init__(self) -> None:
        if self.phrasings < 0 or self.max_response_chars < 1:
            raise ConfigError("sft.phrasings must be >= 0 and sft.max_response_chars >= 1")
        if self.batch_size < 1 or self.max_steps < 1 or self.max_new_tokens < 1:
            raise ConfigError("sft.batch_size, sft.max_steps and sft.max_new_tokens must be >= 1")
        check_training(self, "sft")
        if min(self.eval_every, self.eval_examples, self.patience, self.min_delta, self.heldout_prompts,
               self.sample_rows, self.loss_chunk) < 0:
            raise ConfigError("sft.eval_every, eval_examples, patience, min_delta, heldout_prompts, sample_rows "
                              "and loss_chunk must be >= 0")


@dataclass(frozen=True)
class RewardConfig:
    """Reward modelling: preference pairs, a scalar head on the SFT model, Bradley-Terry training, evaluation."""

    sources: tuple[str, ...] = knob(
        (), "Preference files (JSONL or Parquet: prompt/chosen/rejected, or chosen/rejected dialogues) to train on."
    )
    builtin: bool = knob(True, "Use the built-in pairs derived from the documented stdlib objects.")
    corruptions: tuple[Literal["hard_negative", "truncated", "shuffled"], ...] = knob(
        ("hard_negative", "truncated", "shuffled"),
        "Corrupted negatives of the built-in pairs (one per object, rotating): another object's summary, "
        "the true summary truncated, or its words shuffled; empty: none.",
    )
    ranked_prompts: int = knob(256, "Built-in prompts the SFT model answers K times for ranked pairs (0: none).")
    samples_per_prompt: int = knob(4, "K: sampled answers per ranked prompt (up to K-choose-2 pairs each).")
    sample_temperature: float = knob(1.0, "Sampling temperature of the ranked answers.")
    sample_top_k: int = knob(50, "Sample the ranked answers among the k most likely tokens (0: no limit).")
    max_new_tokens: int = knob(48, "Longest sampled answer in tokens.")
    max_response_chars: int = knob(300, "Longest built-in true summary in characters (as in the SFT set).")
    margin: float = knob(0.0, "Margin m of the loss -log sigmoid(r_chosen - r_rejected - m).")
    batch_size: int = knob(16, "Prompt groups (all their pairs) per micro-batch per process.")
    grad_accum: int = training_knob("grad_accum", 1)
    max_steps: int = knob(300, "Optimizer steps.")
    lr: float = training_knob("lr", 1e-4)
    min_lr: float = training_knob("min_lr", 1e-5)
    warmup_steps: int = training_knob("warmup_steps", 20)
    weight_decay: float = training_knob("weight_decay", 0.1)
    beta1: float = training_knob("beta1", 0.9)
    beta2: float = training_knob("beta2", 0.95)
    grad_clip: float = training_knob("grad_clip", 1.0)
    eval_every: int = knob(50, "Evaluate val pairwise accuracy every this many steps (0: only at the start and end).")
    eval_pairs: int = knob(512, "Val pairs scored by each periodic evaluation (0: all of them).")
    norm_responses: int = knob(2048, "Train responses scored for the reward mean and std that PPO normalises by.")
    calibration_buckets: int = knob(5, "Buckets (quantiles of |r_chosen - r_rejected|) of the calibration table.")
    min_accuracy: float = knob(0.6, "Held-out pairwise accuracy below which the model is refused to PPO (an error).")
    save_every: int = knob(100, "Write a checkpoint every this many steps (and always at the end).")
    keep_last: int = training_knob("keep_last", 2)
    log_every: int = knob(10, "Print the progress line every this many steps.")
    device: Literal["auto", "cpu", "cuda"] = training_knob("device", "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = training_knob("dtype", "auto")
    compile: bool = knob(False, "Compile the model with torch.compile.")
    seed: int = knob(1337, "Seed of the head's initialisation, the data order, the corruptions and the samples.")
    deterministic: bool = training_knob("deterministic", True)
    threads: int = training_knob("threads", 0)
    peak_tflops: float = training_knob("peak_tflops", 0.0)

    def __post_init__(self) -> None:
        if self.ranked_prompts < 0 or self.samples_per_prompt < 2 or self.max_new_tokens < 1:
            raise ConfigError("reward.ranked_prompts must be >= 0, samples_per_prompt >= 2 and max_new_tokens >= 1")
        if self.sample_temperature <= 0 or self.sample_top_k < 0 or self.max_response_chars < 1 or self.margin < 0:
            raise ConfigError("reward: sample_temperature > 0, sample_top_k >= 0, max_response_chars >= 1, margin >= 0")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("reward.batch_size and reward.max_steps must be >= 1")
        check_training(self, "reward")
        if min(self.eval_every, self.eval_pairs, self.norm_responses) < 0:
            raise ConfigError("reward.eval_every, eval_pairs and norm_responses must be >= 0")
        if self.calibration_buckets < 1 or not 0 <= self.min_accuracy <= 1:
            raise ConfigError("reward.calibration_buckets must be >= 1 and min_accuracy in [0, 1]")


@dataclass(frozen=True)
class PpoConfig:
    """RLHF with PPO: policy from SFT, frozen reference and reward model, KL-penalised rewards, GAE, clipped updates."""

    iterations: int = knob(200, "PPO iterations: each samples one rollout batch, then updates on it.")
    batch_size: int = knob(64, "Train prompts answered per rollout batch per process.")
    mini_batch_size: int = knob(16, "Rollouts per optimizer step (minibatch) within an update epoch, per process.")
    micro_batch_size: int = knob(16, "Rollouts per forward/backward pass (gradients accumulate over a minibatch).")
    ppo_epochs: int = knob(4, "Passes over each rollout batch.")
    max_new_tokens: int = knob(64, "Longest sampled response in tokens (a row stops at its end token).")
    temperature: float = knob(1.0, "Sampling temperature of the rollouts (log-probs use the same temperature).")
    top_k: int = knob(0, "Sample rollouts among the k most likely tokens (0: the policy's full distribution).")
    value_model: Literal["reward", "policy"] = knob(
        "reward", "Value function: its own transformer initialised from the reward model, or a head on the policy."
    )
    kl_estimator: Literal["k1", "k3"] = knob(
        "k1", "Per-token KL penalty: k1 = log π - log π_ref, or k3 = (r - 1) - log r, r = π_ref / π (never negative)."
    )
    init_kl_coef: float = knob(0.05, "Initial (or fixed) KL coefficient β.")
    target_kl: float = knob(6.0, "KL per response (nats) the adaptive controller steers towards (0: β stays fixed).")
    kl_horizon: float = knob(10000.0, "Horizon of the adaptive KL controller, in rollouts.")
    kl_k_beta: float = knob(1.0, "Gain K_β of the adaptive KL controller.")
    missing_eot_penalty: float = knob(0.0, "Added to the normalised score of a response that never ends (0: none).")
    score_clip: float = knob(0.0, "Clip normalised scores to [-score_clip, score_clip] (0: no clipping).")
    gamma: float = knob(1.0, "Discount γ of GAE.")
    lam: float = knob(0.95, "λ of GAE.")
    clip_range: float = knob(0.2, "PPO ratio clip ε.")
    value_clip: float = knob(0.2, "Clip of the value update around the rollout's values.")
    vf_coef: float = knob(0.1, "Weight of the value loss.")
    entropy_coef: float = knob(0.0, "Weight of the entropy bonus (0: none).")
    lr: float = training_knob("lr", 1e-5)
    min_lr: float = training_knob("min_lr", 1e-5)
    warmup_steps: int = training_knob("warmup_steps", 0)
    weight_decay: float = training_knob("weight_decay", 0.0)
    beta1: float = training_knob("beta1", 0.9)
    beta2: float = training_knob("beta2", 0.95)
    grad_clip: float = training_knob("grad_clip", 1.0)
    heldout_prompts: int = knob(128, "Test prompts answered greedily by the SFT and the PPO model, then scored.")
    sample_rows: int = knob(16, "Held-out prompts in the logged table of both models' answers.")
    save_every: int = knob(25, "Write a checkpoint every this many iterations (and always at the end).")
    keep_last: int = training_knob("keep_last", 2)
    log_every: int = knob(1, "Print the progress line every this many iterations.")
    device: Literal["auto", "cpu", "cuda"] = training_knob("device", "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = training_knob("dtype", "auto")
    loss_chunk: int = knob(
        1024,
        "Response tokens per chunk of the fused LM head that makes the log-probs and entropies (rollouts and "
        "updates), which never holds the (tokens x vocabulary) logits in full and, outside torch.compile, skips "
        "the padding after each response (0: make all the logits).",
    )
    compile: bool = knob(False, "Compile the actor-critic with torch.compile (updates only).")
    seed: int = knob(1337, "Seed of the prompt order, the rollouts and the minibatch order.")
    deterministic: bool = training_knob("deterministic", True)
    threads: int = training_knob("threads", 0)

    def __post_init__(self) -> None:
        if min(self.iterations, self.batch_size, self.mini_batch_size, self.micro_batch_size, self.ppo_epochs,
               self.max_new_tokens) < 1:
            raise ConfigError("ppo.iterations, batch_size, mini_batch_size, micro_batch_size, ppo_epochs and "
                              "max_new_tokens must be >= 1")
        if self.mini_batch_size > self.batch_size or self.micro_batch_size > self.mini_batch_size:
            raise ConfigError("ppo needs micro_batch_size <= mini_batch_size <= batch_size")
        if self.temperature <= 0 or self.top_k < 0:
            raise ConfigError("ppo.temperature must be > 0 (log-probs divide by it) and ppo.top_k >= 0")
        if self.init_kl_coef < 0 or self.target_kl < 0 or self.kl_horizon <= 0 or self.kl_k_beta < 0:
            raise ConfigError("ppo: init_kl_coef >= 0, target_kl >= 0, kl_horizon > 0 and kl_k_beta >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1) or self.clip_range <= 0 or self.value_clip <= 0:
            raise ConfigError("ppo: gamma and lam in [0, 1], clip_range > 0 and value_clip > 0")
        if min(self.vf_coef, self.entropy_coef, self.score_clip) < 0:
            raise ConfigError("ppo: vf_coef, entropy_coef and score_clip must be >= 0")
        check_training(self, "ppo")
        if min(self.heldout_prompts, self.sample_rows, self.loss_chunk) < 0:
            raise ConfigError("ppo.heldout_prompts, sample_rows and loss_chunk must be >= 0")


@dataclass(frozen=True)
class ReportConfig:
    """The evolution report: every generation on one held-out yardstick, side by side."""

    prompts: tuple[str, ...] = knob(
        ("The", "Return the", "If the"), "Prompts that every generation continues, shown side by side."
    )
    continuation_tokens: int = knob(30, "Tokens per continuation (words for word models, BPE tokens for the GPTs).")
    temperature: float = knob(0.8, "Sampling temperature of the continuations (0: greedy).")
    top_k: int = knob(50, "Sample continuations among the k likeliest tokens (0: no limit).")
    seed: int = knob(0, "Seed of the continuations.")
    max_test_tokens: int = knob(
        0, "Score at most the first test documents within this many BPE tokens (0: the whole test split)."
    )
    batch_size: int = knob(8, "Windows per forward pass when scoring the GPT models on the test split.")
    contamination_n: int = knob(13, "Word n-gram size of the test-set contamination check.")
    examples_per_stage: int = knob(3, "Contaminated test passages shown per stage.")
    device: Literal["auto", "cpu", "cuda"] = knob(
        "auto", "Device for scoring and sampling; auto picks CUDA when available."
    )

    def __post_init__(self) -> None:
        if self.continuation_tokens < 1 or self.batch_size < 1 or self.contamination_n < 1:
            raise ConfigError("report.continuation_tokens, batch_size and contamination_n must be >= 1")
        if self.temperature < 0 or min(self.top_k, self.max_test_tokens, self.examples_per_stage) < 0:
            raise ConfigError("report.temperature, top_k, max_test_tokens and examples_per_stage must be >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: one section per stage plus tracking."""

    tracking: TrackingConfig = knob(TrackingConfig(), "Experiment tracking (MLflow).")
    ingest: IngestConfig = knob(IngestConfig(), "Corpus ingestion.")
    ngram: NgramConfig = knob(NgramConfig(), "Statistical n-gram language models.")
    embeddings: EmbeddingsConfig = knob(EmbeddingsConfig(), "Neural word-level models and word vectors.")
    tokenizer: TokenizerConfig = knob(TokenizerConfig(), "BPE tokenizer and token shards.")
    pretrain: PretrainConfig = knob(PretrainConfig(), "GPT pretraining.")
    sft: SftConfig = knob(SftConfig(), "Instruction tuning (SFT) of the pretrained GPT.")
    reward: RewardConfig = knob(RewardConfig(), "Reward modelling on preference pairs.")
    ppo: PpoConfig = knob(PpoConfig(), "RLHF of the SFT model against the reward model with PPO.")
    report: ReportConfig = knob(ReportConfig(), "The evolution report: every generation on one yardstick.")


# ----------------------------------------------------------------------------------------------
# building configs from plain data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", str(tp))


_SCALARS = {  # YAML gives bools for true/false; a bool is an int in Python but never a valid int knob
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples; raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    accepts = _SCALARS.get(tp)
    if accepts is not None and accepts(value):
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass, suitable for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for a config dataclass (lists JSON-encoded), e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            flat.update(flatten(getattr(cfg, k), key))
        else:
            flat[key] = json.dumps(v) if isinstance(v, list) else v
    return flat


def fingerprint_data(cfg: Any) -> str:
    """Canonical JSON of a config section, the part of a cache key that the section contributes."""
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# presets, files and overrides


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"section.key=value"`` (value parsed as YAML) → nested dict."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    nested: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    return nested


def load_config(
    preset: str | None = "tiny", files: Iterable[str | Path] = (), overrides: Iterable[str] = ()
) -> PipelineConfig:
    """Preset, then YAML files in order, then ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if preset:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        data = _read_yaml(path)
    for f in files:
        data = _merge(data, _read_yaml(Path(f)))
    for o in overrides:
        data = _merge(data, parse_override(o))
    return from_dict(PipelineConfig, data)


def save_config(cfg: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# reference documentation


def reference_markdown(cls: type = PipelineConfig) -> str:
    """The configuration reference as Markdown: one table per section, generated from the field docs."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        lines += [f"### `{f.name}`: {f.metadata['doc']}", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        sec_hints = typing.get_type_hints(section)
        for sf in dataclasses.fields(section):
            default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()  # type: ignore[misc]
            shown = json.dumps(list(default) if isinstance(default, tuple) else default, ensure_ascii=False)
            tp = _type_name(sec_hints[sf.name]).replace("|", "\\|")
            lines.append(f"| `{sf.name}` | {tp} | `{shown}` | {sf.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)
