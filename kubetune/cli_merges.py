"""`kubetune merge ...`: create a ModelMerge (from flags or a manifest), list merges, show
one with its parents and the merged model's lineage, and wait for one to end."""

from __future__ import annotations

import re
from pathlib import Path

import click

from kubetune.api.merge import MergeFormat, MergeMethod, SignMethod
from kubetune.cli import _age, _cluster, _columns, _emit, _guard, cluster_options

DONE = ("Succeeded", "Failed")
# The condition that best says why a merge is not done, most telling first.
WHY = ("Failed", "Registered", "ModelsReady", "Running")
# Which option of `merge create` sets a spec field, to name it in an error.
OPTIONS = {
    "metadata.name": "NAME",
    "spec.models": "--model",
    "spec.method": "--method",
    "spec.density": "--density",
    "spec.majoritySignMethod": "--majority-sign-method",
    "spec.svdRank": "--svd-rank",
    "spec.format": "--format",
    "spec.output": "--output",
    "spec.modelName": "--model-name",
}


@click.group("merge")
def merge_group() -> None:
    """Merges of registered models (ModelMerge)."""


def parse_model(value: str) -> tuple[str, float]:
    """`NAME=WEIGHT`, or `NAME` for weight 1.0."""
    name, sep, weight = value.partition("=")
    if not name.strip():
        raise click.BadParameter(
            f"{value!r} names no model: give NAME=WEIGHT", param_hint="--model"
        )
    if not sep:
        return name.strip(), 1.0
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: the weight {weight!r} is not a number (NAME=WEIGHT, e.g. {name}=0.5)",
            param_hint="--model",
        ) from None


def _parse_models(ctx, param, values: tuple[str, ...]) -> list[tuple[str, float]]:
    return [parse_model(v) for v in values]


def _refuse(err, where: str | None = None) -> click.ClickException:
    """An InvalidMerge as a click error naming the option, or the manifest's fields."""
    if where is not None:
        problems = "; ".join(f"{f}: {m}" for f, m in err.problems)
        return click.ClickException(f"{where}: {problems}")
    field, message = err.problems[0]
    option = next(
        (o for f, o in OPTIONS.items() if re.match(rf"{re.escape(f)}([.\[]|$)", field)), None
    )
    if option is None:
        return click.ClickException(f"{field}: {message}")
    return click.BadParameter(f"{field}: {message}", param_hint=option)


def why(merge: dict) -> tuple[str, str] | None:
    """(reason, message) of the condition that says why the merge is not (yet) done:
    Failed when true, else the first of Registered and ModelsReady that is not, else
    Running."""
    conditions = {c.get("type"): c for c in (merge.get("status") or {}).get("conditions") or []}
    for type_ in WHY:
        condition = conditions.get(type_)
        if condition is None:
            continue
        true = condition.get("status") == "True"
        if (type_ == "Failed" and not true) or (type_ in ("Registered", "ModelsReady") and true):
            continue
        return condition.get("reason", ""), condition.get("message", "")
    return None


def summary(merge: dict) -> str:
    spec, status = merge.get("spec") or {}, merge.get("status") or {}
    phase = status.get("phase", "Pending")
    models = spec.get("models") or []
    line = (
        f"{merge['metadata']['name']}: {phase}, {spec.get('method', '')} of {len(models)} "
        f"models ({spec.get('format', 'adapter')})"
    )
    if status.get("registeredModel"):
        line += f" -> RegisteredModel {status['registeredModel']}"
        if status.get("digest"):
            line += f" ({short_digest(status['digest'])})"
    if phase != "Succeeded":
        reason = why(merge)
        if reason and (reason[0] or reason[1]):
            line += f"; {reason[0]}: {reason[1]}"
    return line


def short_digest(digest: str | None) -> str:
    if not digest:
        return ""
    algorithm, _, value = digest.partition(":")
    return f"{algorithm}:{value[:12]}" if value else digest[:19]


def parent_rows(merge: dict, model: dict | None) -> list[list[str]]:
    """MODEL and WEIGHT of each model to merge; with the merged model's record, the
    lineage it keeps of each parent: how it was trained, by which job, its digest."""
    lineage = {}
    if model is not None:
        merged = (model.get("spec") or {}).get("merge") or {}
        lineage = {p.get("name"): p for p in merged.get("parents") or []}
    header = ["MODEL", "WEIGHT"] + (["METHOD", "JOB", "DIGEST"] if lineage else [])
    rows = [header]
    for source in (merge.get("spec") or {}).get("models") or []:
        row = [source.get("model", ""), f"{source.get('weight', 1.0):g}"]
        if lineage:
            parent = lineage.get(source.get("model")) or {}
            row += [
                parent.get("method", ""),
                parent.get("sourceJob") or "",
                short_digest(parent.get("digest")),
            ]
        rows.append(row)
    return rows


@merge_group.command("create")
@click.argument("name", required=False)
@click.option("-f", "--filename", type=click.Path(exists=True, dir_okay=False), help="Manifest.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME=WEIGHT",
    callback=_parse_models,
    help="A RegisteredModel to merge and its weight (repeat; default weight 1).",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in MergeMethod], case_sensitive=False),
    default=None,
    help="How the weights are combined (default: ties).",
)
@click.option("--density", type=float, default=None, help="ties/dare: fraction kept (0.5).")
@click.option(
    "--majority-sign-method",
    type=click.Choice([m.value for m in SignMethod], case_sensitive=False),
    default=None,
    help="ties/dare_ties: elect signs by total change or by count.",
)
@click.option("--svd-rank", type=int, default=None, help="svd: rank of the merged adapter.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in MergeFormat], case_sensitive=False),
    default=None,
    help="LoRA parents: keep an adapter (default) or fold into full weights.",
)
@click.option("--output", default=None, metavar="CLAIM[:PATH]", help="Where to write it.")
@click.option("--model-name", default=None, help="Its RegisteredModel (default: NAME).")
@cluster_options()  # --output is the volume here; `kubetune -o yaml merge create` still works
def create_command(
    name: str | None,
    filename: str | None,
    models: list[tuple[str, float]],
    method: str | None,
    density: float | None,
    majority_sign_method: str | None,
    svd_rank: int | None,
    fmt: str | None,
    output: str | None,
    model_name: str | None,
    **options: str | None,
) -> None:
    """Merge registered models of one base model into a new one: NAME with --model
    (twice or more) and --output, or -f with a ModelMerge manifest."""
    from kubetune.sdk.merges import InvalidMerge, check_model_merge, merge_manifest

    flags = (name, method, density, majority_sign_method, svd_rank, fmt, output, model_name)
    if filename:
        if models or any(flag is not None for flag in flags):
            raise click.UsageError("give either -f or NAME with --model and --output, not both")
        import yaml

        try:
            document = yaml.safe_load(Path(filename).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise click.ClickException(f"{filename} is not YAML: {err}") from None
        try:
            check_model_merge(document)
        except InvalidMerge as err:
            raise _refuse(err, filename) from None
    else:
        if not name:
            raise click.UsageError("give NAME (with --model and --output) or -f MANIFEST")
        if len(models) < 2:
            raise click.BadParameter(
                "give two models or more: --model A=1 --model B=1", param_hint="--model"
            )
        if not output:
            raise click.BadParameter(
                "where to write the merged model: CLAIM or CLAIM:PATH", param_hint="--output"
            )
        try:
            document = merge_manifest(
                name,
                models,
                method or MergeMethod.TIES,
                output=output,
                format=fmt,
                density=density,
                majority_sign_method=majority_sign_method,
                svd_rank=svd_rank,
                model_name=model_name,
            )
        except InvalidMerge as err:
            raise _refuse(err) from None
    cluster = _cluster(options)
    with _guard():
        created = cluster.create_merge(document)
    created_name = created["metadata"]["name"]
    _emit(
        options,
        created,
        lambda: click.echo(f"modelmerge/{created_name} created in namespace {cluster.namespace}"),
    )


@merge_group.command("list")
@cluster_options(output=True)
def list_command(**options: str | None) -> None:
    """List ModelMerges."""
    cluster = _cluster(options)
    with _guard():
        merges = cluster.list_merges()

    def table() -> None:
        if not merges:
            click.echo(f"no ModelMerges in namespace {cluster.namespace}")
            return
        rows = [["NAME", "PHASE", "METHOD", "FORMAT", "MODEL", "AGE"]]
        for merge in merges:
            spec, status = merge.get("spec") or {}, merge.get("status") or {}
            rows.append(
                [
                    merge["metadata"]["name"],
                    status.get("phase", "Pending"),
                    spec.get("method", ""),
                    spec.get("format", "adapter"),
                    status.get("registeredModel") or "",
                    _age(merge["metadata"].get("creationTimestamp")),
                ]
            )
        _columns(rows)

    _emit(options, {"items": merges}, table)


@merge_group.command("get")
@click.argument("name")
@cluster_options(output=True)
def get_command(name: str, **options: str | None) -> None:
    """Show a merge: its phase (and why, until it succeeded), its models and weights, and
    once merged the lineage its RegisteredModel records (each parent's job and digest)."""
    from kubetune.sdk.cluster import NotFound

    cluster = _cluster(options)
    with _guard():
        merge = cluster.get_merge(name)
        model, missing = None, None
        registered = (merge.get("status") or {}).get("registeredModel")
        if registered:
            try:
                model = cluster.get_model(registered)
            except NotFound:
                missing = registered

    def table() -> None:
        click.echo(summary(merge))
        click.echo()
        _columns(parent_rows(merge, model))
        if missing:
            click.echo(f"\nRegisteredModel {missing} no longer exists")

    _emit(options, merge, table)


@merge_group.command("wait")
@click.argument("name")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@cluster_options()
def wait_command(name: str, timeout: float | None, **options: str | None) -> None:
    """Wait until a merge succeeds (exit 0) or fails (exit 1, with the reason)."""
    cluster = _cluster(options)
    last: dict = {}
    shown = None
    with _guard():
        for merge in cluster.watch_merge(name, timeout):
            last = merge
            line = summary(merge)
            if line != shown:
                click.echo(line, err=True)
                shown = line
            if (merge.get("status") or {}).get("phase") in DONE:
                break
    status = last.get("status") or {}
    phase = status.get("phase", "Pending")
    if phase == "Succeeded":
        click.echo(f"{name} succeeded; registered model: {status.get('registeredModel')}")
    elif phase == "Failed":
        reason, message = why(last) or ("", "")
        raise click.ClickException(f"{name} failed: {reason}: {message}")
    else:
        raise click.ClickException(f"{name} is still {phase} after {timeout}s")
