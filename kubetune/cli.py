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


if __name__ == "__main__":
    sys.exit(main())
