"""The ``lmpipe`` command line.

Orchestration (Prefect) and tracking (MLflow) are imported inside the commands that need them, after
the workspace's environment is set, so ``lmpipe --help`` and the library stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lmpipe.config import ConfigError, PipelineConfig, load_config, preset_names, reference_markdown, to_dict
from lmpipe.workspace import Workspace, WorkspaceBusy, apply_runtime_environment

if TYPE_CHECKING:
    from lmpipe.tracking import Registry

WORKSPACE_HELP = "Workspace folder (default: $LMPIPE_WORKSPACE, else ./data/workspace)."


def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override one config value (repeatable); the value is parsed as YAML.")(fn)
    fn = click.option("--config", "config_files", multiple=True, type=click.Path(dir_okay=False),
                      help="YAML config file applied over the preset (repeatable).")(fn)
    fn = click.option("--preset", default="tiny", show_default=True, type=click.Choice(preset_names()),
                      help="Base configuration.")(fn)
    return fn


def _load(preset: str, config_files: tuple[str, ...], overrides: tuple[str, ...]) -> PipelineConfig:
    try:
        return load_config(preset, config_files, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lmpipe")
def main() -> None:
    """Train every generation of language model on one corpus, as one tracked pipeline."""


@main.command()
@_config_options
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--only", multiple=True, metavar="STAGE", help="Run only these stages (repeatable).")
@click.option("--from", "start", metavar="STAGE", help="First stage to run.")
@click.option("--to", "stop", metavar="STAGE", help="Last stage to run.")
@click.option("--force", multiple=True, metavar="STAGE", help="Rerun this stage and its dependants even if cached.")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another run on the same workspace before giving up.")
@click.option("--dry-run", is_flag=True, help="Print which stages would run and why, and run nothing.")
def run(preset, config_files, overrides, workspace, only, start, stop, force, wait, dry_run) -> None:
    """Run the pipeline (every stage, reusing cached ones)."""
    cfg = _load(preset, config_files, overrides)
    ws = Workspace.resolve(workspace)
    if dry_run:
        _print_plan(ws, cfg, only, start, stop, force)
        return
    apply_runtime_environment(ws)
    from flows.pipeline import run_pipeline

    t0 = time.time()
    try:
        out = run_pipeline(str(ws.root), config=cfg, only=only, start=start, stop=stop, force=force, wait=wait)
    except WorkspaceBusy as exc:
        raise click.ClickException(str(exc)) from exc
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    statuses = out.get("_statuses", {})
    click.echo(f"\npipeline finished in {time.time() - t0:.1f} s (MLflow run {out.get('_run_id')})")
    for name, status in statuses.items():
        click.echo(f"  {name:<12} {status:<10} {out[name].get('summary', '')}")
    click.echo(f"workspace: {ws.root}\nsee results: lmpipe ui --workspace {ws.root}")


def _print_plan(ws: Workspace, cfg: PipelineConfig, only, start, stop, force) -> None:
    from lmpipe.pipeline import plan

    try:
        steps = plan(ws, cfg, tuple(only), start, stop, tuple(force))
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    click.echo(f"plan for workspace {ws.root} (nothing is run)")
    for step in steps:
        click.echo(f"  {step.stage:<12} {step.action:<8} {'; '.join(step.reasons)}".rstrip())
    if any(step.action == "missing" for step in steps):
        raise click.ClickException("a selected stage needs a stage that never ran")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@_config_options
@click.option("--wait", type=float, default=0.0, show_default=True, help="Seconds to wait for the workspace lock.")
@click.option("--track/--no-track", default=True, show_default=True, help="Record the ingestion as an MLflow run.")
@click.option("--kind", type=click.Choice(["documents", "instructions", "preferences"]), default="documents",
              show_default=True, help="Corpus documents, instruction data (JSONL/Parquet: Alpaca, prompt/response, "
              "messages) or preference pairs (prompt/chosen/rejected, or chosen/rejected dialogues).")
def ingest(paths, workspace, preset, config_files, overrides, wait, track, kind) -> None:
    """Ingest files, directories, globs or URIs into the warehouse (idempotent)."""
    from lmpipe.config import from_dict
    from lmpipe.corpus import ingest as do_ingest
    from lmpipe.sources import IngestError

    cfg = _load(preset, config_files, overrides)
    if kind != "documents":
        _ingest_records(kind, paths, Workspace.resolve(workspace), cfg, wait)
        return
    section = from_dict(type(cfg.ingest), {**to_dict(cfg.ingest), "sources": list(paths)})
    ws = Workspace.resolve(workspace)
    apply_runtime_environment(ws)
    run = None
    try:
        with ws.lock(wait, purpose="ingest"):
            if track:
                from lmpipe.config import flatten
                from lmpipe.tracking import Tracker

                tracker = Tracker(ws, cfg.tracking.experiment, cfg.tracking.tracking_uri)
                run = tracker.start_run("ingest", tags={"lmpipe.stage": "ingest", "lmpipe.kind": "cli"})
                run.params(flatten(section, prefix="ingest"))
            report = do_ingest(ws, section, log=run)
    except (IngestError, WorkspaceBusy) as exc:
        if run is not None:
            run.tags({"lmpipe.error": str(exc)[:5000]})
            run.end("FAILED")
        raise click.ClickException(str(exc)) from exc
    if run is not None:
        run.metrics(report.totals())
        run.text(report.to_markdown(), "ingest_report.md")
        run.end()
    for s in report.sources:
        detail = "already ingested, nothing added" if s.status == "skipped" else (
            f"{s.read} read, {s.kept} kept" + "".join(f", {n} {r}" for r, n in sorted(s.dropped.items())))
        click.echo(f"{s.uri}: {detail}")
    click.echo(f"{report.added} documents added in {report.seconds:.1f} s; warehouse: "
               + ", ".join(f"{k} {v}" for k, v in sorted(report.splits.items())))


def _ingest_records(kind: str, paths: tuple[str, ...], ws: Workspace, cfg: PipelineConfig, wait: float) -> None:
    """``ingest --kind instructions|preferences``: each file in one transaction; a bad record fails its file."""
    import importlib

    from lmpipe.sources import IngestError

    module = importlib.import_module(f"lmpipe.{kind}")
    try:
        with ws.lock(wait, purpose=f"ingest {kind}"):
            reports = module.ingest_files(ws, list(paths), cfg.ingest)
    except (IngestError, WorkspaceBusy) as exc:
        raise click.ClickException(str(exc)) from exc
    for r in reports:
        detail = "already ingested, nothing added" if r.status == "skipped" else f"{r.records} read, {r.kept} kept"
        click.echo(f"{r.uri}: {detail}")
    splits = {k: v for k, v in module.counts(ws).items() if k in ("train", "val", "test")}
    click.echo(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))


@main.command()
@_config_options
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--cron", help='Cron schedule, e.g. "0 3 * * 0" (Sundays at 03:00).')
@click.option("--interval", type=click.FloatRange(min=0, min_open=True),
              help="Run every this many seconds instead of a cron schedule.")
@click.option("--pool", metavar="WORK_POOL",
              help="Register the deployment on this process work pool of $PREFECT_API_URL and return; "
                   "the pool's workers run it.")
@click.option("--name", help="Deployment name (default: retrain-<workspace folder name>).")
def schedule(preset, config_files, overrides, workspace, cron, interval, pool, name) -> None:
    """Run the pipeline on a schedule as a Prefect deployment.

    Without --pool it serves the deployment itself (blocks; Ctrl-C stops it), on the server at
    PREFECT_API_URL or, without one, on a local Prefect server it starts on 127.0.0.1 for the workspace.
    """
    if (cron is None) == (interval is None):
        raise click.UsageError("give exactly one of --cron or --interval")
    cfg = _load(preset, config_files, overrides)
    ws = Workspace.resolve(workspace)
    apply_runtime_environment(ws)
    from flows.schedule import deploy, deployment_name, serve

    when = f"cron {cron}" if cron else f"every {interval:g} s"
    full_name = f"lmpipe-pipeline/{name or deployment_name(ws)}"
    if pool:
        try:
            deployment_id = deploy(ws, cfg, pool, cron=cron, interval=interval, name=name)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"deployment {full_name} ({deployment_id}) on work pool {pool}: {ws.root}, {when}")
        click.echo(f"run it with a worker: prefect worker start --pool {pool}")
        return
    click.echo(f"serving deployment {full_name} on {ws.root} ({when}); Ctrl-C stops")
    with contextlib.suppress(KeyboardInterrupt):
        serve(ws, cfg, cron=cron, interval=interval, name=name,
              on_server=lambda url: click.echo(f"Prefect UI: {url}"))


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(workspace, as_json) -> None:
    """Show each stage's state: fresh, cached or failed, its last run and headline metrics."""
    from lmpipe import pipeline
    from lmpipe.stage import changed
    from lmpipe.state import load_history, load_stage_state

    ws = Workspace.resolve(workspace)
    rows = []
    for stage in pipeline.STAGES:
        st = load_stage_state(ws, stage.name)
        if st is None:
            rows.append({"stage": stage.name, "status": "never run"})
            continue
        label = {"completed": "fresh", "reused": "cached", "failed": "failed"}[st.status]
        res = st.result
        headline = {k: res.metrics[k] for k in stage.headline if res and k in res.metrics}
        # modules edited since the result (`lmpipe run --dry-run` also weighs config and inputs)
        stale = changed(res.key_detail["code"], stage.code_digests()) if res and res.key_detail else []
        rows.append({
            "stage": stage.name, "status": label, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.at)),
            "mlflow_run": res.run_id if res else None, "metrics": headline, "error": st.error,
            "code_changed": stale,
        })
    if as_json:
        click.echo(json.dumps({"workspace": str(ws.root), "stages": rows, "runs": load_history(ws)[-5:]}, indent=2))
        return
    click.echo(f"workspace {ws.root}")
    for r in rows:
        line = f"  {r['stage']:<12} {r['status']:<10}"
        if "at" in r:
            line += f" {r['at']}  run {str(r['mlflow_run'])[:12]}"
            line += "".join(f"  {k}={v:.4g}" for k, v in r["metrics"].items())
        if r.get("code_changed"):
            line += f"\n    code changed since this result: {', '.join(r['code_changed'])}"
        if r.get("error"):
            line += f"\n    error: {r['error']}"
        click.echo(line)


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--prefect", is_flag=True, help="Start the Prefect UI (on the workspace's Prefect database) instead.")
def ui(workspace, port, prefect) -> None:
    """Start the MLflow UI (or the Prefect UI) on 127.0.0.1 and print its URL."""
    ws = Workspace.resolve(workspace)
    apply_runtime_environment(ws)
    env = dict(os.environ)
    if prefect:
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    else:
        from lmpipe.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(ws)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
        if uri == ws.mlflow_uri:
            cmd += ["--default-artifact-root", ws.mlflow_artifacts.as_uri()]
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    click.echo(f"{'Prefect' if prefect else 'MLflow'} UI for {ws.root}: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(cmd, env=env, check=False)


@main.group()
def config() -> None:
    """Inspect configuration: the resolved values, or the reference of every knob."""


@config.command("show")
@_config_options
def config_show(preset, config_files, overrides) -> None:
    """Print the resolved configuration as YAML."""
    import yaml

    click.echo(yaml.safe_dump(to_dict(_load(preset, config_files, overrides)), sort_keys=False, allow_unicode=True))


@config.command("reference")
@click.option("--update", type=click.Path(exists=True, dir_okay=False), metavar="README",
              help="Rewrite the reference block of this Markdown file instead of printing.")
def config_reference(update) -> None:
    """Print the configuration reference (Markdown) generated from the field descriptions."""
    if not update:
        click.echo(reference_markdown())
        return
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    text = Path(update).read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise click.ClickException(f"{update} has no {start.strip()} ... {end} block")
    head, rest = text.split(start, 1)
    Path(update).write_text(head + start + reference_markdown() + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
    click.echo(f"updated the configuration reference in {update}")


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--stage", default="pretrain", show_default=True,
              help="Stage whose trained model completes the prompts (pretrain, sft, ppo).")
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--max-new-tokens", type=int, default=100, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 means greedy decoding.")
@click.option("--top-k", type=int, default=50, show_default=True, help="0 means no top-k limit.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling: keep the smallest set with this mass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def generate(prompts, stage, workspace, max_new_tokens, temperature, top_k, top_p, seed, device) -> None:
    """Complete PROMPTS with the model a stage trained (its last good result in the workspace)."""
    import torch

    from lmpipe.pretrain import load_lm, sample_texts
    from lmpipe.state import load_stage_state

    ws = Workspace.resolve(workspace)
    state = load_stage_state(ws, stage)
    if state is None or state.result is None or "model" not in state.result.outputs:
        raise click.ClickException(f"no trained model from stage {stage!r} in {ws.root}: run `lmpipe run` first")
    model_dir = ws.abs(state.result.outputs["model"])
    model, tokenizer, extra = load_lm(model_dir, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    limit = model.config.block_size - 1
    if not 0 < max_new_tokens <= limit:
        raise click.UsageError(f"--max-new-tokens must be between 1 and {limit} for this model")
    if extra.get("chat_template"):  # an instruction-tuned model answers PROMPTS as user turns
        from lmpipe.chat import ChatTemplate
        from lmpipe.sft import answer

        generator = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
        texts = answer(model, ChatTemplate(tokenizer), list(prompts), max_new_tokens, temperature, top_k or None,
                       top_p, generator=generator)
    else:
        texts = sample_texts(model, tokenizer, list(prompts), max_new_tokens, temperature, top_k, seed,
                             extra.get("eot_id", 0), top_p)
    for text in texts:
        click.echo(text)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--stage", default="ngram", show_default=True, help="Stage whose trained model scores the text.")
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--order", type=int, help="Model order (n-gram stage; default: the best model on val).")
@click.option("--method", help="Model within the stage: n-gram smoothing (default: the best on val), or nnlm | rnnlm.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def score(file, stage, workspace, order, method, as_json) -> None:
    """Perplexity, bits per byte and OOV rate of a UTF-8 text file (one document per line)."""
    from lmpipe.scoring import score as score_texts
    from lmpipe.state import load_stage_state

    ws = Workspace.resolve(workspace)
    state = load_stage_state(ws, stage)
    if state is None or state.result is None:
        raise click.ClickException(f"stage {stage!r} has no result in {ws.root}: run `lmpipe run --to {stage}` first")
    texts = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    options = {k: v for k, v in {"order": order, "method": method}.items() if v is not None}
    try:
        result = score_texts(ws, state.result, texts, options)
    except KeyError as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    for key, value in result.to_json().items():
        click.echo(f"{key:<16} {value:.6g}" if isinstance(value, float) else f"{key:<16} {value}")


@main.command("score-reward")
@click.option("--prompt", "prompts", multiple=True, required=True, help="User prompt (repeatable, one per response).")
@click.option("--response", "responses", multiple=True, required=True, help="Answer to score (repeatable).")
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--normalize", is_flag=True, help="Also print the reward standardised by the train-reward mean and std.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def score_reward(prompts, responses, workspace, normalize, device) -> None:
    """Print the reward model's score of each (PROMPT, RESPONSE) pair."""
    import torch

    from lmpipe.reward import RewardModel
    from lmpipe.state import load_stage_state

    if len(prompts) != len(responses):
        raise click.UsageError(f"{len(prompts)} --prompt but {len(responses)} --response options: give one of each")
    ws = Workspace.resolve(workspace)
    state = load_stage_state(ws, "reward")
    if state is None or state.result is None or "model" not in state.result.outputs:
        raise click.ClickException(f"no reward model in {ws.root}: run `lmpipe run --to reward` first")
    model = RewardModel.load(ws.abs(state.result.outputs["model"]),
                             device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raw = model.score(list(prompts), list(responses))
    normalized = model.score(list(prompts), list(responses), normalize=True) if normalize else raw
    for r, z in zip(raw, normalized, strict=True):
        click.echo(f"{r:.4f}" + (f"\t{z:.4f}" if normalize else ""))


def _registry(workspace: str | None, preset: str, config_files: tuple[str, ...], overrides: tuple[str, ...],
              name: str | None) -> tuple[Registry, str]:
    """The model registry the config points at, and the model name (``--name``, else tracking.registered_model)."""
    from lmpipe.tracking import Registry, resolve_tracking_uri

    cfg = _load(preset, config_files, overrides)
    name = name or cfg.tracking.registered_model
    if not name:
        raise click.UsageError("no registered model named: give --name or set tracking.registered_model")
    return Registry.connect(resolve_tracking_uri(Workspace.resolve(workspace), cfg.tracking.tracking_uri)), name


@main.command()
@click.argument("version")
@click.option("--name", help="Registered model (default: tracking.registered_model, the PPO policy).")
@click.option("--alias", default="production", show_default=True, help="Alias to move to VERSION.")
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@_config_options
def promote(version, name, alias, workspace, preset, config_files, overrides) -> None:
    """Point ALIAS of a registered model at VERSION (`lmpipe models` lists the versions)."""
    from lmpipe.tracking import UnknownModelVersion

    registry, name = _registry(workspace, preset, config_files, overrides, name)
    try:
        info = registry.promote(name, version, alias)
    except (UnknownModelVersion, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{name}@{alias} -> version {info.version} (MLflow run {info.run_id})")


@main.command()
@click.option("--name", help="Registered model (default: tracking.registered_model, the PPO policy).")
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_config_options
def models(name, workspace, as_json, preset, config_files, overrides) -> None:
    """List the versions of a registered model with their aliases and lineage."""
    from lmpipe.tracking import UnknownModelVersion

    registry, name = _registry(workspace, preset, config_files, overrides, name)
    try:
        versions = registry.versions(name)
    except UnknownModelVersion as exc:
        raise click.ClickException(f"{exc}: run the pipeline through the ppo stage first") from exc
    if as_json:
        click.echo(json.dumps([v.to_json() for v in versions], indent=2))
        return
    click.echo(name)
    for v in versions:
        t = v.tags
        git = t.get("git.commit", "-")[:10] + ("+dirty" if t.get("git.dirty") == "true" else "")
        click.echo(f"  version {v.version:<4} {','.join(v.aliases) or '-':<20} "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(v.created_at))}  run {v.run_id[:12]}  "
                   f"pipeline {t.get('lmpipe.pipeline_run_id', '-')[:12]}  "
                   f"data {t.get('lmpipe.data_fingerprint', '-')[:14]}  git {git}")


def _workspace_config(ws: Workspace) -> PipelineConfig:
    """The config of the workspace's last pipeline run; the defaults when it has none."""
    path = ws.state_dir / "last_config.yaml"
    try:
        return load_config(None, [path]) if path.exists() else PipelineConfig()
    except ConfigError:  # written by another lmpipe version: its tracking and report settings are all we need
        return PipelineConfig()


def _latest_report(ws: Workspace) -> dict:
    """The report stage's last report.json, else one built from the other stages' recorded metrics."""
    from lmpipe import pipeline
    from lmpipe.report import build_report, load_report
    from lmpipe.state import load_stage_state

    state = load_stage_state(ws, "report")
    if state is not None and state.result is not None and ws.abs(state.result.outputs.get("json", "-")).exists():
        return load_report(ws.abs(state.result.outputs["json"]))
    states = {s.name: load_stage_state(ws, s.name) for s in pipeline.STAGES if s.name != "report"}
    results = {name: st.result for name, st in states.items() if st is not None and st.result is not None}
    if not results:
        raise click.ClickException(f"no stage has run in {ws.root}: run `lmpipe run` first")
    return build_report(ws, _workspace_config(ws), results, measure=False)


def _compare_reports(ws: Workspace, run_ids: tuple[str, str], fmt: str) -> str:
    """Two pipeline runs' report.json from MLflow, side by side with their differences."""
    import tempfile

    from lmpipe.report import ReportError, compare, load_report, md_table, text_table
    from lmpipe.tracking import download_run_file, resolve_tracking_uri

    uri = resolve_tracking_uri(ws, _workspace_config(ws).tracking.tracking_uri)
    reports = []
    with tempfile.TemporaryDirectory(prefix="lmpipe-compare-") as tmp:
        for i, run_id in enumerate(run_ids):
            try:
                path = download_run_file(uri, run_id, ("report/report.json", "report.json"), Path(tmp) / str(i))
                reports.append(load_report(path))
            except (LookupError, ReportError) as exc:
                raise click.ClickException(str(exc).strip("'\"")) from exc
    head, rows = compare(reports[0], reports[1], (run_ids[0][:12], run_ids[1][:12]))
    commits = [f"{r[:12]}: commit {(d['run'].get('git_commit') or 'unknown')[:12]}"
               + (" (uncommitted changes)" if d["run"].get("git_dirty") else "")
               for r, d in zip(run_ids, reports, strict=True)]
    if fmt == "markdown":
        return "\n".join(["# Evolution reports compared", "", *(f"- {c}" for c in commits), "", md_table(head, rows)])
    return "\n".join([*commits, "", text_table(head, rows)])


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "html"]), default="table",
              show_default=True, help="Plain-text table, the whole report as Markdown, or the standalone HTML page.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write to this file instead of printing.")
@click.option("--compare", nargs=2, metavar="RUN_A RUN_B",
              help="Compare the reports of two pipeline runs (their MLflow run ids) instead.")
def report(workspace, fmt, output, compare) -> None:
    """Every generation on one test-split yardstick: the latest evolution report, or two runs compared."""
    ws = Workspace.resolve(workspace)
    if compare:
        if fmt == "html":
            raise click.UsageError("--compare prints a table or Markdown, not HTML")
        text = _compare_reports(ws, compare, fmt)
    else:
        from lmpipe import report as reports
        from lmpipe.report_html import html

        data = _latest_report(ws)
        text = {"table": reports.table, "markdown": reports.markdown, "html": html}[fmt](data)
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        click.echo(f"wrote {output}")
    else:
        click.echo(text)


@main.command()
@click.option("--workspace", type=click.Path(file_okay=False), help=WORKSPACE_HELP)
@click.confirmation_option(prompt="Delete the workspace's warehouse, artifacts, runs and caches?")
def clean(workspace) -> None:
    """Delete a workspace (all its state)."""
    ws = Workspace.resolve(workspace)
    with ws.lock(0, purpose="clean"):
        for child in ws.root.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    click.echo(f"emptied {ws.root}")


if __name__ == "__main__":
    main()
