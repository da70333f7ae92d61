"""The ``moue`` command line.

Every command validates its input first: bad input prints one line naming the field, the value and
what is allowed, and exits with code 2 before anything is launched or written. Heavy imports
(torch, ray, mlflow, analysis) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from moue import tracking_contract
from moue.errors import ConfigError

app = typer.Typer(
    name="moue",
    help="Hyperparameter and scaling-law studies of MoE LMs with expert pools shared across layers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: "[model]" stays text, boolean options show as flags
)
bench_app = typer.Typer(help="Performance benchmarks (ratios measured side by side in one run).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")


def user_errors(fn):
    """Bad input (a ``ConfigError`` raised while validating) exits 2 with its one line; an
    interrupted sweep (Ctrl-C: ``SweepInterrupted``, or a second Ctrl-C) exits 130 with one line,
    as a shell reports SIGINT, after nothing was fitted."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from moue.studies.workspace import SweepInterrupted

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:  # AnalysisError is one too
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except SweepInterrupted as exc:
            typer.echo(f"interrupted: {exc}", err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:  # a second Ctrl-C: Tune saved its state at the last mark
            typer.echo("interrupted: stopped at once (a second Ctrl-C); run the same command again to resume",
                       err=True)
            raise typer.Exit(130) from None

    return wrapper


def fail(message: str, code: int = 2) -> None:
    """One-line error, exit code 2 (bad input) unless ``code`` says otherwise."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@bench_app.command("moe")
@user_errors
def bench_moe_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    repeats: int = typer.Option(15, min=1, help="Timed (dense, MoE) pairs per shape."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """One MoE layer vs a dense SwiGLU of hidden k*f (same active FLOPs), forward+backward.

    Example: moue bench moe --json
    """
    if device not in ("cpu", "cuda"):
        fail(f"--device ({device!r}) must be one of cpu, cuda")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        typer.echo("no CUDA device on this machine: the GPU benchmark was not run (nothing timed)")
        _print_compile_report()
        raise typer.Exit(0)
    if device == "cuda":
        from moue.bench import bench_moe_cuda

        result = bench_moe_cuda(repeats=repeats)
        if json_out:
            typer.echo(json.dumps(result))
            return
        typer.echo(f"{result['device']}, torch {result['torch']}, bf16; fraction of dense-equivalent throughput")
        for name, r in result["shapes"].items():
            typer.echo(f"{name:8} T={r['tokens']:>6} d={r['d_model']:>5} f={r['expert_hidden']:>4} P={r['pool_size']:>3} "
                       f"w={r['window']:>3} k={r['top_k']}  triton {1 / r['ratio_triton']:.3f} ({r['blocks']} tiles)  "
                       f"grouped_mm {1 / r['ratio_grouped_mm']:.3f}")
        return
    from moue.bench import bench_moe

    result = bench_moe(repeats=repeats)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"torch {result['torch']}, {result['threads']} threads, {result['dtype']}, "
               f"malloc tuned: {result['malloc_tuned']}, {repeats} interleaved pairs per shape")
    typer.echo(f"{'shape':8} {'T':>5} {'d':>4} {'f':>4} {'P':>3} {'w':>3} {'k':>2} "
               f"{'dense ms':>9} {'MoE ms':>8} {'ratio':>6} {'min-max':>11}")
    for name, r in result["shapes"].items():
        typer.echo(f"{name:8} {r['tokens']:>5} {r['d_model']:>4} {r['expert_hidden']:>4} "
                   f"{r['pool_size']:>3} {r['window']:>3} {r['top_k']:>2} {r['dense_ms']:>9.1f} "
                   f"{r['moe_ms']:>8.1f} {r['ratio']:>6.3f} {r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f}")


def _print_compile_report() -> None:
    """What can be checked without a GPU: the bf16 kernels compiled for an H100 (sm_90a)."""
    import warnings

    from moue import triton_aot
    from moue import triton_moe as tm

    typer.echo("the bf16 Triton kernels compiled ahead of time for sm_90a (H100), no GPU needed:")
    for blocks_name in ("SMALL", "LARGE"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = triton_aot.compile_report(90, "bf16", getattr(tm, blocks_name))
        except Exception as exc:  # an older Triton or a wheel without ptxas/cuobjdump: report, still exit 0
            typer.echo(f"  compile check unavailable: {type(exc).__name__}: {exc}".splitlines()[0])
            return
        for kernel, r in report.items():
            b = r["blocks"]
            typer.echo(f"  {blocks_name:5} {kernel:12} tile {b.m}x{b.n_up if kernel == '_up_kernel' else b.n_down}x{b.k} "
                       f"{b.warps} warps: {r['registers']} registers, {r['spill_bytes']} B spilled, "
                       f"{r['shared_bytes'] // 1024} KiB shared, {r['cp_async']} cp.async, {r['mma']}")


DEFAULT_WORKSPACE = Path(tracking_contract.DEFAULT_WORKSPACE)
QUICKSTART_TRIAL = Path(__file__).parent / "trials" / "quickstart.toml"


@app.command("train")
@user_errors
def train_cmd(
    config: Path = typer.Argument(None, help="Trial TOML ([model], [train], [data]); defaults apply without one."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set model.pool_size=32 (repeatable)."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace: corpus cache and checkpoints."),
    name: str = typer.Option("", help="Run name (default: the config file's stem)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from this run's last checkpoint."),
) -> None:
    """Train one trial with a progress bar and print its summary (debugging a study's trial).

    Example: moue train studies/trials/quickstart.toml --set model.router=norm --set train.tokens=262144
    """
    from moue.studies.trial import load_checkpoint, load_trial, save_checkpoint

    cfg = load_trial(config, set_)
    run_name = name or (config.stem if config else "trial")
    run_dir = workspace.resolve() / "train" / run_name
    ckpt_path = run_dir / "checkpoint.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            fail(f"--resume ({str(ckpt_path)!r}) has no checkpoint to resume from")
        state = load_checkpoint(ckpt_path)
    elif ckpt_path.exists():
        fail(f"--name ({run_name!r}) already has a run in {run_dir}; pass --resume or another --name")

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from moue.train import train

    total = cfg.train.steps * cfg.train.batch_tokens

    class ProgressSink:
        def __init__(self, progress, task) -> None:
            self.progress, self.task = progress, task

        def report(self, mark) -> None:
            if mark.checkpoint is not None:
                save_checkpoint(ckpt_path, mark.checkpoint)
            if "val/loss" in mark.metrics:
                self.progress.update(self.task, completed=mark.tokens, val=f"{mark.metrics['val/loss']:.4f}")

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"),
                  TextColumn("val {task.fields[val]}"), TimeRemainingColumn()) as progress:
        task = progress.add_task(run_name, total=total, val="-")
        from moue.runtime import configure_process

        configure_process(cfg.train.threads)
        result = train(cfg, ProgressSink(progress, task), cache_dir=workspace.resolve() / "cache", resume=state)
    c = result.counts
    typer.echo(f"status            {result.status}{': ' + result.stop_reason if result.stop_reason else ''}")
    typer.echo(f"parameters        {c.n_params_total:,} total, {c.n_params_active:,} active "
               f"(+{c.n_params_embedding:,} embedding)")
    typer.echo(f"virtual width     {c.virtual_width} (physical {c.physical_width}, reuse {c.reuse:.2f})")
    val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
    typer.echo(f"final val loss    {val} after {result.tokens:,} tokens ({result.flops:.3g} FLOPs)")
    typer.echo(f"throughput        {result.tokens_per_s:,.0f} tokens/s "
               f"(train {result.train_s:.1f} s, eval {result.eval_s:.1f} s, wall {result.wall_s:.1f} s)")
    typer.echo(f"corpus            {result.corpus_fingerprint[:16]}  checkpoint {ckpt_path}")
    if result.status != "finished":
        raise typer.Exit(1)


@bench_app.command("cooldown")
@user_errors
def bench_cooldown_cmd(
    config: Path = typer.Argument(Path(__file__).parent / "trials" / "cooldown.toml",
                                  help="Trial TOML (default: studies/trials/cooldown.toml)."),
    at: list[int] = typer.Option([307_200, 614_400], "--at", help="Branch points in tokens (repeatable)."),
    frac: float = typer.Option(0.2, "--frac", help="Cooldown length as a fraction of the tokens seen."),
    seeds: int = typer.Option(3, min=1, help="Seeds 0..n-1."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace (corpus cache)."),
) -> None:
    """Cooldown branches of one WSD run against separate cosine runs of the same lengths: the loss
    at each length both ways, per seed, and what the branches cost against the runs they replace.

    Example: moue bench cooldown --json
    """
    from moue.bench import bench_cooldown
    from moue.runtime import configure_process
    from moue.studies.trial import load_trial

    cfg = load_trial(config)
    configure_process(cfg.train.threads)
    r = bench_cooldown(cfg, at=tuple(at), frac=frac, seeds=tuple(range(seeds)), cache_dir=workspace.resolve() / "cache")
    if json_out:
        typer.echo(json.dumps(r, allow_nan=True))
        return
    for p in r["points"]:
        typer.echo(f"D = {p['tokens']:>9,}: WSD/branch {' '.join(f'{v:.4f}' for v in p['wsd'])} | cosine "
                   f"{' '.join(f'{v:.4f}' for v in p['cosine'])} | mean diff {p['mean_diff']:+.4f} "
                   f"(cosine seed sd {p['cosine_seed_sd']:.4f})")
    typer.echo(f"tokens: WSD runs with branches {r['wsd_tokens']:,} ({r['wsd_s']:.0f} s) vs separate cosine runs "
               f"for the branch lengths {r['separate_tokens']:,} ({r['separate_s']:.0f} s); branch tokens / separate "
               f"tokens {r['branch_tokens_vs_separate']:.3f}")


@bench_app.command("train")
@user_errors
def bench_train_cmd(
    config: Path = typer.Argument(QUICKSTART_TRIAL, help="Trial TOML (default: the quickstart trial)."),
    steps: int = typer.Option(20, min=2, help="Optimizer steps to time."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace (corpus cache)."),
    profile: bool = typer.Option(False, "--profile", help="Also profile a few steps: where a step's time goes "
                                 "(attention, router, dispatch, experts, norms, embedding/head/loss, optimizer)."),
    compile_: bool = typer.Option(False, "--compile", help="Also train it with train.compile = true, side by side "
                                  "(each mode after as many warm-up steps as it times)."),
    composite_: bool = typer.Option(False, "--composite", help="Also train it 3 more times each with the fused "
                                    "RoPE and RMSNorm (moue.fused) and with the composite ops, alternating."),
) -> None:
    """Model GFLOP/s of a training trial next to this machine's dense matmul GFLOP/s.

    Example: moue bench train --json --profile
    """
    from moue.bench import bench_train, profile_step
    from moue.studies.trial import load_trial

    cfg = load_trial(config)
    result = bench_train(cfg, steps=steps, cache_dir=workspace.resolve() / "cache", compile_=compile_,
                         composite_=composite_)
    if profile:
        result["profile"] = profile_step(cfg)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{config.name}: {steps} steps of {result['batch_tokens']} tokens, torch {result['torch']}, "
               f"{result['threads']} threads, fp32")
    typer.echo(f"model  {result['model_gflops']:8.1f} GFLOP/s ({result['count_convention']})")
    typer.echo(f"matmul {result['matmul_gflops']:8.1f} GFLOP/s (1024^3, same process)")
    typer.echo(f"ratio  {result['ratio']:8.3f}   tokens/s {result['tokens_per_s']:,.0f}   "
               f"peak RSS {result['peak_rss_mb']:.0f} MB")
    typer.echo(f"gemms  {result['gemm_gflops']:8.1f} GFLOP/s (the step's own GEMMs, each timed alone): "
               f"{100 * result['gemm_step_fraction']:.0f}% of a step, the rest is everything else")
    if compile_:
        typer.echo(f"compiled (train.compile = true): model {result['model_gflops_compiled']:.1f} GFLOP/s, matmul "
                   f"{result['matmul_gflops_compiled']:.1f}, ratio {result['ratio_compiled']:.3f} "
                   f"({result['compiled_over_eager']:.2f}x eager; warm-up {result['compile_warmup_s']:.1f} s)")
    if composite_:
        fused, comp = result["model_gflops_fused"], result["model_gflops_composite"]
        typer.echo(f"fused RoPE/RMSNorm {' '.join(f'{v:.1f}' for v in fused)} against composite "
                   f"{' '.join(f'{v:.1f}' for v in comp)} GFLOP/s, alternated: "
                   f"{result['fused_over_composite']:.3f}x (medians)")
    if profile:
        prof = result["profile"]
        typer.echo(f"a step under the profiler: {prof['ms_per_step']:.0f} ms (self CPU time, profiler overhead included)")
        for name, frac in sorted(prof["fraction"].items(), key=lambda kv: -kv[1]):
            ops = ", ".join(f"{op.removeprefix('aten::')} {t:.0f} ms" for op, t in prof["top_ops_ms"][name].items())
            typer.echo(f"  {name:26s} {100 * frac:5.1f}%  {prof['ms'][name]:7.1f} ms   ({ops})")


QUICKSTART = Path(__file__).parent / "quickstart.toml"


_NAME_HELP = ("Run the study as another sweep of this name, in an MLflow experiment of this name "
              "(its fits apart from the first sweep's); the same --name again resumes it.")
_NEW_HELP = "Run the study as a new sweep, named <study>-2 (then -3, ...): the first name this workspace has not used."


@app.command("run")
@user_errors
def run_cmd(
    spec: Path = typer.Argument(QUICKSTART, help="Study spec (default: studies/quickstart.toml)."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace directory."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny version of the study (seconds)."),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the intervals."),
    address: str = typer.Option(None, help="Ray cluster to join: 'auto' or ray://head:10001 (default: local)."),
    storage: str = typer.Option(None, help="Tune storage shared by all nodes (path or s3://...)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: the workspace's SQLite store)."),
    name: str = typer.Option(None, "--name", help=_NAME_HELP),
    new: bool = typer.Option(False, "--new", help=_NEW_HELP),
) -> None:
    """Everything on the embedded default: the sweep (local Ray, SQLite MLflow in the workspace),
    the fits, the HTML report and a summary. Re-running after an interruption resumes; --name or
    --new runs the study once more as a sweep of its own. The cluster options are moue sweep's.

    Example: moue run studies/quickstart.toml
    """
    from moue.analysis.report import write_report
    from moue.studies.runner import Workspace, sweep_name
    from moue.studies.spec import load_study
    from moue.studies.stages import run_stages

    study = load_study(spec, smoke=smoke, as_name=_sweep_as(spec, name, new, workspace, smoke))
    ws = Workspace.at(workspace)
    staged = run_stages(study, workspace=ws, echo=typer.echo, bootstrap=bootstrap,
                        sweep=lambda s, resume: _shown(_sweep(s, workspace=workspace, resume=resume, address=address,
                                                              storage=storage, tracking_uri=tracking_uri)))
    if staged.main is None:
        fail(staged.stopped, code=1)
    outcome = staged.main
    out = ws.reports / f"{sweep_name(study)}.html"
    # the fits' notes come back as res.notes (nothing is warned), printed once below
    res = write_report(study.experiment, tracking_uri=outcome.tracking_uri, output=out, laws=study.laws,
                       parent_run_id=outcome.parent_run_id, n_bootstrap=bootstrap, seed=0, lr_rule=staged.rule,
                       margin_pct=study.margin_pct, comparisons=study.comparisons)
    from moue.studies.tracking import log_study_summary

    best = log_study_summary(outcome.tracking_uri, outcome.parent_run_id, statuses=outcome.statuses, fits=res.fits,
                             headline=res.headline, skipped=res.skipped)
    typer.echo("")
    typer.echo(res.runs_line())
    if best is not None:
        typer.echo(f"best trial: {best['run_name']} (final val loss {best['val_loss']:.4f})")
    _print_laws(res.fits)
    for test in res.tests.values():
        typer.echo(f"{test.law} vs {test.nested} (likelihood-ratio test: does the V term fit better than chance "
                   f"would?): statistic {test.lr_stat:.2f} (df {test.df}), p = {test.p_value:.3g}; "
                   f"AIC {test.aic:.1f} vs {test.aic_nested:.1f}")
    typer.echo(_virtual_width_line(res))
    for line in res.decision_lines():
        typer.echo(line)
    for name, why in res.skipped.items():
        typer.echo(f"{name}: not fitted: {why}")
    for note in res.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"\nreport: {res.path}")
    typer.echo(f"browse the runs: moue ui --workspace {workspace}   (MLflow UI on http://127.0.0.1:5000)")


def _shown(outcome):
    _print_outcome(outcome)
    return outcome


def _virtual_width_line(res) -> str:
    """One line: what virtual width did, from the first identified law with a V term (its V
    parameters with 95% intervals and the likelihood-ratio test against the law without V)."""
    for test in res.tests.values():
        fit = res.fits.get(test.law)
        if fit is None or not fit.verdict.identified:
            continue
        extra = [k for k in fit.params if k not in _nested_params(fit)]
        terms = ", ".join(f"{k} = {fit.params[k]:.3g} [{fit.ci[k][0]:.3g}, {fit.ci[k][1]:.3g}]" for k in extra if k in fit.ci)
        helps = "helps" if test.p_value < 0.05 else "is not shown to help"
        return (f"virtual width: {test.law}: {terms} (95% bootstrap intervals); likelihood-ratio test against "
                f"{test.nested}: p = {test.p_value:.3g}, so at this scale virtual width {helps}")
    v_laws = [n for n in res.tests if n in res.fits]
    if not v_laws:
        return "virtual width: no law with a V term was fitted"
    return ("virtual width: no law with a V term is identified by these runs (" +
            "; ".join(f"{n}: {res.fits[n].verdict.reasons[0]}" for n in v_laws) + ")")


def _nested_params(fit) -> tuple[str, ...]:
    nested = fit.law_spec.nested_law
    return () if nested is None else tuple(nested.natural)


def _print_laws(fits) -> None:
    """Identified laws first, as results; the others apart, with their reasons, never as a result."""
    from moue.analysis.report import law_lines

    for line in law_lines(fits):
        typer.echo(line)


@app.command("sweep")
@user_errors
def sweep_cmd(
    spec: Path = typer.Argument(..., help="Study spec (studies/*.toml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a crashed or interrupted sweep."),
    address: str = typer.Option(None, help="Ray cluster to join: 'auto' or ray://head:10001 (default: local)."),
    storage: str = typer.Option(None, help="Tune storage shared by all nodes (path or s3://...)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: the workspace's SQLite store)."),
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace directory."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny model, few tokens: check the study end to end."),
    dry_run_: bool = typer.Option(False, "--dry-run", help="Print every trial and its compute; launch nothing."),
    name: str = typer.Option(None, "--name", help=_NAME_HELP),
    new: bool = typer.Option(False, "--new", help=_NEW_HELP),
) -> None:
    """Run a study's sweep on Ray Tune, logging every trial to MLflow.

    Example: moue sweep studies/smoke.toml --dry-run
    """
    from moue.studies.spec import load_study

    as_name = _sweep_as(spec, name, new, workspace, smoke)
    study = load_study(spec, smoke=smoke, as_name=as_name)
    if dry_run_:
        if study.lr_stage is not None:
            _print_dry_run(load_study(spec, smoke=smoke, stage="lr", as_name=as_name))
            typer.echo("then the main stage, at the rule the LR stage fits (shown here at the spec's space.lr_rule):")
        _print_dry_run(study)
        return
    if study.lr_stage is None:
        _print_outcome(_sweep(study, workspace=workspace, resume=resume, address=address, storage=storage,
                              tracking_uri=tracking_uri))
        return
    from moue.studies.runner import Workspace
    from moue.studies.stages import run_stages

    staged = run_stages(study, workspace=Workspace.at(workspace), echo=typer.echo,
                        sweep=lambda s, resume_: _shown(_sweep(s, workspace=workspace, resume=resume_, address=address,
                                                               storage=storage, tracking_uri=tracking_uri)))
    if staged.main is None:
        fail(staged.stopped, code=1)


def _sweep_as(spec: Path, name: str | None, new: bool, workspace: Path, smoke: bool) -> str | None:
    """The sweep's name for ``--name`` / ``--new`` (``None``: the spec's)."""
    if name is not None and new:
        fail(f"--new ({new}) and --name ({name!r}) exclude each other: --new picks a name, --name gives one")
    if not new:
        return name
    from moue.studies.spec import load_study
    from moue.studies.workspace import Workspace

    base = load_study(spec, smoke=smoke).name
    ray = Workspace.at(workspace).ray
    used = {p.name for p in ray.iterdir()} if ray.is_dir() else set()
    for k in range(2, 10_000):
        candidate = f"{base}-{k}"  # its sweeps: <candidate>[_lr...][-smoke]
        if not any(u in (candidate, f"{candidate}-smoke") or u.startswith(f"{candidate}_lr") for u in used):
            typer.echo(f"a new sweep of {base}: {candidate}")
            return candidate
    fail(f"--new: no free name {base}-2 ... in {ray}")


def _sweep(study, *, workspace: Path, resume: bool, address, storage, tracking_uri):
    from moue.studies import reaper
    from moue.studies.runner import Workspace, run_sweep

    if tracking_uri:
        from moue.studies.tracking import check_tracking_uri

        check_tracking_uri("--tracking-uri", tracking_uri)
    for family, why in study.lost_families():
        typer.echo(f"note: the constraints pruned every {family} point of this study ({why}); "
                   "`--dry-run` lists them", err=True)
    reaper.start()  # the local cluster's processes end with this command, however it ends
    return run_sweep(study, workspace=Workspace.at(workspace), resume=resume, address=address,
                     storage=storage, tracking_uri=tracking_uri)


def _print_outcome(outcome) -> None:
    states = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items()))
    best = "n/a" if outcome.best_val_loss is None else f"{outcome.best_val_loss:.4f}"
    typer.echo(f"sweep {outcome.name}: {outcome.trials} trials ({states}) in {outcome.wall_s:.0f} s; "
               f"best val loss {best}")
    typer.echo(f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id}, {outcome.tracking_uri}")
    unfinished = {k: n for k, n in outcome.statuses.items() if k not in ("finished", "early_stopped", "diverged")}
    hint = f" ({', '.join(f'{n} {k}' for k, n in unfinished.items())}: moue sweep ... --resume retries them)" \
        if unfinished else ""
    typer.echo(f"Tune state: {outcome.storage}{hint}")
    if outcome.design is not None:
        from moue.analysis.design_report import design_line

        typer.echo(design_line(outcome.design))



def _print_dry_run(study) -> None:
    from moue.studies.runner import dry_run

    rows, totals = dry_run(study)
    typer.echo(f"study {study.name}{' (smoke)' if study.smoke else ''}: space {study.search.space}, "
               f"{study.search.algorithm}, {' / '.join(f'{b:,}' for b in study.budgets)} tokens per trial, "
               f"scheduler {study.scheduler.kind}")
    for row in rows:
        settings = " ".join(f"{k}={v}" for k, v in row["point"].items())
        typer.echo(f"  #{row['trial']:<3} {row['family']:<10} active {row['active']:>10,}  total {row['total']:>10,}  "
                   f"V {row['virtual_width']:>4}  compute {row['compute']:.3g}  {settings}")
    for point, why in study.pruned:
        settings = " ".join(f"{k}={v}" for k, v in point.items())
        typer.echo(f"  pruned: {settings}: {why}")
    early = " (at most: ASHA stops some trials early)" if study.scheduler.kind == "asha" else ""
    if "design" in totals:
        early = " (at most: the adaptive design below chooses which to train)"
    typer.echo(f"total: {totals['trials']} trials, {totals['tokens']:,} tokens, {totals['compute']:.3g} FLOPs{early}, "
               f"{totals['pruned']} grid points pruned")
    if any(r["active"] > r["total"] for r in rows):
        typer.echo("note: active counts a weight once per layer that applies it (the N of C = 6ND), so a model "
                   "that reuses weights across depth can have active > total (moue_core/counting.py)")
    typer.echo(_estimate_line(study, [r["plan"] for r in rows]) + early)
    for line in totals.get("design", ()):
        typer.echo(line)


def _estimate_line(study, plans) -> str:
    """The sweep's estimated wall time on this machine (``moue.studies.estimate``), or why there is none."""
    import os

    from moue.studies.estimate import estimate_sweep, on_gpu
    from moue.studies.runner import concurrency_of

    if on_gpu(plans):
        return "estimated wall time: none (the trials run on a GPU; the estimate times CPU steps)"
    return estimate_sweep(plans, concurrency=concurrency_of(study, os.cpu_count() or 1), marks=study.marks).line()


@app.command("studies")
def studies_cmd() -> None:
    """List the shipped studies.

    Example: moue studies
    """
    import tomllib

    from moue.studies.spec import shipped_studies

    for path in shipped_studies():
        doc = tomllib.loads(path.read_text())
        search = doc.get("search", {})
        typer.echo(f"{path.stem:16} {search.get('space', '?'):15} {search.get('algorithm', 'grid'):6} "
                   f"{doc.get('description', '')}")


@app.command("ui")
def ui_cmd(
    workspace: Path = typer.Option(DEFAULT_WORKSPACE, help="Workspace whose store to browse."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind: 127.0.0.1 (this machine only, the default), "
                             "or e.g. 0.0.0.0 for every interface. MLflow's UI has no authentication: "
                             "anyone who reaches it can read and edit the runs."),
    port: int = typer.Option(5000, help="Port (1-65535)."),
    wait_s: float = typer.Option(120.0, "--wait-s", help="How long to wait for the server to answer."),
) -> None:
    """Start the MLflow UI on the workspace's tracking store (bound to 127.0.0.1 by default).

    The URL is printed once the server answers. Ctrl-C or SIGTERM stops the server and its workers.

    Example: moue ui --workspace moue_runs --port 5001
    """
    import subprocess

    db = workspace.resolve() / "mlflow.db"
    if not db.is_file():
        fail(f"--workspace ({str(workspace)!r}) has no mlflow.db yet; run a sweep first")
    if not 1 <= port <= 65535:
        fail(f"--port ({port}) must be in 1..65535")
    field, why = _cannot_listen(host, port)
    if field == "host":
        fail(f"--host ({host!r}) is not an address this machine can listen on ({why}); "
             "use 127.0.0.1, or 0.0.0.0 for every interface")
    if field == "port":
        fail(f"--port ({port}) cannot be listened on at {host} ({why}); choose a free port")
    if why:
        fail(f"cannot listen on {host}:{port} ({why})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
           "--host", host, "--port", str(port)]
    from moue.studies import reaper
    from moue.studies.tracking import server_env

    reaper.start()  # the server and its workers end with this command, however it ends
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=server_env())
    try:
        probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if not _wait_for_health(f"http://{probe}:{port}/health", proc, wait_s):
            code = proc.poll()
            if code is None:  # still running, never answered
                proc.terminate()
                typer.echo(f"error: the MLflow UI did not answer on {host}:{port} within {wait_s:g} s", err=True)
                raise typer.Exit(1)
            err = proc.stderr.read() or ""
            last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "no output")
            typer.echo(f"error: the MLflow UI on {host}:{port} exited before it answered (exit {code}: {last})",
                       err=True)
            raise typer.Exit(1)
        where = " (every interface; no authentication)" if probe != host else ""
        typer.echo(f"MLflow UI on http://{host}:{port}{where} (Ctrl-C stops it)")
        for name, url in _study_views(f"sqlite:///{db}", f"http://{host}:{port}"):
            typer.echo(f"  {name}: {url}")
        _drain(proc.stderr)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = 0
    raise typer.Exit(code)


def _study_views(uri: str, base: str) -> list[tuple[str, str]]:
    """Each study experiment of the store and the URL of its runs in the model-training view."""
    from mlflow import MlflowClient

    from moue.tracking_contract import VIEW_TAG, view_url

    return [(e.name, view_url(base, e.experiment_id)) for e in MlflowClient(uri).search_experiments()
            if VIEW_TAG in e.tags]


def _cannot_listen(host: str, port: int) -> tuple[str, str]:
    """``(field, why)`` when ``host:port`` cannot be listened on now (``("", "")`` when it can):
    ``port`` (in use, or privileged), ``host`` (not an address of this machine), or ``""`` with a
    reason (``why``) for anything else. Checked before the server starts and bound exactly as the server
    (uvicorn, under ``mlflow ui``) binds: IPv6 only for a host with a colon, ``SO_REUSEADDR`` (only
    a socket bound there fails it). A taken port is then an error at once, rather than a server
    that never answers."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror as e:
        return "host", e.strerror
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            return "port", why
        if e.errno == errno.EACCES:
            return "port", f"{why}: ports below 1024 need privileges"
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
            return "host", why
        return "", why
    return "", ""


def _wait_for_health(url: str, proc, wait_s: float) -> bool:
    """Whether ``url`` answers 200 before ``wait_s`` passes or ``proc`` exits."""
    import time
    import urllib.request

    end = time.monotonic() + wait_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.25)
    return False


def _drain(stream) -> None:
    """Read ``stream`` to its end in a thread (the server's log is not shown; a full pipe would block it)."""
    import threading

    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


@bench_app.command("sweep")
@user_errors
def bench_sweep_cmd(
    spec: Path = typer.Argument(Path(__file__).parent / "smoke.toml", help="Study spec (default: smoke)."),
    smoke: bool = typer.Option(False, "--smoke", help="Run the study's smoke version."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Sweep efficiency (training-step time / wall x concurrency) and per-trial overhead.

    The study runs fresh in a temporary workspace; efficiency counts only time inside training
    steps (evaluation, start-up, checkpoints and Ray scheduling are overhead).

    Example: moue bench sweep studies/quickstart.toml --json
    """
    import tempfile

    from moue.studies.runner import Workspace, run_sweep
    from moue.studies.spec import load_study

    import contextlib

    study = load_study(spec, smoke=smoke)
    # Ray prints its experiment table to stdout; keep stdout for the result alone
    with tempfile.TemporaryDirectory(prefix="moue-bench-sweep-") as tmp, contextlib.redirect_stdout(sys.stderr):
        outcome = run_sweep(study, workspace=Workspace.at(tmp))
    slots = outcome.wall_s * outcome.concurrency
    result = {
        "study": study.name, "smoke": smoke, "trials": outcome.trials, "concurrency": outcome.concurrency,
        "wall_s": outcome.wall_s, "train_s": outcome.train_s, "efficiency": outcome.train_s / slots,
        "overhead_s_per_trial": (slots - outcome.train_s) / max(1, outcome.trials), "statuses": outcome.statuses,
    }
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{study.name}: {outcome.trials} trials, {outcome.concurrency} at a time, wall {outcome.wall_s:.1f} s")
    typer.echo(f"efficiency {result['efficiency']:.3f} (training-step time {outcome.train_s:.1f} s of "
               f"{slots:.1f} slot-seconds); overhead {result['overhead_s_per_trial']:.2f} s per trial")


@bench_app.command("scale")
@user_errors
def bench_scale_cmd(
    counts: str = typer.Option("1000,10000", "--counts", help="The two experiment sizes (trial runs), small,large."),
    driver_trials: int = typer.Option(64, "--driver-trials", help="Simulated trials at once for the driver's cost."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of each fit."),
    server: bool = typer.Option(True, "--server/--no-server", help="Also time the driver against a loopback mlflow server."),
    fresh: bool = typer.Option(False, "--fresh", help="Log the experiments again (default: reuse those an earlier run "
                               "cached in ~/.cache/moue/bench-scale)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """How moue's own costs grow with the number of trials: the driver's cost per result, loading
    and fitting 1,000 and 10,000 logged runs, and planning a grid of that many points.

    The driver's callbacks serve simulated trials against a real SQLite store and a loopback mlflow
    server; the runs are logged by moue's own tracker into a real SQLite store (kept in the cache:
    logging 10,000 runs takes minutes). Nothing is trained.

    Example: moue bench scale --json
    """
    from moue.studies.bench_scale import run_scale_bench

    try:
        small, large = (int(c) for c in counts.split(","))
    except ValueError:
        fail(f"--counts ({counts!r}) must be two trial counts, small,large, e.g. 1000,10000")
    if not 0 < small < large:
        fail(f"--counts ({counts!r}) must be two counts with 0 < small < large")
    if driver_trials < 1:
        fail(f"--driver-trials ({driver_trials}) must be >= 1")
    if bootstrap < 0:
        fail(f"--bootstrap ({bootstrap}) must be >= 0")
    run_scale_bench(counts=(small, large), driver_trials=driver_trials, n_bootstrap=bootstrap, json=json_out,
                    server=server, cache=None if fresh else "default", stream=sys.stdout)


@app.command("convert")
@user_errors
def convert_cmd(
    checkpoint: Path = typer.Argument(..., help="Layerwise MoE checkpoint (.pt) with 'config' and 'model'."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the converted checkpoint."),
    window: int = typer.Option(..., "--window", help="Target window w (experts per layer E <= w <= L*E)."),
    router_init: str = typer.Option("zero", help="Router rows of newly visible experts: zero or copy."),
) -> None:
    """Convert a layerwise MoE checkpoint into a MoUE-style model with identical logits at w = E.

    The input holds {'config': ModelConfig fields (window = experts per layer), 'model': state dict
    of moue_core.LayerwiseMoEModel}; it is loaded with weights_only=True.

    Example: moue convert layerwise.pt -o moue.pt --window 16
    """
    blob = _load_checkpoint(checkpoint, output)
    import torch

    from moue import ModelConfig, convert_layerwise

    source = ModelConfig.from_dict(blob["config"])
    cfg, state = convert_layerwise(blob["model"], source, target_window=window, router_init=router_init)
    torch.save({"config": cfg.to_dict(), "model": state, "start_window": source.window}, output)
    typer.echo(f"wrote {output}: pool {cfg.pool_size}, window {source.window} -> {cfg.window}, "
               f"stride {cfg.stride}")


def _load_checkpoint(checkpoint: Path, output: Path) -> dict:
    """``{'config', 'model'}`` of a user's checkpoint (``weights_only=True``); user errors exit 2."""
    if not checkpoint.is_file():
        fail(f"checkpoint ({str(checkpoint)!r}) must be an existing file")
    if output.exists():
        fail(f"--output ({str(output)!r}) already exists; choose a new path")
    import torch

    try:
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user error
        fail(f"checkpoint ({str(checkpoint)!r}) is not a readable torch checkpoint: {exc}".splitlines()[0])
    if not isinstance(blob, dict) or "config" not in blob or "model" not in blob:
        fail(f"checkpoint ({str(checkpoint)!r}) must hold the keys 'config' and 'model'")
    return blob


@app.command("upcycle")
@user_errors
def upcycle_cmd(
    checkpoint: Path = typer.Argument(..., help="Dense model checkpoint (.pt) with 'config' and 'model'."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the upcycled checkpoint."),
    sets: list[str] = typer.Option([], "--set", help="Target model field, e.g. --set pool_size=16 (repeatable)."),
    noise: float = typer.Option(0.0, "--noise", help="Relative noise on the expert copies (0: exact copies)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the router initialisation and the noise."),
) -> None:
    """Upcycle a dense model into an MoE: every expert starts as a copy of the dense FFN.

    The target is the source's config with ffn = moe, expert_hidden = the source's dense_hidden,
    and the --set fields (pool_size, window, stride, router, ...). Loaded with weights_only=True.

    Example: moue upcycle dense.pt -o moe.pt --set pool_size=16 --set window=4 --set stride=4 --noise 0.01
    """
    blob = _load_checkpoint(checkpoint, output)
    import torch

    from moue import ModelConfig, upcycle_dense

    source = ModelConfig.from_dict(blob["config"])
    changes: dict = {"ffn": "moe", "expert_hidden": source.dense_hidden}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--set ({item!r}) must be FIELD=VALUE, e.g. pool_size=16")
        try:
            changes[key.removeprefix("model.")] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key.removeprefix("model.")] = raw
    target = ModelConfig.from_dict({**source.to_dict(), **changes, "z_loss_coef": changes.get("z_loss_coef")})
    state = upcycle_dense(blob["model"], source, target, noise=noise, seed=seed)
    torch.save({"config": target.to_dict(), "model": state}, output)
    typer.echo(f"wrote {output}: {target.pool_size} experts (window {target.window}, stride {target.stride}) "
               f"from the dense FFN, noise {noise}")


from moue.analysis.cli import register as _register_analysis  # noqa: E402 - cheap: analysis imports lazily

_register_analysis(app, bench_app)


def quiet_libraries() -> None:
    """No MLflow or alembic INFO lines (database creation, migrations) on a researcher's console:
    warnings and errors still show. Ray Tune's run loop (``ray.tune.tune``) is silenced: its
    "interrupted ... Resume experiment with: Tuner.restore(...)" advice and "Trials did not
    complete" list are said by moue in its own words (the same command resumes)."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars either
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run ... at" per run on a server
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    quiet_libraries()
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
