"""`kubetune sweep ...`: create a FineTuningSweep, list, show and watch its trial table,
and plot the objective against the trials and each searched parameter."""

from __future__ import annotations

from pathlib import Path

import click

from kubetune.cli import _age, _cluster, _columns, _emit, _guard, cluster_options

HEADER = ["TRIAL", "PHASE", "OBJECTIVE", "PARAMETERS"]


@click.group("sweep")
def sweep_group() -> None:
    """Hyperparameter sweeps (FineTuningSweep)."""


def trial_rows(sweep: dict) -> list[list[str]]:
    status = sweep.get("status") or {}
    best = status.get("bestTrial")
    rows = []
    for trial in status.get("trials") or []:
        objective = trial.get("objective")
        mark = " *" if trial["name"] == best else ""
        rows.append(
            [
                trial["name"] + mark,
                trial.get("phase", ""),
                f"{objective:.4g}" if objective is not None else "",
                ", ".join(f"{k}={v}" for k, v in (trial.get("parameters") or {}).items()),
            ]
        )
    return rows


def summary(sweep: dict) -> str:
    spec, status = sweep.get("spec") or {}, sweep.get("status") or {}
    objective = spec.get("objective") or {}
    line = (
        f"{sweep['metadata']['name']}: {status.get('phase', 'Pending')}, trials "
        f"{status.get('trialsDone', '0/?')}, {objective.get('direction', '')} "
        f"{objective.get('metric', '')}"
    )
    if status.get("bestTrial"):
        line += f"; best {status['bestTrial']} ({status.get('bestObjectiveShown', '')})"
    if status.get("bestModel"):
        line += f", model {status['bestModel']}"
    return line


@sweep_group.command("create")
@click.option("-f", "--filename", required=True, type=click.Path(exists=True, dir_okay=False))
@cluster_options(output=True)
def create_command(filename: str, **options: str | None) -> None:
    """Create a FineTuningSweep from a manifest."""
    import yaml
    from pydantic import ValidationError

    from kubetune.api.sweep import FineTuningSweep

    document = yaml.safe_load(Path(filename).read_text(encoding="utf-8"))
    try:
        FineTuningSweep.model_validate(document)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise click.ClickException(f"{filename}: {problems}") from None
    cluster = _cluster(options)
    with _guard():
        created = cluster.create_sweep(document)
    name = created["metadata"]["name"]
    _emit(
        options,
        created,
        lambda: click.echo(f"finetuningsweep/{name} created in namespace {cluster.namespace}"),
    )


@sweep_group.command("list")
@cluster_options(output=True)
def list_command(**options: str | None) -> None:
    """List FineTuningSweeps."""
    cluster = _cluster(options)
    with _guard():
        sweeps = cluster.list_sweeps()

    def table() -> None:
        rows = [["NAME", "PHASE", "TRIALS", "BEST", "BEST TRIAL", "AGE"]]
        for sweep in sweeps:
            status = sweep.get("status") or {}
            rows.append(
                [
                    sweep["metadata"]["name"],
                    status.get("phase", "Pending"),
                    status.get("trialsDone", ""),
                    status.get("bestObjectiveShown", ""),
                    status.get("bestTrial") or "",
                    _age(sweep["metadata"].get("creationTimestamp")),
                ]
            )
        _columns(rows)

    _emit(options, {"items": sweeps}, table)


@sweep_group.command("get")
@click.argument("name")
@cluster_options(output=True)
def get_command(name: str, **options: str | None) -> None:
    """Show a sweep: its phase, best trial and the table of trials (* marks the best)."""
    cluster = _cluster(options)
    with _guard():
        sweep = cluster.get_sweep(name)

    def table() -> None:
        click.echo(summary(sweep))
        rows = trial_rows(sweep)
        if rows:
            click.echo()
            _columns([HEADER, *rows])

    _emit(options, sweep, table)


@sweep_group.command("watch")
@click.argument("name")
@click.option("--timeout", type=float, default=None, help="Stop watching after N seconds.")
@cluster_options()
def watch_command(name: str, timeout: float | None, **options: str | None) -> None:
    """A live table of the sweep's trials until it ends."""
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    cluster = _cluster(options)

    def render(sweep: dict):
        table = Table(*HEADER, box=None, pad_edge=False)
        for row in trial_rows(sweep):
            table.add_row(*row)
        return Group(Text(summary(sweep), style="bold"), table)

    last = None
    with _guard(), Live(refresh_per_second=4, transient=False) as live:
        for sweep in cluster.watch_sweep(name, timeout):
            last = sweep
            live.update(render(sweep))
            if (sweep.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                break
    if last is not None and (last.get("status") or {}).get("phase") == "Failed":
        raise click.ClickException(f"sweep {name} failed")


@sweep_group.command("plot")
@click.argument("name")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@cluster_options()
def plot_command(name: str, out: str, **options: str | None) -> None:
    """The objective against the trial number and against each searched parameter."""
    from kubetune.sdk.plot import NoHistory, plot_sweep

    cluster = _cluster(options)
    with _guard():
        sweep = cluster.get_sweep(name)
    try:
        plot_sweep(sweep, Path(out))
    except NoHistory as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {out}")
