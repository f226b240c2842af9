"""The `kubetune` command line."""

from __future__ import annotations

import sys

import click

from kubetune import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
def main() -> None:
    """Fine-tune language models on Kubernetes."""


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
def train(
    filename: str,
    local: bool,
    volumes: tuple[str, ...],
    output_dir: str | None,
    validate_only: bool,
) -> None:
    """Train a FineTuningJob manifest (with --local, on this machine)."""
    if not local:
        raise click.ClickException(
            "submitting to a cluster is not available yet: apply the manifest with kubectl, "
            "or add --local to train on this machine"
        )
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


if __name__ == "__main__":
    sys.exit(main())
