"""The imperative shell of a FineTuningSweep: observe its trials, create what the search
plans, register the kept models once it ended, write status.

Level-triggered like the FineTuningJob's reconcile: everything is read from the
watch caches each time, trials are created if absent under names fixed by
their number (a 409 is an earlier run's trial, adopted only if this sweep
controls it), and status is written only when it changed.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP, VERSION
from kubetune.api import finetuningjob as ftj
from kubetune.api import registeredmodel as rm
from kubetune.api import sweep as sw
from kubetune.api.sweep import FineTuningSweepSpec, FineTuningSweepStatus
from kubetune_operator import naming
from kubetune_operator.children import (
    Blocked,
    Clients,
    CreateBlocked,
    create_child,
    post_event,
    read_cached,
    utcnow,
    write_status,
)
from kubetune_operator.observed import Obj
from kubetune_operator.search import Trial, plan_search, should_stop
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.sweep_status import (
    derive_sweep_status,
    desired_trial,
    models_to_keep,
    observed_trials,
    trial_model,
)

log = logging.getLogger("kubetune.operator")

RESYNC_SECONDS = 60.0


def reconcile_sweep(
    clients: Clients, settings: OperatorSettings, namespace: str, name: str
) -> float | None:
    cache = clients.cache
    read = read_cached(
        clients, sw.KIND, namespace, name, FineTuningSweepSpec, FineTuningSweepStatus
    )
    if read is None:
        return None
    body, spec, previous = read
    uid = body["metadata"]["uid"]
    children = cache.children(ftj.KIND, namespace, uid)
    trials = observed_trials(body, spec, children, previous)
    trials = [_stop_if_behind(clients, body, spec, t, trials) for t in trials]
    plan = plan_search(spec, trials)
    for number, values in plan.create:
        trial = desired_trial(body, spec, number, values)
        try:
            create_child(clients, trial, uid)
        except CreateBlocked as blocked:
            log.warning("sweep %s/%s: trial %s: %s", namespace, name, number, blocked.message)
            raise Blocked(blocked.message) from blocked
        log.info("sweep %s/%s: trial %s created (%s)", namespace, name, number, values)
    best_model = _register_kept_models(clients, body, spec, plan, trials, children)
    status = derive_sweep_status(body, spec, previous, trials, plan, best_model, utcnow())
    if status.phase != previous.phase and status.phase != sw.SweepPhase.RUNNING:
        post_event(
            clients,
            body,
            "Normal" if status.phase == sw.SweepPhase.SUCCEEDED else "Warning",
            f"Sweep{status.phase.value}",
            f"best trial {status.best_trial} ({spec.objective.metric} "
            f"{status.best_objective_shown or '-'})",
        )
    _write_status(clients, body, previous, status)
    return None if status.phase != sw.SweepPhase.RUNNING else RESYNC_SECONDS


def _stop_if_behind(clients: Clients, body: Obj, spec, trial: Trial, trials) -> Trial:
    """Cancel a trial the median rule stops (it is the sweep's own: the operator never
    changes a spec it did not write), marking it so that it counts as stopped, not failed."""
    if not should_stop(spec, trial, trials):
        return trial
    meta = body["metadata"]
    name = naming.trial_name(meta["name"], trial.number)
    patch = {
        "metadata": {"annotations": {naming.ANNOTATION_STOPPED_EARLY: "true"}},
        "spec": {"cancel": True},
    }
    try:
        updated = clients.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            ftj.PLURAL,
            name,
            patch,
            field_manager=naming.FIELD_MANAGER,
        )
    except ApiException as err:
        if err.status == 404:
            return trial
        raise
    clients.cache.put(updated)
    best = min(v for _, v in trial.history)
    post_event(
        clients,
        body,
        "Normal",
        "TrialStoppedEarly",
        f"{name} stopped at step {max(s for s, _ in trial.history)}: its best validation loss "
        f"{best:.4g} is worse than the median of the other trials by then",
    )
    return replace(trial, stopped=True)


def _register_kept_models(clients, body, spec, plan, trials, children) -> str | None:
    keep = models_to_keep(spec, plan, trials)
    if not keep:
        return None
    by_name = {child["metadata"]["name"]: child for child in children}
    sweep_name = body["metadata"]["name"]
    best_name = None
    for number in keep:
        trial = by_name.get(naming.trial_name(sweep_name, number))
        if trial is None:
            continue
        best = plan.best is not None and number == plan.best.number
        model = trial_model(trial, best, sweep_name, utcnow())
        if model is None:
            continue
        # Registered by an earlier look: the watch cache has it, no request needed.
        meta = model["metadata"]
        existing = clients.cache.get(rm.KIND, meta["namespace"], meta["name"])
        if existing is None:
            existing = create_child(clients, model, trial["metadata"]["uid"])
        recorded_uid = ((existing.get("spec") or {}).get("sourceJob") or {}).get("uid")
        if best and recorded_uid == trial["metadata"]["uid"]:
            best_name = existing["metadata"]["name"]
    return best_name


def _write_status(
    clients: Clients, body: Obj, previous: FineTuningSweepStatus, status: FineTuningSweepStatus
) -> None:
    if status.to_api() != previous.to_api():
        write_status(clients, sw.PLURAL, body, status.model_dump(mode="json", by_alias=True))
