"""The ``sft`` stage: instruction tuning of the pretrained GPT, the first step of InstructGPT (Ouyang et al.
2022, "Training language models to follow instructions with human feedback", arXiv:2203.02155).

Data: the warehouse's ``instructions`` (:mod:`lmpipe.instructions`) rendered by the one chat template
(:mod:`lmpipe.chat`). Training starts from the pretrain stage's model and runs the shared loop of
:mod:`lmpipe.trainer` (optimizer, schedule, checkpoints, exact resume, progress line). The loss covers
the assistant's tokens only. Examples are packed into rows of the model's context length; attention is
block-diagonal and positions restart at 0 for each example, so every example is computed exactly as
if it were alone in its row. The val response loss is evaluated every ``eval_every`` steps; the best
model so far is kept, and training stops after ``patience`` evaluations without improvement.

Evaluation of the best model, beside the pretrained model given the same prompts: response loss and
perplexity on the val and test instructions; greedy answers to held-out (test) prompts scored against
the reference by token F1 and ROUGE-L (:mod:`lmpipe.grounded`); a table of both models' answers; bits
per byte on the corpus test split, computed as the pretrain stage computes it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmpipe import bootstrap, grounded, instructions, shards
from lmpipe.bpe import END_ID, PAD_ID
from lmpipe.chat import TEMPLATE_NAME, ChatTemplate, Message, Rendered
from lmpipe.checkpoint import latest_checkpoint, load_model_folder, read_model_config, save_model_folder
from lmpipe.config import IngestConfig, PipelineConfig, SftConfig
from lmpipe.gpt import GPT
from lmpipe.pretrain import TOKENIZER_FILE, bits_per_byte, file_sha256, load_lm, split_nats, step_seed
from lmpipe.stage import Logger, NullLogger, StageContext, StageOutput
from lmpipe.trainer import Dist, Objective, Trainer, TrainSettings, resolve_device
from lmpipe.workspace import Workspace, atomic_write_text

MODEL_DIR = "model"
BEST_DIR = "best"
IGNORE_INDEX = shards.IGNORE_INDEX

Example = tuple[np.ndarray, np.ndarray]  # (inputs, targets) of one rendered conversation


# ----------------------------------------------------------------------------------------------
# examples, packing and batches


def to_example(rendered: Rendered, block_size: int) -> Example:
    """Inputs ``ids[:-1]`` and next-token targets, ignored where the target is not the assistant's.

    A conversation longer than ``block_size + 1`` tokens keeps its first ``block_size + 1``.
    """
    ids = np.asarray(rendered.ids[: block_size + 1], dtype=np.int64)
    mask = np.asarray(rendered.mask[: block_size + 1], dtype=bool)
    return ids[:-1], np.where(mask[1:], ids[1:], IGNORE_INDEX)


def pack_rows(lengths: Sequence[int], order: Sequence[int], block_size: int) -> list[list[int]]:
    """Greedy packing: examples in ``order`` fill a row until the next one does not fit, then start the next."""
    rows: list[list[int]] = []
    used = block_size  # forces a new row for the first example
    for i in order:
        if used + lengths[i] > block_size:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += lengths[i]
    return rows


@dataclass(frozen=True)
class PackedBatch:
    """Packed rows: ``x``, ``y`` and ``positions`` (B, T); ``segments`` (B, T) numbers the examples of a row
    from 0, padding is -1."""

    x: torch.Tensor
    y: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.x, self.y, self.positions, self.segments)))

    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool: a query sees earlier keys of its own example only (padding sees padding)."""
        T = self.x.size(1)
        same = self.segments[:, :, None] == self.segments[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.x.device).tril()
        return (same & causal)[:, None]


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], block_size: int) -> PackedBatch:
    """Lay out the examples of each row side by side, padding the rest of the row."""
    B = len(rows)
    x = np.full((B, block_size), PAD_ID, dtype=np.int64)
    y = np.full((B, block_size), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((B, block_size), dtype=np.int64)
    segments = np.full((B, block_size), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            ex_x, ex_y = examples[i]
            n = len(ex_x)
            x[b, t : t + n], y[b, t : t + n] = ex_x, ex_y
            positions[b, t : t + n] = np.arange(n)
            segments[b, t : t + n] = k
            t += n
    return PackedBatch(*(torch.from_numpy(a) for a in (x, y, positions, segments)))


class RowStream:
    """The train examples packed into rows, epoch after epoch, each epoch in its own shuffled order.

    Row ``r`` of the stream is a pure function of the seed and the examples, so a step's data is the
    same whether or not training was interrupted before it.
    """

    def __init__(self, lengths: Sequence[int], block_size: int, seed: int) -> None:
        if not lengths:
            raise ValueError("no train instructions to fine-tune on")
        self.lengths, self.block_size, self.seed = list(lengths), block_size, seed
        self.epochs: list[list[list[int]]] = []
        self.starts = [0]  # index in the stream of each epoch's first row, then the end of the last

    def _add_epoch(self) -> None:
        rng = np.random.default_rng(step_seed(self.seed, len(self.epochs)))
        self.epochs.append(pack_rows(self.lengths, rng.permutation(len(self.lengths)), self.block_size))
        self.starts.append(self.starts[-1] + len(self.epochs[-1]))

    def rows(self, start: int, count: int) -> list[list[int]]:
        """Rows ``start .. start + count - 1`` of the stream."""
        while self.starts[-1] < start + count:
            self._add_epoch()
        out = []
        for r in range(start, start + count):
            epoch = int(np.searchsorted(self.starts, r, side="right")) - 1
            out.append(self.epochs[epoch][r - self.starts[epoch]])
        return out


@torch.no_grad()
def response_nats(model: GPT, examples: Sequence[Example], batch_size: int) -> tuple[float, int]:
    """Total cross-entropy (nats) of the assistant's tokens of ``examples`` and how many there are."""
    device = model.wte.weight.device
    block = model.config.block_size
    rows = pack_rows([len(x) for x, _ in examples], range(len(examples)), block)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(examples, rows[i : i + batch_size], block).to(device)
        nll = model.target_nll(batch.x, batch.y, positions=batch.positions, attn_mask=batch.attention_mask(),
                               ignore_index=IGNORE_INDEX, reduction="sum", skip_ignored=True)
        total += float(nll)
        count += int((batch.y != IGNORE_INDEX).sum())
    return total, count


def response_metrics(prefix: str, nats: float, count: int) -> dict[str, float]:
    if not count:
        return {}
    return {f"{prefix}_loss": nats / count, f"{prefix}_ppl": math.exp(min(nats / count, 700.0))}


# ----------------------------------------------------------------------------------------------
# the objective


class InstructionObjective(Objective):
    """Response-token cross-entropy on packed train rows; val response loss with early stopping."""

    def __init__(self, cfg: SftConfig, train: Sequence[Example], val: Sequence[Example], block_size: int,
                 dist: Dist, best_dir: Path) -> None:
        self.cfg, self.train, self.dist, self.block_size, self.best_dir = cfg, train, dist, block_size, best_dir
        self.val = list(val[: cfg.eval_examples] if cfg.eval_examples else val)
        self.stream = RowStream([len(x) for x, _ in train], block_size, cfg.seed)
        self.best_loss, self.best_step, self.evals_since_best = math.inf, -1, 0
        self._last: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest evaluation

    def batches(self, step: int) -> list[PackedBatch]:
        cfg, d = self.cfg, self.dist
        per_rank = cfg.batch_size * cfg.grad_accum
        rows = self.stream.rows((step * d.world_size + d.rank) * per_rank, per_rank)
        return [collate(self.train, rows[i : i + cfg.batch_size], self.block_size).to(d.device)
                for i in range(0, per_rank, cfg.batch_size)]

    def loss(self, model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        _, loss = model(batch.x, batch.y, positions=batch.positions, attn_mask=batch.attention_mask(),
                        ignore_index=IGNORE_INDEX, loss_chunk=self.cfg.loss_chunk, skip_ignored=True)
        return loss, batch.x.numel()

    def evaluate(self, model: GPT, step: int, last: bool) -> dict[str, float]:
        if self._last is not None and self._last[0] == step:  # the final call at an early-stopping step
            return self._last[1]
        metrics = response_metrics("val_response", *response_nats(model, self.val, self.cfg.batch_size))
        loss = metrics.get("val_response_loss")
        if loss is not None:
            if loss < self.best_loss - self.cfg.min_delta:
                self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
                save_model_folder(model, self.best_dir, {"step": step, "val_response_loss": loss})
            else:
                self.evals_since_best += 1
            metrics["best_val_response_loss"] = self.best_loss
        self._last = (step, metrics)
        return metrics

    def should_stop(self, metrics: dict[str, float]) -> bool:
        """Early stopping: ``patience`` evaluations in a row without a better val response loss."""
        return self.cfg.patience > 0 and self.evals_since_best >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        best = self.best_loss if math.isfinite(self.best_loss) else None
        return {"best_loss": best, "best_step": self.best_step, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best_loss")
        self.best_loss = math.inf if best is None else float(best)
        self.best_step = int(state.get("best_step", -1))
        self.evals_since_best = int(state.get("evals_since_best", 0))


# ----------------------------------------------------------------------------------------------
# generation and evaluation


@torch.no_grad()
def answer(model: GPT, template: ChatTemplate, prompts: Sequence[Sequence[Message] | str], max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, batch_size: int = 32,
           generator: torch.Generator | None = None) -> list[str]:
    """The model's answers to chat prompts (greedy by default), each cut at its ``<|end|>``."""
    ids = template.render_prompts(prompts)
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    out: list[str] = []
    for i in range(0, len(ids), batch_size):
        gen = model.generate(ids[i : i + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eot_id=END_ID, pad_id=PAD_ID, generator=generator)
        out += [template.decode_answer(row) for row in gen.as_lists(drop_eot=False)]
    return out


def heldout(rows: Sequence[instructions.Instruction], limit: int) -> list[instructions.Instruction]:
    """Up to ``limit`` held-out rows, one per stdlib object (built-in set) or per distinct prompt."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = row.object or row.prompt
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out[:limit]


@dataclass
class Evaluation:
    """Both models side by side: metrics per model, and the held-out answers."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "pretrained" / "sft" -> metrics
    rows: list[dict[str, Any]] = field(default_factory=list)  # prompt, reference, both answers and scores


def evaluate_model(model: GPT, template: ChatTemplate, examples: dict[str, list[Example]],
                   prompts: Sequence[instructions.Instruction], test_split: tuple[np.ndarray, int] | None,
                   cfg: SftConfig) -> tuple[dict[str, float], list[str]]:
    """Response loss per split of ``examples``, greedy answers to ``prompts``, corpus test bits per byte."""
    metrics: dict[str, float] = {}
    for split, exs in examples.items():
        metrics.update(response_metrics(f"{split}_response", *response_nats(model, exs, cfg.batch_size)))
    if test_split is not None:
        nats, _ = split_nats(model, test_split[0], cfg.batch_size)  # as the pretrain stage scores the corpus
        metrics["test_bpb"] = bits_per_byte(nats, test_split[1])
    answers = answer(model, template, [p.messages(with_response=False) for p in prompts], cfg.max_new_tokens)
    return metrics, answers


def corpus_test_split(shard_dir: Path | None) -> tuple[np.ndarray, int] | None:
    """The corpus test split's tokens and UTF-8 bytes (the bits-per-byte denominator), if there is one."""
    meta = shards.read_meta(shard_dir) if shard_dir is not None else {"splits": {}}
    test = meta["splits"].get("test")
    return (shards.load_split(shard_dir, "test"), test["bytes"]) if test and test["tokens"] else None


def compare(models: dict[str, GPT], template: ChatTemplate, examples: dict[str, list[Example]],
            prompts: Sequence[instructions.Instruction], shard_dir: Path | None, cfg: SftConfig) -> Evaluation:
    """Evaluate every model in ``models`` on the same data; each held-out row gets every model's answer."""
    test_split = corpus_test_split(shard_dir)
    ev = Evaluation(rows=[{"prompt": p.prompt, "reference": p.response} for p in prompts])
    for name, model in models.items():
        metrics, answers = evaluate_model(model, template, examples, prompts, test_split, cfg)
        for row, text in zip(ev.rows, answers, strict=True):
            row[name] = text
            row[f"{name}_token_f1"] = grounded.token_f1(text, row["reference"])
            row[f"{name}_rouge_l"] = grounded.rouge_l(text, row["reference"])
        if ev.rows:
            for key in ("token_f1", "rouge_l"):
                metrics[f"heldout_{key}"] = sum(r[f"{name}_{key}"] for r in ev.rows) / len(ev.rows)
        ev.metrics[name] = metrics
    return ev


COLUMNS = (("val_response_loss", "val response loss"), ("test_response_loss", "test response loss"),
           ("test_response_ppl", "test response ppl"), ("heldout_token_f1", "held-out token F1"),
           ("heldout_rouge_l", "held-out ROUGE-L"), ("test_bpb", "corpus test bits/byte"))


def comparison_markdown(ev: Evaluation, n_prompts: int) -> str:
    """The pretrained and the SFT model side by side, and the change SFT made."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in ev.metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k, _ in COLUMNS) + " |")
    if {"pretrained", "sft"} <= set(ev.metrics):
        before, after = ev.metrics["pretrained"], ev.metrics["sft"]
        lines.append("| change | " + " | ".join(f"{after.get(k, math.nan) - before.get(k, math.nan):+.4f}"
                                               for k, _ in COLUMNS) + " |")
    return "\n".join(["# SFT evaluation", "", *lines, "",
                      f"Held-out answers: greedy, to {n_prompts} test prompts, scored against the reference answer.",
                      ""])


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The sample table: held-out prompts, the reference, both models' answers and their token F1."""
    lines = ["# Held-out prompts: pretrained vs SFT", "",
             "| prompt | reference | pretrained | F1 | sft | F1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r.get('pretrained', ''))} | "
                     f"{r.get('pretrained_token_f1', math.nan):.2f} | {_cell(r.get('sft', ''))} | "
                     f"{r.get('sft_token_f1', math.nan):.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# entry points


@dataclass(frozen=True)
class SftResult:
    model_dir: Path
    metrics: dict[str, float]
    evaluation: Evaluation
    losses: list[float] = field(default_factory=list)


def prepare_data(ws: Workspace, cfg: SftConfig, ingest_cfg: IngestConfig) -> dict[str, float]:
    """Ingest ``cfg.sources`` and derive the built-in set (if enabled); return counts per split."""
    if cfg.sources:
        instructions.ingest_files(ws, cfg.sources, ingest_cfg)
    if cfg.builtin:
        instructions.derive_builtin(ws, ingest_cfg, cfg.phrasings, cfg.max_response_chars)
    counts = instructions.counts(ws, cfg.builtin)
    instructions.TABLE.require_train(counts, "sft", "instructions", cfg.builtin,
                                     "JSONL or Parquet: Alpaca, prompt/response or messages records", "pretrain")
    return {f"instructions_{s}": float(n) for s, n in counts.items()}


def render_examples(template: ChatTemplate, rows: Sequence[instructions.Instruction], block_size: int
                    ) -> list[Example]:
    return [to_example(r, block_size) for r in template.render_many([row.messages() for row in rows])]


def export_model(model: GPT, pretrained_dir: Path, model_dir: Path, extra: dict[str, Any]) -> Path:
    """The tuned model folder: weights, config marked with the chat template, the pretrained tokenizer."""
    save_model_folder(model, model_dir, {**extra, "chat_template": TEMPLATE_NAME})
    shutil.copyfile(Path(pretrained_dir) / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)
    return model_dir


def sft(ws: Workspace, cfg: SftConfig, pretrained_dir: Path, out_dir: Path, shard_dir: Path | None = None,
        log: Logger | None = None, progress: bool = True, dist: Dist | None = None) -> SftResult:
    """Fine-tune the model in ``pretrained_dir`` on the workspace's instructions (resuming if ``out_dir`` has
    checkpoints); write the best model to ``out_dir/model`` and evaluate it beside the pretrained one.

    Under torchrun (``dist``) each rank trains on its own rows of every step's global batch and DDP averages
    the gradients; rank 0 alone evaluates, keeps the best model and writes the model folder, and the other
    ranks return a result without evaluation.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = dist or Dist(device=resolve_device(cfg.device))
    device, out_dir, best_dir = dist.device, Path(out_dir), Path(out_dir) / BEST_DIR
    if dist.is_main and latest_checkpoint(out_dir / "checkpoints") is None:
        shutil.rmtree(best_dir, ignore_errors=True)  # a best model from another run must not win
    model, tokenizer, extra = load_lm(pretrained_dir, device)
    template, block = ChatTemplate(tokenizer), model.config.block_size
    data = {s: instructions.load_instructions(ws, s, cfg.builtin) for s in ("train", "val", "test")}
    examples = {s: render_examples(template, rows, block) for s, rows in data.items()}
    torch.manual_seed(cfg.seed)
    trainer = Trainer(model, TrainSettings.from_section(cfg), out_dir, log or NullLogger(), dist, progress)
    objective = InstructionObjective(cfg, examples["train"], examples["val"], block, trainer.dist, best_dir)
    trainer.fit(objective)
    if not dist.is_main:
        return SftResult(out_dir / MODEL_DIR, {}, Evaluation(), trainer.losses)
    tuned = load_model_folder(best_dir, device) if best_dir.exists() else trainer.raw_model.eval()
    model_dir = export_model(tuned, pretrained_dir, out_dir / MODEL_DIR, {**extra, "sft_steps": trainer.step,
                                                                         "sft_best_step": objective.best_step})
    held = {s: examples[s] for s in ("val", "test") if examples[s]}
    ev = compare({"pretrained": load_model_folder(pretrained_dir, device), "sft": tuned}, template, held,
                 heldout(data["test"], cfg.heldout_prompts), shard_dir, cfg)
    metrics = summary_metrics(ev, trainer, objective, {s: len(rows) for s, rows in data.items()})
    return SftResult(model_dir, metrics, ev, trainer.losses)


def summary_metrics(ev: Evaluation, trainer: Trainer, objective: InstructionObjective, sizes: dict[str, int]
                    ) -> dict[str, float]:
    """The SFT model's metrics, the pretrained model's as ``pretrained_*``, and the gains in grounded overlap."""
    after, before = ev.metrics["sft"], ev.metrics["pretrained"]
    out = {**after, **{f"pretrained_{k}": v for k, v in before.items()}}
    for key in ("heldout_token_f1", "heldout_rouge_l"):
        if key in after:
            out[f"{key}_gain"] = after[key] - before[key]
    if ev.rows:  # 95% intervals of the gains: both models answer the same prompts
        out |= bootstrap.paired_gain_intervals(ev.rows, "pretrained", "sft", {"token_f1": 1.0, "rouge_l": 1.0})
    out.update({"steps": float(trainer.step), "best_step": float(objective.best_step),
                "tokens_trained": float(trainer.tokens), "tokens_processed": float(trainer.tokens),
                "stopped_early": float(trainer.step < trainer.settings.max_steps),
                "heldout_prompts": float(len(ev.rows)), **{f"examples_{s}": float(n) for s, n in sizes.items()}})
    return out


def write_reports(result: SftResult, out_dir: Path, sample_rows: int) -> dict[str, Path]:
    """metrics.json, the comparison table and the sample table (Markdown and JSON)."""
    ev = result.evaluation
    files = {"metrics": out_dir / "metrics.json", "comparison": out_dir / "comparison.md",
             "samples": out_dir / "samples.md", "samples_json": out_dir / "samples.json"}
    atomic_write_text(files["metrics"], json.dumps({"metrics": result.metrics, "models": ev.metrics,
                                                    "losses": result.losses}, indent=2))
    atomic_write_text(files["comparison"], comparison_markdown(ev, len(ev.rows)))
    atomic_write_text(files["samples"], samples_markdown(ev.rows[:sample_rows]))
    atomic_write_text(files["samples_json"], json.dumps(ev.rows[:sample_rows], indent=2, ensure_ascii=False))
    return files


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``sft`` stage: prepare the instruction data, fine-tune the pretrained model, evaluate, report."""
    cfg: SftConfig = ctx.section("sft")
    ws = ctx.workspace
    counts = prepare_data(ws, cfg, ctx.config.ingest)
    ctx.log.metrics(counts)
    shard_dir = ws.abs(ctx.inputs["tokenizer"].outputs["shards"]) if "tokenizer" in ctx.inputs else None
    result = sft(ws, cfg, ws.abs(ctx.inputs["pretrain"].outputs["model"]), ctx.out_dir, shard_dir, ctx.log,
                 ctx.progress)
    files = write_reports(result, ctx.out_dir, cfg.sample_rows)
    for path in files.values():
        ctx.log.artifact(path)
    ctx.log.metrics(result.metrics)
    m = result.metrics
    f1, rouge = (m.get("heldout_token_f1", math.nan), m.get("pretrained_heldout_token_f1", math.nan)), (
        m.get("heldout_rouge_l", math.nan), m.get("pretrained_heldout_rouge_l", math.nan))
    interval = (f" (gain 95% interval {m['heldout_token_f1_gain_low']:+.3f} to {m['heldout_token_f1_gain_high']:+.3f})"
                if "heldout_token_f1_gain_low" in m else "")
    summary = (f"{int(m['steps'])} steps (best at {int(m['best_step'])}); held-out token F1 {f1[1]:.3f} -> "
               f"{f1[0]:.3f}{interval}, ROUGE-L {rouge[1]:.3f} -> {rouge[0]:.3f} (pretrained -> sft)")
    outputs = {"model": ws.rel(result.model_dir), "tokenizer": ws.rel(result.model_dir / TOKENIZER_FILE),
               **{name: ws.rel(path) for name, path in files.items()}}
    return StageOutput(file_sha256(result.model_dir / "model.safetensors")[:32], outputs, {**counts, **m}, summary)


def external_inputs(ws: Workspace, cfg: PipelineConfig) -> dict[str, Any]:
    """The configured instruction files (size, mtime) and the instruction rows ingested outside the stage."""
    return instructions.TABLE.external_inputs(ws, cfg.sft.sources)


def is_chat_model(model_dir: Path) -> bool:
    """Whether a model folder was tuned with the chat template (so prompts should be rendered with it)."""
    return read_model_config(model_dir)[1].get("chat_template") == TEMPLATE_NAME


def main(argv: list[str] | None = None) -> None:
    """Fine-tune outside the pipeline, e.g. under torchrun on several GPUs (see lmpipe.launch)."""
    from lmpipe import launch
    from lmpipe.trainer import distributed

    p = launch.parser("python -m lmpipe.sft", main.__doc__)
    p.add_argument("--pretrained", help="Pretrained model folder (default: the workspace's last pretrain result).")
    p.add_argument("--shards", help="Corpus token shards for test bits per byte (default: the workspace's, if any).")
    args = p.parse_args(argv)
    cfg = launch.config(args)
    ws = Workspace.resolve(args.workspace)
    pretrained = launch.stage_output(ws, args.pretrained, "pretrain", "model", "--pretrained")
    shard_dir = launch.stage_output(ws, args.shards, "tokenizer", "shards", "--shards", required=False)
    with distributed(cfg.sft.device) as dist:
        launch.prepare(ws, dist, "sft data", lambda: prepare_data(ws, cfg.sft, cfg.ingest))
        result = sft(ws, cfg.sft, pretrained, Path(args.out), shard_dir, dist=dist)
        if dist.is_main:
            write_reports(result, Path(args.out), cfg.sft.sample_rows)
        launch.report(dist, result.metrics)


if __name__ == "__main__":
    main()
