"""How pods behave on the simulated (KWOK) nodes of the local cluster.

KWOK plays the kubelet for fake nodes through *stages*: rules that match an
object and write its next status. The stages here keep nodes Ready and move
pods through their lifecycle, steered per pod by annotations so that a test
can pick the outcome a real kubelet would report:

    sim.kubetune.dev/outcome    succeed (default) | fail | oom | run | image-pull | fail-rank
    sim.kubetune.dev/duration   how long the container runs first (Go duration, default 1s)
    sim.kubetune.dev/exit-code  exit code for `fail` (default 1)
    sim.kubetune.dev/message    the container's termination message
    sim.kubetune.dev/fail-index    for `fail-rank`: the completion index of an Indexed
                                   Job's pod that fails (exit 1); the others succeed
    sim.kubetune.dev/fail-restart  for `fail-rank`: only in this restart of a multi-pod
                                   job (kubetune.dev/restart, default 0)
    sim.kubetune.dev/fail-message  for `fail-rank`: the failing pod's termination message

Only pods that can end (restartPolicy Never or OnFailure) end; `run` and
restartPolicy Always keep a pod running until it is deleted; `image-pull`
keeps it Pending in ImagePullBackOff.
"""

from __future__ import annotations

from typing import Any

ANNOTATION_PREFIX = "sim.kubetune.dev/"
OUTCOME = ANNOTATION_PREFIX + "outcome"
DURATION = ANNOTATION_PREFIX + "duration"
EXIT_CODE = ANNOTATION_PREFIX + "exit-code"
MESSAGE = ANNOTATION_PREFIX + "message"
FAIL_INDEX = ANNOTATION_PREFIX + "fail-index"
FAIL_RESTART = ANNOTATION_PREFIX + "fail-restart"
FAIL_MESSAGE = ANNOTATION_PREFIX + "fail-message"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RESTART = "kubetune.dev/restart"

OUTCOMES = ("succeed", "fail", "oom", "run", "image-pull", "fail-rank")

STAGE_API_VERSION = "kwok.x-k8s.io/v1alpha1"

# Heartbeats: a node must renew its Ready condition within the controller
# manager's grace period (40s by default) or its pods are evicted.
HEARTBEAT_INTERVAL_MS = 10_000


def pod_annotations(
    outcome: str = "succeed",
    *,
    duration: str | None = None,
    exit_code: int | None = None,
    message: str | None = None,
    fail_index: int | None = None,
    fail_restart: int = 0,
    fail_message: str | None = None,
) -> dict[str, str]:
    """Annotations that steer a pod on a simulated node (put them on a pod template)."""
    if (outcome == "fail-rank") != (fail_index is not None):
        raise ValueError("fail_index goes with outcome 'fail-rank', and only with it")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    if exit_code is not None and outcome != "fail":
        raise ValueError("exit_code only applies to outcome 'fail'")
    if exit_code is not None and not 1 <= exit_code <= 255:
        raise ValueError(f"exit_code must be between 1 and 255, not {exit_code}")
    annotations = {OUTCOME: outcome}
    if duration is not None:
        annotations[DURATION] = duration
    if exit_code is not None:
        annotations[EXIT_CODE] = str(exit_code)
    if message is not None:
        annotations[MESSAGE] = message
    if fail_index is not None:
        annotations[FAIL_INDEX] = str(fail_index)
        annotations[FAIL_RESTART] = str(fail_restart)
        if fail_message is not None:
            annotations[FAIL_MESSAGE] = fail_message
    return annotations


def _stage(name: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": STAGE_API_VERSION,
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {"resourceRef": {"apiGroup": "v1", "kind": kind}, **spec},
    }


def _annotation(key: str) -> str:
    return f'.metadata.annotations["{key}"]'


_NODE_CONDITIONS = """\
{{ $now := Now }}
{{ $since := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- type: {{ .type | Quote }}
  status: {{ .status | Quote }}
  reason: {{ .reason | Quote }}
  message: {{ .message | Quote }}
  lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $since | Quote }}
{{ end }}
"""

_NODE_READY = (
    _NODE_CONDITIONS
    + """\
addresses:
- type: InternalIP
  address: {{ NodeIP | Quote }}
- type: Hostname
  address: {{ NodeName | Quote }}
{{ with NodePort }}
daemonEndpoints:
  kubeletEndpoint:
    Port: {{ . }}
{{ end }}
capacity:
{{ with .status.capacity }}{{ YAML . 1 }}{{ else }}  cpu: "64"
  memory: 512Gi
  pods: "110"
{{ end }}
allocatable:
{{ with .status.allocatable }}{{ YAML . 1 }}{{ else }}  cpu: "64"
  memory: 512Gi
  pods: "110"
{{ end }}
nodeInfo:
  architecture: amd64
  operatingSystem: linux
  kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
  kubeProxyVersion: {{ printf "kwok-%s" Version | Quote }}
  containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
  kernelVersion: {{ printf "kwok-%s" Version | Quote }}
  osImage: kwok
  bootID: ""
  machineID: ""
  systemUUID: ""
phase: Running
"""
)


def node_stages() -> list[dict[str, Any]]:
    """Make new nodes Ready (keeping their declared capacity) and keep them Ready."""
    ready = '.status.conditions.[] | select( .type == "Ready" ) | .status'
    return [
        _stage(
            "node-initialize",
            "Node",
            {
                "selector": {
                    "matchExpressions": [{"key": ready, "operator": "NotIn", "values": ["True"]}]
                },
                "next": {"statusTemplate": _NODE_READY},
            },
        ),
        _stage(
            "node-heartbeat",
            "Node",
            {
                "selector": {
                    "matchExpressions": [
                        {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                        {"key": ready, "operator": "In", "values": ["True"]},
                    ]
                },
                "delay": {
                    "durationMilliseconds": HEARTBEAT_INTERVAL_MS,
                    "jitterDurationMilliseconds": HEARTBEAT_INTERVAL_MS
                    + HEARTBEAT_INTERVAL_MS // 10,
                },
                "next": {"statusTemplate": _NODE_CONDITIONS},
                "immediateNextStage": True,
            },
        ),
    ]


_POD_RUNNING = """\
{{ $now := Now }}
phase: Running
startTime: {{ $now | Quote }}
{{ with NodeIPWith .spec.nodeName }}
hostIP: {{ . | Quote }}
hostIPs:
- ip: {{ . | Quote }}
{{ end }}
{{ $uid := or .metadata.uid "" }}
{{ $name := or .metadata.name "" }}
{{ $namespace := or .metadata.namespace "" }}
{{ with PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) $uid $name $namespace }}
podIP: {{ . | Quote }}
podIPs:
- ip: {{ . | Quote }}
{{ end }}
conditions:
- type: PodReadyToStartContainers
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: Initialized
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: ContainersReady
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: Ready
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
initContainerStatuses:
{{ range .spec.initContainers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  imageID: {{ printf "kwok://%s" .image | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      reason: Completed
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  imageID: {{ printf "kwok://%s" .image | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
"""


_TERMINATED_CONDITIONS = """\
conditions:
- type: PodReadyToStartContainers
  status: "False"
  lastTransitionTime: {{ $now | Quote }}
- type: Initialized
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: ContainersReady
  status: "False"
  reason: PodCompleted
  lastTransitionTime: {{ $now | Quote }}
- type: Ready
  status: "False"
  reason: PodCompleted
  lastTransitionTime: {{ $now | Quote }}
"""

_POD_IMAGE_PULL_BACKOFF = """\
{{ $now := Now }}
phase: Pending
conditions:
- type: PodScheduled
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: Initialized
  status: "True"
  lastTransitionTime: {{ $now | Quote }}
- type: ContainersReady
  status: "False"
  reason: ContainersNotReady
  lastTransitionTime: {{ $now | Quote }}
- type: Ready
  status: "False"
  reason: ContainersNotReady
  lastTransitionTime: {{ $now | Quote }}
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  imageID: ""
  ready: false
  started: false
  restartCount: 0
  state:
    waiting:
      reason: ImagePullBackOff
      message: {{ printf "Back-off pulling image %q: not found" .image | Quote }}
{{ end }}
"""


def _pod_terminated(
    phase: str, exit_code: str, reason: str, *, conditions: bool = True, message: str = MESSAGE
) -> str:
    """Status template for a pod whose containers all ended.

    The first container carries the outcome (exit code, reason, termination
    message); any sidecars end cleanly, as they would when the main one exits.
    `exit_code` is a template pipeline; it is evaluated before `range`, which
    rebinds the template's dot to each container. Without `conditions`, the
    pod's conditions are left as they are (an evicted pod keeps DisruptionTarget).
    """
    pod_conditions = _TERMINATED_CONDITIONS if conditions else ""
    return f"""\
{{{{ $now := Now }}}}
{{{{ $pod := . }}}}
{{{{ $annotations := or .metadata.annotations dict }}}}
{{{{ $message := index $annotations "{message}" }}}}
{{{{ $exitCode := {exit_code} }}}}
phase: {phase}
{pod_conditions}containerStatuses:
{{{{ range $i, $c := .spec.containers }}}}
- name: {{{{ $c.name | Quote }}}}
  image: {{{{ $c.image | Quote }}}}
  imageID: {{{{ printf "kwok://%s" $c.image | Quote }}}}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
      {{{{ if eq $i 0 }}}}
      exitCode: {{{{ $exitCode }}}}
      reason: {reason}
      {{{{ with $message }}}}
      message: {{{{ . | Quote }}}}
      {{{{ end }}}}
      {{{{ else }}}}
      exitCode: 0
      reason: Completed
      {{{{ end }}}}
      startedAt: {{{{ $pod.status.startTime | Quote }}}}
      finishedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
"""


def _pod_rank_outcome() -> str:
    """One pod of an Indexed Job fails (the one at fail-index, in restart fail-restart);
    the others end as if their training had finished."""
    failing = (
        "{{ $annotations := or .metadata.annotations dict }}\n"
        f'{{{{ $index := index $annotations "{COMPLETION_INDEX}" | default "" }}}}\n'
        f'{{{{ $restart := index $annotations "{RESTART}" | default "0" }}}}\n'
        f'{{{{ $failIndex := index $annotations "{FAIL_INDEX}" | default "" }}}}\n'
        f'{{{{ $failRestart := index $annotations "{FAIL_RESTART}" | default "0" }}}}\n'
        "{{ if and (eq $index $failIndex) (eq $restart $failRestart) }}\n"
    )
    return (
        failing
        + _pod_terminated("Failed", "1", "Error", message=FAIL_MESSAGE)
        + "{{ else }}\n"
        + _pod_terminated("Succeeded", "0", "Completed")
        + "{{ end }}\n"
    )


def pod_stages() -> list[dict[str, Any]]:
    """Pod lifecycle on simulated nodes: start, then end as the pod's annotations say."""
    alive = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    running = {"key": ".status.phase", "operator": "In", "values": ["Running"]}
    can_end = {"key": ".spec.restartPolicy", "operator": "In", "values": ["Never", "OnFailure"]}
    run_for = {
        "durationMilliseconds": 1000,
        "durationFrom": {"expressionFrom": _annotation(DURATION)},
    }

    def ending(
        name: str, outcome_values: list[str] | None, phase: str, exit_code: str, reason: str
    ):
        outcome = (
            {"key": _annotation(OUTCOME), "operator": "In", "values": outcome_values}
            if outcome_values
            else {"key": _annotation(OUTCOME), "operator": "DoesNotExist"}
        )
        return _stage(
            name,
            "Pod",
            {
                "selector": {"matchExpressions": [alive, running, can_end, outcome]},
                "delay": run_for,
                "next": {"statusTemplate": _pod_terminated(phase, exit_code, reason)},
            },
        )

    exit_code_from_annotation = f'index $annotations "{EXIT_CODE}" | default "1" | atoi'
    return [
        _stage(
            "pod-start",
            "Pod",
            {
                "selector": {
                    "matchExpressions": [
                        alive,
                        {"key": ".spec.nodeName", "operator": "Exists"},
                        {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
                        {
                            "key": _annotation(OUTCOME),
                            "operator": "NotIn",
                            "values": ["image-pull"],
                        },
                    ]
                },
                "next": {"statusTemplate": _POD_RUNNING},
            },
        ),
        _stage(
            "pod-image-pull-backoff",
            "Pod",
            {
                "selector": {
                    "matchExpressions": [
                        alive,
                        {"key": ".spec.nodeName", "operator": "Exists"},
                        {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
                        {"key": _annotation(OUTCOME), "operator": "In", "values": ["image-pull"]},
                        {
                            "key": ".status.containerStatuses.[].state.waiting.reason",
                            "operator": "NotIn",
                            "values": ["ImagePullBackOff"],
                        },
                    ]
                },
                "next": {"statusTemplate": _POD_IMAGE_PULL_BACKOFF},
            },
        ),
        ending("pod-succeed-by-default", None, "Succeeded", "0", "Completed"),
        ending("pod-succeed", ["succeed"], "Succeeded", "0", "Completed"),
        ending("pod-fail", ["fail"], "Failed", exit_code_from_annotation, "Error"),
        ending("pod-oom", ["oom"], "Failed", "137", "OOMKilled"),
        _stage(
            "pod-fail-rank",
            "Pod",
            {
                "selector": {
                    "matchExpressions": [
                        alive,
                        running,
                        can_end,
                        {"key": _annotation(OUTCOME), "operator": "In", "values": ["fail-rank"]},
                    ]
                },
                "delay": run_for,
                "next": {"statusTemplate": _pod_rank_outcome()},
            },
        ),
        # A kubelet stops a deleted pod's containers (SIGTERM: exit 143) and
        # reports it Failed, so that controllers holding finalizers on it (the
        # Job controller) count it and let go; then the pod is removed.
        _stage(
            "pod-stop",
            "Pod",
            {
                "selector": {
                    "matchExpressions": [
                        {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                        {
                            "key": ".status.phase",
                            "operator": "In",
                            "values": ["Pending", "Running"],
                        },
                    ]
                },
                "next": {
                    "statusTemplate": _pod_terminated("Failed", "143", "Error", conditions=False)
                },
            },
        ),
        _stage(
            "pod-delete",
            "Pod",
            {
                "selector": {
                    "matchExpressions": [
                        {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                        {
                            "key": ".status.phase",
                            "operator": "NotIn",
                            "values": ["Pending", "Running"],
                        },
                    ]
                },
                "next": {"delete": True},
            },
        ),
    ]
