"""The ``orchestrate`` command line: list, sweep, report, ui, features, cluster validate, sync, server."""

from __future__ import annotations

import math
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click

from orchestrator.errors import UsageError


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _use_spaces(ctx, param, folders) -> None:
    from orchestrator.registry import set_spaces_dirs

    set_spaces_dirs(folders)
    ctx.meta["spaces"] = [str(Path(f).expanduser().resolve()) for f in folders]  # for the --resume line


def _finite(ctx, param, value):
    """click's FloatRange lets nan and inf through (every comparison with nan is false)."""
    if value is not None and not math.isfinite(value):
        raise UsageError(f"--{param.name.replace('_', '-')} {value}: not a finite number")
    return value


spaces_option = click.option(
    "--spaces", multiple=True, metavar="DIR", expose_value=False, callback=_use_spaces,
    help="A folder of your own family YAMLs, searched before $ORCHESTRATE_SPACES_DIR and the shipped ones (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run ablation studies as Ray Tune sweeps, logged to MLflow, reported as tables."""


@main.command("list")
@spaces_option
def list_cmd() -> None:
    """Families and their studies, one line each with what the study varies; a family that is
    not shipped says where it comes from."""
    from orchestrator.registry import families
    from orchestrator.spaces import describe_study, load_family_file, load_study

    lines = []  # every family file is read before anything is printed: a broken one is the only line
    for family, file in families().items():
        doc = load_family_file(family)
        origin = "" if file.shipped else f" [{file.path} via {file.origin}]"
        lines.append(f"{family}: {doc.get('description', '')}{origin}")
        for name in doc["studies"]:
            study = load_study(family, name)
            default = " (default)" if name == doc.get("default_study") else ""
            lines.append(f"  {name}{default}: {study.description} [{describe_study(study)}; {study.num_trials} trials]")
    click.echo("\n".join(lines))


@main.command()
@click.argument("family")
@spaces_option
@click.option("--study", "-s", help="Study name from search_spaces/FAMILY.yaml (default: the file's default_study).")
@click.option("--dataset", help="digits | cifar10 | cifar100 | imagefolder:PATH (folder or zip).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started here).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option("--storage", help="Where Tune keeps results and checkpoints "
              "(default: $ORCHESTRATE_STORAGE, else ./runs; shared storage on a cluster).")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              callback=_finite)
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0.0, show_default=True, callback=_finite,
              help="Fractions pack several trials on one GPU, e.g. 0.25.")
@click.option("--max-concurrent", type=click.IntRange(min=0), default=0, help="Cap on trials running at once (0: no cap).")
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, metavar="[SWEEP_ID]",
              help="Finish an interrupted sweep (the latest of this family/study, or the one named).")
@click.option("--seeds", "seeds_text", metavar="N|S1,S2,...",
              help="Seeds in place of the study's: a count (5: seeds 0..4) or a list (3,7,11).")
@click.option("--dry-run", is_flag=True, help="Print the trials that would run (and a time estimate) and exit.")
@click.option("--no-report", is_flag=True, help="Skip writing the report after the sweep.")
@click.option("--verbose", "-v", count=True, help="Also Tune's own tables and per-trial boxes, Ray's and MLflow's "
              "info logs (-vv: and every result of every trial).")
@click.option("--until-decided", is_flag=True, help="Add seeds in rounds to the cells the study's claims compare until "
              "each is VALIDATED or INVALIDATED (group-sequential, see docs/statistics.md) or --max-seeds is reached.")
@click.option("--max-seeds", type=int, help="With --until-decided: seeds per cell at most (default 10).")
@click.option("--batch", type=int, help="With --until-decided: seeds added per round (default 2).")
def sweep(family, study, dataset, sets, address, tracking_uri, storage, cpus_per_trial, gpus_per_trial,
          max_concurrent, resume, seeds_text, dry_run, no_report, verbose, until_decided, max_seeds, batch) -> None:
    """Run every trial of a FAMILY's study through Ray Tune and log it to MLflow. Ctrl-C (or
    SIGTERM) stops it, keeps what finished and prints the command that resumes it."""
    from orchestrator.spaces import load_study

    overrides = _parse_sets(sets)
    if dataset:
        overrides["dataset"] = dataset
    seeds = _parse_seeds(seeds_text)
    spec = load_study(family, study, overrides, seeds=seeds)
    if (max_seeds is not None or batch is not None) and not until_decided:
        raise UsageError("--max-seeds and --batch go with --until-decided")
    if until_decided:
        from orchestrator.until_decided import check_until_decided_options

        check_until_decided_options(spec, max_seeds, batch)
    if dry_run:
        _print_plan(spec, storage)
        return
    from orchestrator.progress import console, interruptions
    from orchestrator.runner import SweepOptions, run_sweep

    opts = SweepOptions(address=address, tracking_uri=tracking_uri, storage=storage, cpus_per_trial=cpus_per_trial,
                        gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent, resume=resume,
                        verbose=verbose, seeds=seeds, no_report=no_report)
    if until_decided:
        from orchestrator.until_decided import sweep_until_decided

        with console(verbose), interruptions():
            sys.exit(sweep_until_decided(spec, opts, max_seeds, batch, no_report, click.echo))
    with console(verbose), interruptions() as signals:
        try:
            outcome = run_sweep(spec, opts)
            report_path = None
            if outcome.complete and not no_report:
                from orchestrator.report import write_sweep_report

                report_path = write_sweep_report(outcome, spec)
        except KeyboardInterrupt:  # outside Tune's graceful stop: starting up, a second Ctrl-C, the report
            click.echo(f"interrupted by {signals.name}; resume with: {_resume_command(family, spec.name, None)}")
            sys.exit(signals.exit_code)
    if not outcome.complete:
        _print_interrupted(outcome, spec, signals.name)
        sys.exit(signals.exit_code)
    _print_headline(outcome, spec)
    click.echo(f"{outcome.trials} trials ({outcome.errored} errored, {outcome.diverged} diverged) in sweep {outcome.sweep_id}")
    click.echo(f"results: {outcome.experiment_path}")
    click.echo(f"mlflow:  {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    if report_path:
        click.echo(f"report:  {report_path}")
    if outcome.errored:
        sys.exit(1)


def _parse_seeds(text: str | None) -> list[int] | None:
    """``5`` -> seeds 0..4; ``3,7,11`` -> those seeds. Counts start at 1, seeds at 0, no repeats."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"-?\d+", part) for part in parts):
        raise UsageError(f"--seeds {text}: expected a count (5) or a comma-separated list of seeds (3,7,11)")
    values = [int(part) for part in parts]
    if len(values) == 1:
        if values[0] < 1:
            raise UsageError(f"--seeds {text}: a count of seeds must be at least 1")
        return list(range(values[0]))
    if min(values) < 0:
        raise UsageError(f"--seeds {text}: seeds must be >= 0")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(f"--seeds {text}: seed {', '.join(map(str, repeated))} given twice")
    return values


def _resume_command(family: str, study: str, sweep_id: str | None) -> str:
    """The command line that resumes this sweep: this command's options as given (so the
    resumed run sees the same study, store and storage), ``--resume`` naming the sweep."""
    ctx = click.get_current_context()
    words = ["orchestrate", "sweep", family, "--study", study]
    for folder in ctx.meta.get("spaces", []):
        words += ["--spaces", folder]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if (not isinstance(param, click.Option) or param.name in ("study", "resume", "dry_run", "verbose")
                or value in (None, False, ()) or value == param.default):
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            words.append(flag)
        else:
            words += [w for item in (value if param.multiple else [value]) for w in (flag, str(item))]
    words += ["--resume"] + ([sweep_id] if sweep_id else [])
    return shlex.join(words)


def _print_interrupted(outcome, spec, signal_name: str) -> None:
    """What an interrupted sweep did and did not do, and how to finish it."""
    from orchestrator.progress import group_by_cell

    done, total = len(outcome.finished), len(outcome.finished) + len(outcome.unfinished) + outcome.not_created
    click.echo(f"interrupted by {signal_name}: {done} of {total} trials finished, {total - done} did not; "
               "the sweep is incomplete (no report written)")
    click.echo(f"  finished: {'; '.join(group_by_cell(outcome.finished)) or 'none'}")
    click.echo(f"  not finished: {'; '.join(group_by_cell(outcome.unfinished)) or 'none'}"
               + (f" (+{outcome.not_created} not started)" if outcome.not_created else ""))
    click.echo(f"resume with: {_resume_command(spec.family, spec.name, outcome.sweep_id)}")
    click.echo(f"results: {outcome.experiment_path}")
    click.echo(f"mlflow:  {outcome.tracking_uri} (parent run {outcome.parent_run_id}, KILLED)")


def _print_headline(outcome, spec) -> None:
    """The headline table report.md opens with (the same numbers, read back from MLflow), with
    its caption and footnotes; the sentences that read it stay in the report, so that the
    console fits on one screen."""
    from orchestrator.report import headline_text
    from orchestrator.tracking import warn

    try:
        text = headline_text(outcome, spec)
    except Exception as exc:  # noqa: BLE001 - the sweep is done and on disk; the table is a courtesy
        warn(f"no headline table ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return
    block = first_table(text)
    if block:
        click.echo("\n".join(block) + "\n")


def first_table(markdown: str) -> list[str]:
    """The first markdown table of ``markdown``, the bold caption above it and the bullet
    notes right below it."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    caption = [line for line in lines[max(start - 2, 0):start] if line.startswith("**")]
    after = lines[end + 1:] if end < len(lines) and not lines[end].strip() else lines[end:]
    notes = list(itertools.takewhile(lambda line: line.startswith("- "), after))
    return caption + lines[start:end] + notes


def _print_plan(spec, storage: str | None = None) -> None:
    from orchestrator.cluster import STORAGE_ENV
    from orchestrator.estimate import estimate_line

    n = len(spec.seeds)
    click.echo(f"{spec.family}/{spec.name}: {spec.num_trials} trials ({n} seed{'s' if n > 1 else ''}: "
               f"{', '.join(map(str, spec.seeds))}); search={spec.search} scheduler={spec.scheduler}"
               f"; eval axes: {spec.eval_axes or 'none'}")
    click.echo(estimate_line(storage or os.environ.get(STORAGE_ENV) or "runs", spec.family, spec.name, spec.num_trials))
    varying = sorted(set(spec.grid) | set(spec.space) | set(spec.derive) | {"seed"})
    for i, cfg in enumerate(spec.trial_configs()):
        click.echo(f"  trial {i:3d}: " + " ".join(f"{k}={cfg[k]}" for k in varying))
    if spec.space and spec.search != "optuna" and spec.samples > 1:
        click.echo(f"  (each drawn {spec.samples} times from the space)")
    elif spec.search == "optuna":
        click.echo(f"  ({spec.samples} trials suggested by Optuna)")


@main.command()
@click.argument("families", nargs=-1, metavar="[FAMILY ...]")
@spaces_option
@click.option("--all", "every", is_flag=True, help="Every family with runs in the store, plus a cross-family summary.")
@click.option("--study", "-s", help="Only this study.")
@click.option("--sweep", "sweep_id", help="Only this sweep id (default: the latest sweep of each study).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="Write the report here instead of stdout.")
@click.option("--format", "fmt_name", type=click.Choice(["markdown", "csv", "json"]), default="markdown", show_default=True,
              help="csv: one row per study, cell and metric (n, mean, sd, 95% CI).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False),
              help="Write PNG plots here and link them (default with --out FILE.md: FILE_plots/).")
@click.option("--across", metavar="PARAM", help="Rank the methods across the values of PARAM (e.g. dataset): "
              "Friedman + Nemenyi with a critical-difference diagram, IQM and P(X > Y) (docs/statistics.md).")
def report(families, every, study, sweep_id, tracking_uri, out, fmt_name, plots_dir, across) -> None:
    """Consolidated tables, claims and plots for FAMILY (or --all) from MLflow: mean +- 95%
    t-interval over seeds (n shown), paired tests against the baseline with Holm correction."""
    from orchestrator.report import write_report
    from orchestrator.tracking import check_tracking_uri, default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())
    check_tracking_uri(uri)
    text, lines = write_report(uri, list(families), every, study, sweep_id, out, fmt_name, plots_dir, across)
    if text is not None:
        click.echo(text, nl=False)
    for line in lines:
        click.echo(line)


@main.command()
@click.option("--tracking-uri", help="Store to browse (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(tracking_uri, host, port) -> None:
    """The MLflow UI over the same store the sweeps log to."""
    from orchestrator.tracking import default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())
    if uri.startswith("http"):
        raise UsageError(f"{uri} is already a tracking server: open it in a browser")
    click.echo(f"MLflow UI on http://{host}:{port} over {uri}")
    raise SystemExit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", host, "--port", str(port)]))


@main.group()
def cluster() -> None:
    """Ray cluster-launcher configs for GPU clusters (see docs/cluster.md)."""


@cluster.command("validate")
@click.argument("file", default="cluster.yaml", type=click.Path(dir_okay=False))
def cluster_validate(file) -> None:
    """Check FILE against the installed Ray's cluster schema and this project's rules (a GPU
    worker type, setup installing the project, shared storage, a reachable tracking server)."""
    from importlib.metadata import version

    from orchestrator.cluster import validate_cluster_file

    problems = validate_cluster_file(Path(file))
    for problem in problems:
        click.echo(f"{file}: {problem}", err=True)
    if problems:
        raise UsageError(f"{file}: {len(problems)} problem(s)")
    click.echo(f"{file}: valid (Ray {version('ray')} cluster schema and project checks)")


@main.command()
@click.argument("family", required=False)
@spaces_option
@click.option("--sweep", "sweep_id", help="Only this sweep id.")
@click.option("--storage", help="Where the Tune results are (default: $ORCHESTRATE_STORAGE, else ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
def sync(family, sweep_id, storage, tracking_uri) -> None:
    """Log into MLflow whatever it lacks of the sweeps' Tune results on disk (all sweeps of
    FAMILY, or every sweep). Keyed by trial id and step: running it twice adds nothing."""
    from orchestrator.cluster import STORAGE_ENV
    from orchestrator.spaces import load_family_file
    from orchestrator.sync import storage_location, sync_storage
    from orchestrator.tracking import check_tracking_uri, configure_client, default_tracking_uri

    if family:
        load_family_file(family)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path.cwd())
    check_tracking_uri(uri)
    configure_client()
    location = storage_location(storage or os.environ.get(STORAGE_ENV) or "runs")
    for counts in sync_storage(location, uri, family, sweep_id):
        click.echo(counts.line())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address: loopback by default; a private address on a cluster head, never a public one.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--backend-store-uri", help="Run store (default: $MLFLOW_TRACKING_URI if a local store, else ./mlflow.db).")
@click.option("--artifacts-destination", default="mlartifacts", show_default=True, type=click.Path(file_okay=False),
              help="Where the server keeps artifacts it receives.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 16), help="Server processes (SQLite: 1).")
def server(host, port, backend_store_uri, artifacts_destination, workers) -> None:
    """A real MLflow tracking server (SQLite store, served artifacts) for sweeps to log to with
    --tracking-uri http://HOST:PORT. Runs until interrupted."""
    from orchestrator.server import backend_store, serve

    backend = backend_store(backend_store_uri)
    artifacts = Path(artifacts_destination).expanduser().resolve()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host}: whoever reaches it can read and write runs (MLflow has no auth here)", err=True)
    click.echo(f"MLflow tracking server on http://{host}:{port} (store {backend}, artifacts {artifacts}); "
               f"point sweeps at it with --tracking-uri http://{host}:{port} or MLFLOW_TRACKING_URI", err=True)
    raise SystemExit(serve(host, port, backend, artifacts, workers))


@main.command()
@click.argument("dataset")
@click.option("--encoder", "-e", default="own-cnn", show_default=True,
              help="own-cnn (trained once on DATASET's own training split) | resnet18 | resnet50 | clip-vit-b32.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def features(dataset, encoder, device) -> None:
    """Precompute DATASET's frozen-encoder features into the shared cache and print where they are."""
    from trainables.common.data import DataError, validate_spec
    from trainables.common.encoders import check_name
    from trainables.common.features import precompute

    try:
        validate_spec(dataset)
        check_name(encoder)
        paths = precompute(dataset, encoder, device=device)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    for split, path in paths.items():
        click.echo(f"{split}: {path}")


if __name__ == "__main__":
    main()
