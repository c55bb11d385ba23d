"""Deployment files: the Dockerfile is hadolint-clean, the Kubernetes manifests are well formed and agree
with the image (ports, user, probes, health checking)."""

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


def documents() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_promises():
    text = (REPO / "Dockerfile").read_text()
    assert "EXPOSE 8000 8001 8002" in text and "STOPSIGNAL SIGTERM" in text and "USER 10001" in text
    assert "atop_server.healthcheck" in text and "ARG BASE_IMAGE=nvidia/cuda:" in text
    serve = text[text.index("AS serve\n") :]
    assert "torch" not in serve.lower().replace("no torch", "")


def test_every_manifest_is_a_known_well_formed_kind():
    kinds = {(d["apiVersion"], d["kind"]) for d in documents()}
    assert kinds == {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("batch/v1", "Job"),
    }
    for d in documents():
        assert d["metadata"]["name"] and "spec" in d


def test_deployment_probes_ports_resources_and_service():
    docs = {d["kind"]: d for d in documents()}
    pod = docs["Deployment"]["spec"]["template"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["ATOP_HEALTH_PORT"]) == ports["health"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet's gRPC probes: no TLS, no token
        assert container[probe]["grpc"]["port"] == ports["health"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["resources"]["requests"]["cpu"]
    grace = int(next(e["value"] for e in container["env"] if e["name"] == "ATOP_GRACE_SECONDS"))
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace  # drain completes before SIGKILL
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["ports"]} == {"http", "grpc", "metrics"}
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])


def test_training_job_resumes_into_a_volume():
    job = next(d for d in documents() if d["kind"] == "Job")["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["args"][0] in ("classifier", "pretrain", "finetune") and "--out" in container["args"]
    out = container["args"][container["args"].index("--out") + 1]
    assert any(out.startswith(m["mountPath"]) for m in container["volumeMounts"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_serving_pod_is_locked_down_and_gets_tls_and_tokens_from_secrets():
    pod = next(d for d in documents() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert env["ATOP_GRPC_USE_SSL"] == "true" and set(secrets) == {"tls", "tokens"}
    assert env["ATOP_GRPC_SERVER_CERT"].startswith(mounts["tls"] + "/")
    assert env["ATOP_GRPC_SERVER_KEY"].startswith(mounts["tls"] + "/")
    assert env["ATOP_AUTH_TOKEN_FILE"].startswith(mounts["tokens"] + "/")
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] in secrets)
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # the user reads the secrets
