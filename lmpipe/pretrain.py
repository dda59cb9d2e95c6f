"""The ``pretrain`` stage: train the GPT of :mod:`lmpipe.gpt` on the token shards.

Batches are windows at random offsets of the train split, drawn from a seed that depends only on the
run's seed and the step, so a step's data is the same whether the run was interrupted or not, and
``batch_size × grad_accum × processes`` stays one global batch however it is split. Evaluation:
val loss and perplexity every ``eval_every`` steps, sample generations from fixed prompts, and at the
end bits per byte on val and test (the total nats of predicting every token of the split, each
document's end-of-text included, over ln 2 and the split's UTF-8 bytes: comparable across tokenizers
and with the n-gram and NNLM stages).

Several processes: ``torchrun --nproc_per_node N -m lmpipe.pretrain --workspace W --out DIR`` (the shards and
tokenizer of the workspace's last tokenizer result, or ``--shards DIR --tokenizer FILE``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer

from lmpipe import shards
from lmpipe.checkpoint import load_model_folder, read_model_config, save_model_folder
from lmpipe.config import PretrainConfig
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.scoring import TextScore, make_score
from lmpipe.stage import Logger, NullLogger, StageContext, StageOutput, StageResult
from lmpipe.trainer import Dist, Objective, Trainer, TrainSettings, distributed
from lmpipe.workspace import Workspace, atomic_write_text

MODEL_DIR = "model"
TOKENIZER_FILE = "tokenizer.json"


def model_config(cfg: PretrainConfig, vocab_size: int) -> GPTConfig:
    """The GPT shape of ``cfg`` for a tokenizer of ``vocab_size`` ids, padded to ``vocab_multiple``."""
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    return GPTConfig(vocab_size=padded, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, positions=cfg.positions,
                     rope_theta=cfg.rope_theta)


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 32-bit seed for the batch of ``step``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# evaluation helpers (also used by later stages to score a model on the corpus)


@torch.no_grad()
def split_nats(model: GPT, tokens: np.ndarray, batch_size: int, max_batches: int | None = None,
               device: torch.device | None = None) -> tuple[float, int]:
    """Total cross-entropy (nats) and target count of predicting ``tokens`` in consecutive windows."""
    device = device or model.wte.weight.device
    total, count = 0.0, 0
    for i, (x, y) in enumerate(shards.eval_batches(tokens, batch_size, model.config.block_size)):
        if max_batches is not None and i >= max_batches:
            break
        nll = model.target_nll(x.to(device), y.to(device), ignore_index=shards.IGNORE_INDEX, reduction="sum")
        total += float(nll)
        count += int((y != shards.IGNORE_INDEX).sum())
    return total, count


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Tokenizer-independent cross-entropy: nats / ln 2 / UTF-8 bytes."""
    return nats / math.log(2) / n_bytes if n_bytes else float("nan")


def sample_texts(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int,
                 temperature: float, top_k: int, seed: int, eot_id: int = 0, top_p: float | None = None) -> list[str]:
    """Completions of ``prompts`` (each read as the start of a document), sampled with a private generator."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)  # leaves the global RNG (training's) untouched
    ids = [[eot_id, *tokenizer.encode(p, add_special_tokens=False).ids] for p in prompts]
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                         eot_id=eot_id, generator=generator)
    return [p + tokenizer.decode(new) for p, new in zip(prompts, out.as_lists(), strict=True)]


# ----------------------------------------------------------------------------------------------
# the objective


class NextTokenObjective(Objective):
    """Next-token prediction on random windows of the train split; evaluation on val (and test at the end)."""

    def __init__(self, cfg: PretrainConfig, shard_dir: Path, tokenizer: Tokenizer, dist: Dist,
                 log: Logger) -> None:
        self.cfg, self.dist, self.tokenizer, self.log = cfg, dist, tokenizer, log
        self.meta = shards.read_meta(shard_dir)
        self.splits = {s: shards.load_split(shard_dir, s) for s in ("train", "val", "test") if s in self.meta["splits"]}
        self.samples: list[tuple[int, list[str]]] = []

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, d = self.cfg, self.dist
        x, y = shards.random_batch(self.splits["train"], cfg.batch_size * cfg.grad_accum * d.world_size,
                                   cfg.block_size, step_seed(cfg.seed, step))
        rows = slice(d.rank * cfg.grad_accum * cfg.batch_size, (d.rank + 1) * cfg.grad_accum * cfg.batch_size)
        pin = d.device.type == "cuda"
        x, y = (t[rows].pin_memory() if pin else t[rows] for t in (x, y))
        return [(x[i : i + cfg.batch_size].to(d.device, non_blocking=pin),
                 y[i : i + cfg.batch_size].to(d.device, non_blocking=pin))
                for i in range(0, len(x), cfg.batch_size)]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        _, loss = model(x, y, loss_chunk=self.cfg.loss_chunk)
        return loss, x.numel()

    def evaluate(self, model: GPT, step: int, last: bool) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        for split in ("val", "test") if last else ("val",):
            if not len(self.splits.get(split, ())):
                continue
            nats, n = split_nats(model, self.splits[split], cfg.batch_size, None if last else cfg.eval_iters)
            if n:
                metrics[f"{split}_loss"] = nats / n
                metrics[f"{split}_ppl"] = math.exp(min(nats / n, 700.0))
            if last:
                metrics[f"{split}_bpb"] = bits_per_byte(nats, self.meta["splits"][split]["bytes"])
        if cfg.sample_prompts:
            texts = sample_texts(model, self.tokenizer, cfg.sample_prompts, cfg.sample_tokens, cfg.temperature,
                                 cfg.top_k, cfg.seed, self.meta.get("eot_id", 0))
            self.samples.append((step, texts))
            self.log.text(samples_markdown(step, texts), f"samples/step_{step:06d}.md")
        return metrics


    def state_dict(self) -> dict[str, Any]:
        # the data position is the step itself (see step_seed); the samples so far make samples.md whole on resume
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = [(int(step), list(texts)) for step, texts in state.get("samples", [])]


def samples_markdown(step: int, texts: list[str]) -> str:
    return f"# Samples at step {step}\n\n" + "\n\n".join(f"```\n{t}\n```" for t in texts) + "\n"


# ----------------------------------------------------------------------------------------------
# entry points


@dataclass(frozen=True)
class PretrainResult:
    model_dir: Path
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)
    samples: str = ""


def pretrain(cfg: PretrainConfig, shard_dir: Path, tokenizer_path: Path, out_dir: Path, log: Logger | None = None,
             progress: bool = True, dist: Dist | None = None) -> PretrainResult:
    """Train (or resume training) to ``cfg.max_steps``; write the model folder under ``out_dir``."""
    log = log or NullLogger()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = shards.read_meta(shard_dir)
    if meta["splits"]["train"]["tokens"] <= cfg.block_size:
        raise ValueError(f"the train split has {meta['splits']['train']['tokens']} tokens, "
                         f"fewer than pretrain.block_size + 1 = {cfg.block_size + 1}")
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, meta["vocab_size"]))
    settings = TrainSettings.from_section(cfg)
    trainer = Trainer(model, settings, out_dir, log, dist, progress)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    objective = NextTokenObjective(cfg, Path(shard_dir), tokenizer, trainer.dist, trainer.log)
    metrics = trainer.fit(objective)
    tokens = float(settings.max_steps * cfg.batch_size * cfg.grad_accum * trainer.dist.world_size * cfg.block_size)
    metrics = {**metrics, "params": float(model.num_params()), "tokens_trained": tokens, "tokens_processed": tokens}
    model_dir = Path(out_dir) / MODEL_DIR
    samples = "\n".join(samples_markdown(s, t) for s, t in objective.samples)
    if trainer.dist.is_main:
        extra = {"tokenizer_vocab_size": meta["vocab_size"], "eot_id": meta.get("eot_id", 0),
                 "pad_id": meta.get("pad_id", 1), "trained_steps": settings.max_steps}
        save_model_folder(model, model_dir, extra)
        shutil.copyfile(tokenizer_path, model_dir / TOKENIZER_FILE)
    trainer.dist.barrier()
    return PretrainResult(model_dir, metrics, trainer.losses, samples)


def load_lm(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A trained model folder's GPT (eval mode), its tokenizer and its extra metadata (eot_id, ...)."""
    _, extra = read_model_config(model_dir)
    return load_model_folder(model_dir, device), Tokenizer.from_file(str(Path(model_dir) / TOKENIZER_FILE)), extra


def score_texts(model: GPT, tokenizer: Tokenizer, texts: list[str] | tuple[str, ...], batch_size: int = 8,
                eot_id: int = 0) -> tuple[float, int]:
    """Total nats and predicted tokens of ``texts``, each read as a document ending in end-of-text."""
    enc = shards.document_encoder(tokenizer)  # special-token strings inside a text stay plain text
    ids = [i for e in enc.encode_batch(list(texts), add_special_tokens=False) for i in [*e.ids, eot_id]]
    if not ids:
        return 0.0, 0
    return split_nats(model, np.asarray(ids, dtype=np.int64), batch_size)


def score_stage(ws: Workspace, result: StageResult, texts: Sequence[str], options: Mapping[str, Any]) -> TextScore:
    """The ``lmpipe score --stage pretrain`` scorer: bits per byte of ``texts`` under the trained GPT."""
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, extra = load_lm(ws.abs(result.outputs["model"]), device)
    nats, tokens = score_texts(model, tokenizer, list(texts), int(options.get("batch_size", 8)), extra.get("eot_id", 0))
    bits = nats / math.log(2)
    c = model.config
    return make_score(f"gpt {c.n_layer}x{c.n_embd} ({model.num_params() / 1e6:.1f}M params)", list(texts), tokens,
                      0, bits, bits)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``pretrain`` stage: resume from ``ctx.out_dir``'s latest checkpoint if any, train, export."""
    cfg: PretrainConfig = ctx.section("pretrain")
    ws, produced = ctx.workspace, ctx.inputs["tokenizer"].outputs
    result = pretrain(cfg, ws.abs(produced["shards"]), ws.abs(produced["tokenizer"]), ctx.out_dir, ctx.log,
                      ctx.progress)
    outputs = {"model": ws.rel(result.model_dir), "tokenizer": ws.rel(result.model_dir / TOKENIZER_FILE)}
    summary_path = ctx.out_dir / "metrics.json"
    atomic_write_text(summary_path, json.dumps({"metrics": result.metrics, "losses": result.losses}, indent=2))
    ctx.log.artifact(summary_path)
    if result.samples:
        samples_path = ctx.out_dir / "samples.md"
        atomic_write_text(samples_path, result.samples)
        outputs["samples"] = ws.rel(samples_path)
    if cfg.export_hf:
        from lmpipe.hf_export import export_hf

        outputs["hf"] = ws.rel(export_hf(result.model_dir, ctx.out_dir / "hf"))
    ctx.log.metrics(result.metrics)
    m = result.metrics
    summary = (f"{m['params'] / 1e6:.1f}M params, val loss {m.get('val_loss', float('nan')):.3f}, "
               f"val {m.get('val_bpb', float('nan')):.3f} / test {m.get('test_bpb', float('nan')):.3f} bits per byte")
    return StageOutput(file_sha256(result.model_dir / "model.safetensors")[:32], outputs, m, summary)


def main(argv: list[str] | None = None) -> None:
    """Pretrain outside the pipeline, e.g. under torchrun on several GPUs (see lmpipe.launch)."""
    from lmpipe import launch

    p = launch.parser("python -m lmpipe.pretrain", main.__doc__)
    p.add_argument("--shards", help="Shard folder (train.bin, val.bin, test.bin, meta.json); default: the "
                                    "workspace's last tokenizer result.")
    p.add_argument("--tokenizer", help="tokenizer.json of the shards (default: the workspace's, as --shards).")
    args = p.parse_args(argv)
    cfg = launch.config(args).pretrain
    ws = Workspace.resolve(args.workspace) if not (args.shards and args.tokenizer) else None
    shard_dir = Path(args.shards) if args.shards else launch.stage_output(ws, None, "tokenizer", "shards", "--shards")
    tokenizer = Path(args.tokenizer) if args.tokenizer else launch.stage_output(ws, None, "tokenizer", "tokenizer",
                                                                                "--tokenizer")
    with distributed(cfg.device) as dist:
        result = pretrain(cfg, shard_dir, tokenizer, Path(args.out), dist=dist)
        if dist.is_main:
            metrics = {"metrics": result.metrics, "losses": result.losses}
            atomic_write_text(Path(args.out) / "metrics.json", json.dumps(metrics, indent=2))
            if result.samples:
                atomic_write_text(Path(args.out) / "samples.md", result.samples)
        launch.report(dist, result.metrics)


if __name__ == "__main__":
    main()
