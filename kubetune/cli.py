"""The `kubetune` command line."""

from __future__ import annotations

import sys
import textwrap

import click

from kubetune import __version__

OUTPUT_FORMATS = ("table", "json", "yaml")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    default=None,
    help="Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).",
)
@click.option(
    "-n", "--namespace", default=None, help="Namespace (default: the context's, else default)."
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    help="Output format of get, list, models and cancel (default: table).",
)
@click.pass_context
def main(
    ctx: click.Context, kubeconfig: str | None, namespace: str | None, output: str | None
) -> None:
    """Fine-tune language models on Kubernetes."""
    ctx.obj = {"kubeconfig": kubeconfig, "namespace": namespace, "output": output}


@main.group()
def dev() -> None:
    """The local development cluster (real control plane, simulated GPU nodes)."""


@dev.command("up")
@click.option("--name", default="kubetune", show_default=True, help="Cluster name.")
@click.option("--timeout", default=300, show_default=True, help="Seconds to wait for readiness.")
def dev_up(name: str, timeout: int) -> None:
    """Build the control plane if needed, start the cluster and its GPU nodes."""
    from kubetune.dev.cluster import ClusterError, LocalCluster
    from kubetune.dev.tools import ToolsError

    cluster = LocalCluster(name)
    try:
        cluster.up(timeout=timeout)
        click.echo(f"cluster {name!r} is up; kubeconfig: {cluster.kubeconfig}")
        click.echo(f"  export KUBECONFIG={cluster.kubeconfig}\n")
        click.echo(cluster.kubectl("get", "nodes", "-o", "custom-columns=" + _NODE_COLUMNS))
    except (ClusterError, ToolsError) as err:
        raise click.ClickException(str(err)) from err


_NODE_COLUMNS = ",".join(
    [
        "NAME:.metadata.name",
        "READY:.status.conditions[?(@.type=='Ready')].status",
        "POOL:.metadata.labels.kubetune\\.dev/node-pool",
        "GPU:.status.allocatable.nvidia\\.com/gpu",
        "PRODUCT:.metadata.labels.nvidia\\.com/gpu\\.product",
        "CPU:.status.allocatable.cpu",
        "MEMORY:.status.allocatable.memory",
        "TAINTS:.spec.taints[*].key",
    ]
)


@dev.command("down")
@click.option("--name", default="kubetune", show_default=True, help="Cluster name.")
def dev_down(name: str) -> None:
    """Stop the cluster and delete its state."""
    from kubetune.dev.cluster import ClusterError, LocalCluster

    try:
        LocalCluster(name).down()
    except ClusterError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"cluster {name!r} is down")


@dev.command("kubeconfig")
@click.option("--name", default="kubetune", show_default=True, help="Cluster name.")
def dev_kubeconfig(name: str) -> None:
    """Print the path of the cluster's kubeconfig."""
    from kubetune.dev.cluster import LocalCluster

    cluster = LocalCluster(name)
    if not cluster.kubeconfig.is_file():
        raise click.ClickException(f"cluster {name!r} does not exist: run `kubetune dev up`")
    click.echo(str(cluster.kubeconfig))


# --- cluster commands: shared options and output ---------------------------------------


def cluster_options(output: bool = False):
    """--kubeconfig and -n/--namespace (and -o/--output) on a command; unset ones fall back
    to the same options given before the command (`kubetune -n NS get NAME`)."""

    def decorate(fn):
        fn = click.option(
            "--kubeconfig",
            type=click.Path(dir_okay=False),
            default=None,
            help="Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).",
        )(fn)
        fn = click.option("-n", "--namespace", default=None, help="Namespace.")(fn)
        if output:
            fn = click.option(
                "-o",
                "--output",
                type=click.Choice(OUTPUT_FORMATS),
                default=None,
                help="Output format (default: table).",
            )(fn)
        return fn

    return decorate


def _setting(options: dict, key: str) -> str | None:
    if options.get(key) is not None:
        return options[key]
    ctx = click.get_current_context()
    return (ctx.find_root().obj or {}).get(key)


def _cluster(options: dict):
    from kubetune.sdk.cluster import Cluster, ClusterError

    try:
        return Cluster(_setting(options, "kubeconfig"), _setting(options, "namespace"))
    except ClusterError as err:
        raise click.ClickException(str(err)) from err


def _guard():
    """Turn cluster errors into one-line messages."""
    from contextlib import contextmanager

    from kubetune.sdk.cluster import ClusterError

    @contextmanager
    def guard():
        try:
            yield
        except ClusterError as err:
            raise click.ClickException(str(err)) from err

    return guard()


def _emit(options: dict, data, table) -> None:
    """Print `data` as JSON or YAML, or call `table()` for the table format."""
    fmt = _setting(options, "output") or "table"
    if fmt == "json":
        import json

        click.echo(json.dumps(data, indent=2, default=str))
    elif fmt == "yaml":
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        table()


def _columns(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _age(timestamp: str | None) -> str:
    from datetime import UTC, datetime

    if not timestamp:
        return ""
    seconds = int(
        (
            datetime.now(UTC) - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        ).total_seconds()
    )
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _submit(filename, volumes, output_dir, validate_only, follow, options) -> None:
    from kubetune.local import LocalRunError, load_manifest

    if volumes or output_dir or validate_only:
        raise click.ClickException("--volume, --output-dir and --validate-only need --local")
    try:
        job = load_manifest(filename)
    except LocalRunError as err:
        raise click.ClickException(str(err)) from err
    if not (job.metadata or {}).get("name"):
        raise click.ClickException(f"{filename}: metadata.name is required")
    cluster = _cluster(options)
    with _guard():
        created = cluster.create_job(job)
    name = created["metadata"]["name"]
    click.echo(f"finetuningjob/{name} created in namespace {cluster.namespace}")
    if follow:
        _watch(cluster, name, None)


@main.command("train")
@click.option(
    "-f",
    "--filename",
    required=True,
    type=click.Path(dir_okay=False),
    help="FineTuningJob manifest.",
)
@click.option("--local", is_flag=True, help="Train on this machine instead of the cluster.")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="NAME=DIR",
    help="Map a PersistentVolumeClaim to a local folder (default ./<claimName>).",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: the output claim's folder).",
)
@click.option("--validate-only", is_flag=True, help="Check the dataset and stop.")
@click.option("--watch", "follow", is_flag=True, help="Cluster: follow the job until it ends.")
@cluster_options()
def train(
    filename: str,
    local: bool,
    volumes: tuple[str, ...],
    output_dir: str | None,
    validate_only: bool,
    follow: bool,
    **options: str | None,
) -> None:
    """Train a FineTuningJob manifest: submit it to the cluster, or with --local, train
    on this machine."""
    if not local:
        _submit(filename, volumes, output_dir, validate_only, follow, options)
        return
    from pathlib import Path

    from kubetune.local import (
        LocalRunError,
        build_local_run,
        load_manifest,
        parse_volumes,
        run_local,
    )

    try:
        job = load_manifest(filename)
        run = build_local_run(job, parse_volumes(volumes), Path(output_dir) if output_dir else None)
    except LocalRunError as err:
        raise click.ClickException(str(err)) from err
    code, termination = run_local(run, mode="validate" if validate_only else "train")
    if termination and termination.error:
        raise click.ClickException(f"{termination.error.reason}: {termination.error.message}")
    if code != 0:
        raise click.ClickException(f"the trainer stopped with exit code {code}")
    if termination and termination.validation and validate_only:
        report = termination.validation
        click.echo(
            f"dataset ok: {report.rows_kept}/{report.rows_read} rows, {report.train_rows} train, {report.eval_rows} eval, {report.tokens} tokens"
        )
        for line in report.steps:
            click.echo(f"  {line}")
    if termination and termination.result:
        result = termination.result
        click.echo(f"model: {run.output / result.artifact.path} ({result.artifact.digest})")
        if result.artifact.merged_path:
            click.echo(f"merged: {run.output / result.artifact.merged_path}")
        for key, value in result.metrics.items():
            click.echo(f"  {key}: {value:.6g}")
        if result.evaluation is not None:
            from kubetune.sdk.results import evaluation_table

            click.echo("evaluation:")
            click.echo(textwrap.indent(evaluation_table(result.evaluation), "  "))
            if result.evaluation_report_path:
                click.echo(f"  per-example report: {run.output / result.evaluation_report_path}")


@main.command(
    "operator",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def operator_command(ctx: click.Context) -> None:
    """Run the kubetune operator (see `kubetune operator --help`)."""
    # Imported here: kopf and the operator load only for this command.
    try:
        from kubetune_operator.main import command
    except ImportError as err:
        raise click.ClickException(f"the operator is not installed: {err}") from err
    command.main(ctx.args, prog_name="kubetune operator")


# --- cluster commands ------------------------------------------------------------------


def _job_row(job: dict) -> list[str]:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    progress = status.get("progress") or {}
    loss = progress.get("loss")
    return [
        job["metadata"]["name"],
        status.get("phase", "Pending"),
        spec.get("method", ""),
        (spec.get("baseModel") or {}).get("name", ""),
        progress.get("steps", ""),
        f"{loss:.4g}" if loss is not None else "",
        progress.get("eta", ""),
        _age(job["metadata"].get("creationTimestamp")),
    ]


_JOB_HEADER = ["NAME", "PHASE", "METHOD", "BASE MODEL", "STEPS", "LOSS", "ETA", "AGE"]


@main.command("get")
@click.argument("name")
@cluster_options(output=True)
def get_command(name: str, **options: str | None) -> None:
    """Show a FineTuningJob: phase, progress, metrics, failure and registered model."""
    cluster = _cluster(options)
    with _guard():
        job = cluster.get_job(name)

    def table() -> None:
        _columns([_JOB_HEADER, _job_row(job)])
        status = job.get("status") or {}
        if status.get("failure"):
            failure = status["failure"]
            click.echo(f"\nfailure: {failure['reason']}: {failure['message']}")
        if status.get("metrics"):
            click.echo("\nmetrics:")
            for key, value in sorted(status["metrics"].items()):
                click.echo(f"  {key}: {value:.6g}")
        if status.get("evaluation"):
            from kubetune.api.evaluation import EvaluationResult
            from kubetune.sdk.results import evaluation_table

            evaluation = EvaluationResult.model_validate(status["evaluation"])
            click.echo("\nevaluation:")
            click.echo(textwrap.indent(evaluation_table(evaluation), "  "))
            if evaluation.report:
                report = evaluation.report
                click.echo(f"  per-example report: pvc://{report.claim_name}/{report.path}")
        if status.get("registeredModel"):
            click.echo(f"\nregistered model: {status['registeredModel']}")

    _emit(options, job, table)


@main.command("list")
@click.option("-l", "--selector", default=None, help="Label selector.")
@click.option(
    "-A", "--all-namespaces", is_flag=True, help="List the jobs of every namespace, as kubectl."
)
@cluster_options(output=True)
def list_command(selector: str | None, all_namespaces: bool, **options: str | None) -> None:
    """List FineTuningJobs in the namespace (or, with -A, in all namespaces)."""
    cluster = _cluster(options)
    with _guard():
        jobs = cluster.list_jobs(selector, all_namespaces=all_namespaces)

    def table() -> None:
        if not jobs:
            where = "any namespace" if all_namespaces else f"namespace {cluster.namespace}"
            click.echo(f"no FineTuningJobs in {where}")
            return
        if all_namespaces:
            rows = [[j["metadata"]["namespace"], *_job_row(j)] for j in jobs]
            _columns([["NAMESPACE", *_JOB_HEADER], *rows])
            return
        _columns([_JOB_HEADER, *(_job_row(j) for j in jobs)])

    _emit(options, {"items": jobs}, table)


def _made_by(spec: dict) -> str:
    """The job that trained a model, or `merge <name>` for a merged one."""
    if spec.get("sourceJob"):
        return spec["sourceJob"].get("name", "")
    source = (spec.get("merge") or {}).get("source") or {}
    return f"merge {source['name']}" if source.get("name") else ""


@main.command("models")
@cluster_options(output=True)
def models_command(**options: str | None) -> None:
    """List RegisteredModels (trained models and their lineage)."""
    cluster = _cluster(options)
    with _guard():
        models = cluster.list_models()

    def table() -> None:
        if not models:
            click.echo(f"no RegisteredModels in namespace {cluster.namespace}")
            return
        rows = [["NAME", "BASE MODEL", "METHOD", "KIND", "JOB", "EVAL LOSS", "AGE"]]
        for model in models:
            spec = model.get("spec") or {}
            eval_loss = (spec.get("metrics") or {}).get("eval_loss")
            rows.append(
                [
                    model["metadata"]["name"],
                    (spec.get("baseModel") or {}).get("name", ""),
                    spec.get("method", ""),
                    (spec.get("artifact") or {}).get("kind", ""),
                    _made_by(spec),
                    f"{eval_loss:.4f}" if eval_loss is not None else "",
                    _age(model["metadata"].get("creationTimestamp")),
                ]
            )
        _columns(rows)

    _emit(options, {"items": models}, table)


@main.command("cancel")
@click.argument("name")
@cluster_options(output=True)
def cancel_command(name: str, **options: str | None) -> None:
    """Cancel a FineTuningJob for good (spec.cancel); its record is kept."""
    cluster = _cluster(options)
    with _guard():
        phase = (cluster.get_job(name).get("status") or {}).get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            raise click.ClickException(f"FineTuningJob {name} already ended ({phase})")
        job = cluster.cancel_job(name)
    _emit(
        options,
        {"name": name, "namespace": cluster.namespace, "cancel": job["spec"].get("cancel")},
        lambda: click.echo(f"finetuningjob/{name} cancelled"),
    )


def _watch(cluster, name: str, timeout: float | None) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from kubetune.sdk.cluster import TERMINAL_PHASES

    last: dict = {}
    with (
        _guard(),
        Progress(
            TextColumn("[bold]{task.fields[phase]:<10}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
        ) as progress,
    ):
        task = progress.add_task(name, total=None, phase="Pending", detail="")
        for job in cluster.watch_job(name, timeout):
            last = job.get("status") or {}
            report = last.get("progress") or {}
            detail = f"loss {report['loss']:.4f}" if report.get("loss") is not None else ""
            if report.get("evalLoss") is not None:
                detail += f"  eval {report['evalLoss']:.4f}"
            progress.update(
                task,
                completed=report.get("step", 0),
                total=report.get("totalSteps") or None,
                phase=last.get("phase", "Pending"),
                detail=detail,
            )
            if last.get("phase") in TERMINAL_PHASES:
                break
    phase = last.get("phase")
    if phase == "Succeeded":
        model = last.get("registeredModel")
        click.echo(f"{name} succeeded" + (f"; registered model: {model}" if model else ""))
    elif phase == "Failed":
        failure = last.get("failure") or {}
        raise click.ClickException(
            f"{name} failed: {failure.get('reason')}: {failure.get('message')}"
        )
    elif phase == "Cancelled":
        raise click.ClickException(f"{name} was cancelled")
    else:
        raise click.ClickException(f"{name} is still {phase} after {timeout}s")


@main.command("watch")
@click.argument("name")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@cluster_options()
def watch_command(name: str, timeout: float | None, **options: str | None) -> None:
    """Follow a FineTuningJob with a progress bar until it succeeds, fails or is cancelled."""
    _watch(_cluster(options), name, timeout)


@main.command("logs")
@click.argument("name")
@click.option("--tail", type=int, default=None, help="Only the last N lines.")
@cluster_options()
def logs_command(name: str, tail: int | None, **options: str | None) -> None:
    """Print the logs of a FineTuningJob's trainer pod."""
    cluster = _cluster(options)
    with _guard():
        pod, text = cluster.logs(name, tail)
    click.echo(f"# pod/{pod}", err=True)
    click.echo(text, nl=not text.endswith("\n"))


@main.command("plot")
@click.argument("name")
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default="loss.png",
    show_default=True,
    help="PNG file to write.",
)
@cluster_options()
def plot_command(name: str, out: str, **options: str | None) -> None:
    """Plot the loss curve of a run as PNG. NAME is a local run's output folder or its
    metrics.json, or a FineTuningJob on the cluster."""
    from pathlib import Path

    from kubetune.api.finetuningjob import OutputSpec
    from kubetune.sdk.plot import NoHistory, load_history, plot_loss

    source = Path(name)
    if not source.exists():
        cluster = _cluster(options)
        with _guard():
            job = cluster.get_job(name)
        status = job.get("status") or {}
        progress = status.get("progress") or {}
        output = OutputSpec.model_validate(job["spec"]["output"]).job_location(
            name, job["metadata"]["uid"]
        )
        latest = (
            f" (status.progress has only the latest loss: {progress['loss']:.4f} at step "
            f"{progress.get('step')})"
            if progress.get("loss") is not None
            else ""
        )
        raise click.ClickException(
            f"no loss history for FineTuningJob {name} on the cluster{latest}: the trainer writes "
            f"the history to metrics.json on the output volume (claim {output.claim_name}, "
            f"path {output.path}); copy it here and run `kubetune plot metrics.json`"
        )
    try:
        train_history, eval_history = load_history(source)
        plot_loss(train_history, eval_history, Path(out), title=f"loss: {source.resolve().name}")
    except NoHistory as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out} ({len(train_history)} steps)")


if __name__ == "__main__":
    sys.exit(main())


# Registered last: the sweep and merge commands use this module's helpers.
from kubetune.cli_merges import merge_group  # noqa: E402
from kubetune.cli_sweeps import sweep_group  # noqa: E402

main.add_command(sweep_group)
main.add_command(merge_group)
