"""Every file under cluster/ is parsed and checked here (tests/test_shipped_yaml.py skips them).

- the Ray cluster launcher config against Ray's own schema, and what it must say: a head with no
  training work, autoscaling GPU workers, the image, shared storage, token auth, the dashboard;
- the KubeRay manifests: kinds and API versions, only fields KubeRay knows, every container's
  image, requests and limits (GPUs on workers), the shared volume, token auth;
- what they run: every `ms-ray CMD CONFIG` / `serve deploy FILE` named in a file under cluster/
  exists in the repo and loads with the project's typed configs; the RayService's Serve config is
  serve/cluster.yaml's and passes Ray's Serve schema; the RayJob's job fits its cluster;
- one image tag everywhere, one Ray version everywhere, no secret values (placeholders only);
- with `kubernetes-validate` installed (optional), the core Kubernetes parts (PVC, Secrets, pod
  templates, Service) against the Kubernetes API schemas. It has no schemas for KubeRay's CRDs.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ms_ray.config import ServeConfig, TrainConfig, load_config, load_serve_file

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = "cluster/ray-cluster.yaml"
STORAGE = "cluster/kuberay/storage.yaml"
KUBERAY = {  # manifest -> kind
    "cluster/kuberay/raycluster.yaml": "RayCluster",
    "cluster/kuberay/rayjob.yaml": "RayJob",
    "cluster/kuberay/rayservice.yaml": "RayService",
}
CHECKED = {LAUNCHER, STORAGE, *KUBERAY}  # every *.yaml / *.yml under cluster/ must be one of these
SHARED = "/mnt/shared"
PVC = "ms-ray-shared"
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md", "")
                    or p.name.endswith(".dockerignore"))

# Fields of the KubeRay v1 API (ray-operator/apis/ray/v1, KubeRay 1.3-1.6): a misspelt or misplaced
# field is pruned by the API server without a word (e.g. RayService's cluster is rayClusterConfig).
CLUSTER_SPEC_FIELDS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                       "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                       "gcsFaultToleranceOptions", "authOptions", "upgradeStrategy"}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources",
                     "labels"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                       "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                     "idleTimeoutSeconds", "upscalingMode", "version"}
SPEC_FIELDS = {
    "RayCluster": CLUSTER_SPEC_FIELDS,
    "RayJob": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes",
               "suspend"},
    "RayService": {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
                   "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold"},
}


def load(path: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def manifest(path: str) -> dict:
    (doc,) = load(path)
    return doc


def cluster_spec(doc: dict) -> dict:
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"] if key is None else doc["spec"][key]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and of every worker group."""
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def gpus(container: dict, side: str = "limits") -> int:
    return int(container.get("resources", {}).get(side, {}).get("nvidia.com/gpu", 0))


def image_of_dockerfile() -> tuple[str, str]:
    """(base image, the tag the header's `docker build -t` gives)"""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text).group(1)
    return base, tag


def pinned(package: str) -> str:
    return re.search(rf"^{package}==(\S+)", (ROOT / "constraints-cpu.txt").read_text(), re.M).group(1)


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def ms_ray_commands(text: str) -> list[list[str]]:
    """Every `ms-ray ...` command of a shell string (split on ; && || and newlines)."""
    out = []
    for part in re.split(r"&&|\|\||;|\n", text):
        words = shlex.split(part) if "ms-ray" in part else []
        if "ms-ray" in words:
            out.append(words[words.index("ms-ray"):])
    return out


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The ms-ray commands of a Ray Jobs entrypoint, looking inside `bash -c '...'`."""
    words = shlex.split(entrypoint)
    if words[:2] in (["bash", "-c"], ["sh", "-c"], ["bash", "-lc"]):
        return ms_ray_commands(words[2])
    return ms_ray_commands(entrypoint)


def train_config(path: str) -> TrainConfig:
    assert (ROOT / path).is_file(), f"config {path} does not exist in the repo"
    return load_config(TrainConfig, ROOT / path, check_paths=False)


# ---- coverage -----------------------------------------------------------------------------

def test_every_cluster_yaml_is_checked():
    found = {str(p.relative_to(ROOT)) for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert found == CHECKED, (f"unchecked: {sorted(found - CHECKED)}; missing: {sorted(CHECKED - found)}: "
                              "add a new cluster/ file to tests/test_cluster.py")


@pytest.mark.parametrize("path", sorted(CHECKED))
def test_cluster_yaml_parses(path):
    load(path)


# ---- the Ray cluster launcher -------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher() -> dict:
    return manifest(LAUNCHER)


def test_launcher_passes_rays_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(launcher))  # the file as written
    validate_config(prepare_config(copy.deepcopy(launcher)))  # with the provider's defaults, as `ray up` does


def test_launcher_head_and_autoscaling_gpu_workers(launcher):
    types = launcher["available_node_types"]
    assert launcher["cluster_name"] and isinstance(launcher["max_workers"], int)
    assert launcher["provider"]["type"] in ("aws", "gcp", "azure")
    assert launcher["head_node_type"] in types
    for name, t in types.items():
        assert "resources" in t and "node_config" in t, f"node type {name}: resources and node_config"
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, "no work on the head"
    workers = {n: t for n, t in types.items() if n != launcher["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= launcher["max_workers"], name
        assert t["max_workers"] > t["min_workers"], f"{name} does not autoscale"
    assert sum(t["min_workers"] for t in workers.values()) <= launcher["max_workers"]


def test_launcher_image_storage_and_start_commands(launcher):
    docker = launcher["docker"]
    assert docker["image"] == image_of_dockerfile()[1]
    options = " ".join(docker["run_options"])
    assert f"{SHARED}:{SHARED}" in options, "every container must see the shared storage"
    assert any(SHARED in c and "mount" in c for c in launcher["initialization_commands"]), \
        "the hosts must mount the shared file system before Docker starts"
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "ray start --head" in head and "ray start --address" in workers
    assert "--num-cpus=0" in head and "--num-gpus=0" in head
    port = re.search(r"--dashboard-port[= ](\d+)", head)
    assert port is None or port.group(1) == "8265"
    assert "--dashboard-host=0.0.0.0" in head
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds or "RAY_AUTH_MODE=token" in options
    assert "RAY_AUTH_MODE=token" in options  # jobs and `ray exec` commands too
    assert "~/.ray/auth_token" in launcher["file_mounts"], "the token must reach every node"


def test_launcher_fits_the_gpu_preset(launcher):
    """preflight counts the GPUs of running nodes: the minimum workers must hold the job."""
    cfg = train_config("jobs/qwen3-0.6b-zero2.yaml")
    types = launcher["available_node_types"]
    standing = sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in types.values() if "min_workers" in t)
    assert standing >= cfg.scaling.num_workers
    biggest = max(t["resources"].get("CPU", 0) for t in types.values())
    assert biggest > cfg.scaling.cpus_per_worker * min(cfg.scaling.num_workers, 8), "no CPU left for Ray Data"


# ---- KubeRay -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(KUBERAY))
def test_kuberay_kind_version_and_fields(path):
    doc = manifest(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[path]
    assert doc["metadata"]["name"]
    unknown = set(doc["spec"]) - SPEC_FIELDS[doc["kind"]]
    assert not unknown, f"{path}: spec fields KubeRay does not know: {unknown}"
    spec = cluster_spec(doc)
    assert not set(spec) - CLUSTER_SPEC_FIELDS, set(spec) - CLUSTER_SPEC_FIELDS
    assert not set(spec["headGroupSpec"]) - HEAD_GROUP_FIELDS
    assert not set(spec.get("autoscalerOptions", {})) - AUTOSCALER_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert not set(group) - WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert spec["rayVersion"] == pinned("ray"), "rayVersion must be the image's Ray"
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values()), \
        "rayStartParams values are strings"


@pytest.mark.parametrize("path", sorted(KUBERAY))
def test_kuberay_containers(path):
    spec = cluster_spec(manifest(path))
    image = image_of_dockerfile()[1]
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-gpus") == "0" and head_params.get("num-cpus") == "0", "no work on the head"
    for group, template in pod_templates(spec):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in containers(template):
            where = f"{path} {group}/{c['name']}"
            assert c["image"] == image, f"{where}: image {c['image']} != {image}"
            res = c.get("resources", {})
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(side, {})), f"{where}: {side} needs cpu and memory"
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert SHARED in mounts, f"{where}: {SHARED} is not mounted"
            claim = volumes[mounts[SHARED]["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim == PVC, f"{where}: {SHARED} must be the shared PVC {PVC}"
            assert not mounts[SHARED].get("readOnly"), f"{where}: checkpoints need {SHARED} writable"
            if group == "head":
                assert gpus(c) == 0 and gpus(c, "requests") == 0
                ports = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
                assert {6379, 8265, 10001, 8000} <= set(ports) and ports[8265] == "dashboard", ports
            else:
                assert gpus(c) >= 1 and gpus(c) == gpus(c, "requests"), f"{where}: nvidia.com/gpu requests = limits"


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", sorted(KUBERAY))
def test_kuberay_token_auth(path):
    doc = manifest(path)
    spec = cluster_spec(doc)
    if spec.get("authOptions"):  # KubeRay >= 1.5.1 makes and injects the token itself
        assert spec["authOptions"]["mode"] == "token"
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)
        return
    secret_keys = {(d["metadata"]["name"], k) for d in load(STORAGE) if d["kind"] == "Secret"
                   for k in (d.get("stringData") or d.get("data") or {})}
    envs = [env_of(c) for _, t in pod_templates(spec) for c in containers(t)]
    if spec.get("enableInTreeAutoscaling"):
        envs.append(env_of(spec["autoscalerOptions"]))  # the autoscaler sidecar talks to the GCS too
    for env in envs:
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) in secret_keys, f"{ref} is not a Secret in {STORAGE}"


def test_rayjob_runs_the_training_config():
    doc = manifest("cluster/kuberay/rayjob.yaml")
    s = doc["spec"]
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    assert s["backoffLimit"] >= 0 and s["activeDeadlineSeconds"] > 0
    commands = entrypoint_commands(s["entrypoint"])
    assert [c[1] for c in commands] == ["preflight", "train"], commands
    assert len({c[2] for c in commands}) == 1, "preflight must check the config that trains"
    cfg = train_config(commands[-1][2])
    workers = cluster_spec(doc)["workerGroupSpecs"]
    standing = sum(g["minReplicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in workers)
    assert cfg.scaling.use_gpu and standing >= cfg.scaling.num_workers, "the job's GPUs must be there at start"
    for _, template in pod_templates(cluster_spec(doc)):
        mounted = [m["mountPath"] for c in containers(template) for m in c.get("volumeMounts", [])]
        for p in (cfg.run.storage, cfg.data.path, cfg.model.pretrained):
            assert any(p.startswith(m + "/") or p == m for m in mounted), f"{p} is not on a mounted volume"


def test_rayservice_serves_serve_cluster_yaml():
    from ray.serve.schema import ServeDeploySchema

    doc = manifest("cluster/kuberay/rayservice.yaml")
    assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    tree = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _, shipped_tree = load_serve_file(ROOT / "serve/cluster.yaml", check_paths=False)
    assert tree == shipped_tree, "serveConfigV2 must be serve/cluster.yaml's config (keep them identical)"
    schema = ServeDeploySchema.model_validate(tree)
    (app,) = schema.applications
    module, name = app.import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[name]), name))
    cfg = ServeConfig.model_validate(tree["applications"][0]["args"], context={"check_paths": False})
    assert cfg.checkpoint.startswith(SHARED + "/") and cfg.ingress.anonymous_role is None
    assert schema.http_options.port == 8000
    ports = [p["port"] for p in doc["spec"]["serveService"]["spec"]["ports"]]
    assert ports == [8000]
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True and cfg.model.max_replicas > cfg.model.min_replicas
    (workers,) = spec["workerGroupSpecs"]
    per_pod = gpus(workers["template"]["spec"]["containers"][0])
    assert workers["maxReplicas"] * per_pod >= cfg.model.max_replicas * cfg.model.num_gpus
    assert workers["minReplicas"] * per_pod >= cfg.model.min_replicas * cfg.model.num_gpus
    # every key the roles read from the environment reaches every pod from the keys Secret
    wanted = {k[4:] for role in cfg.roles.values() for k in role.keys if k.startswith("env:")}
    secrets = {d["metadata"]["name"]: set(d.get("stringData") or {}) for d in load(STORAGE) if d["kind"] == "Secret"}
    for group, template in pod_templates(spec):
        for c in template["spec"]["containers"]:
            given = {n for e in c.get("envFrom", []) for n in secrets[e["secretRef"]["name"]]}
            given |= set(env_of(c))
            assert wanted <= given, f"{group}: {sorted(wanted - given)} not set"


def test_storage_is_read_write_many_and_secrets_are_empty_templates():
    docs = load(STORAGE)
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == PVC and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert secrets
    for s in secrets:
        values = {**(s.get("data") or {}), **(s.get("stringData") or {})}
        assert values and all(v in ("", None) for v in values.values()), \
            f"Secret {s['metadata']['name']}: templates hold no values (fill them with kubectl create secret)"


# ---- across files -------------------------------------------------------------------------

def all_images() -> dict[str, set[str]]:
    out = {LAUNCHER: {manifest(LAUNCHER)["docker"]["image"]}}
    for path in KUBERAY:
        spec = cluster_spec(manifest(path))
        out[path] = {c["image"] for _, t in pod_templates(spec) for c in containers(t)}
    for p in TEXT_FILES:
        out[str(p.relative_to(ROOT))] = out.get(str(p.relative_to(ROOT)), set()) | set(
            i.rstrip(".") for i in re.findall(r"[\w.-]+(?:/[\w.-]+)*/ms-ray:[\w.-]+", p.read_text()))
    return out


def test_one_image_tag_and_ray_version_everywhere():
    base, tag = image_of_dockerfile()
    assert base == f"rayproject/ray:{pinned('ray')}-py311-gpu", "the base image's Ray must be the pinned Ray"
    images = {i for found in all_images().values() for i in found}
    assert images == {tag}, f"images differ across cluster/: {images}"
    assert tag.rsplit(":", 1)[1] == project_version(), "tag the image with the project version"


def test_dockerfile_installs_the_project_without_cpu_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", text, re.M) and "pip install" in text and "-e ." in text
    assert "whl/cpu" not in text and "+cpu" not in text and not re.search(r"torch==", text)
    assert "HF_HUB_OFFLINE=1" in text
    ignored = set((CLUSTER / "Dockerfile.dockerignore").read_text().split())
    for entry in (".git", ".venv", "runs/", "wandb/", ".cache/"):
        assert entry in ignored, f"{entry} must not enter the image's build context"


NAMED_CONFIG = re.compile(r"ms-ray (train|submit|preflight|export|prepare) ([\w./-]+\.ya?ml)")


def test_every_named_config_exists_and_loads():
    """`ms-ray CMD CONFIG` and `serve deploy FILE` anywhere in cluster/ (comments and README
    included) name files of this repo that load with the typed configs."""
    seen = 0
    for p in TEXT_FILES:
        for command, path in NAMED_CONFIG.findall(p.read_text()):
            assert (ROOT / path).is_file(), f"{p.name}: `ms-ray {command} {path}`: {path} does not exist"
            if command != "prepare":
                train_config(path)
            seen += 1
        for path in re.findall(r"serve (?:deploy|run) (\S+\.ya?ml)", p.read_text()):
            assert (ROOT / path).is_file(), f"{p.name}: {path} does not exist"
            load_serve_file(ROOT / path, check_paths=False)
            seen += 1
        for path in re.findall(r"(?<![\w/.])(cluster/[\w./-]+\.ya?ml)", p.read_text()):
            assert (ROOT / path).is_file(), f"{p.name} names {path}, which does not exist"
    assert seen >= 5


SECRETISH = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)$", re.I)  # names like RAY_AUTH_TOKEN, MS_RAY_USER_KEY
LONG_RANDOM = re.compile(r"(?<![\w/.-])(?=[A-Za-z0-9+/=_-]*\d)(?=[A-Za-z0-9+/=_-]*[A-Za-z])[A-Za-z0-9+/=_-]{32,}")


def test_no_secret_values():
    for path in KUBERAY:
        spec = cluster_spec(manifest(path))
        envs = [env_of(c) for _, t in pod_templates(spec) for c in containers(t)]
        envs.append(env_of(spec.get("autoscalerOptions", {})))
        for env in envs:
            for name, e in env.items():
                if SECRETISH.search(name):
                    assert "value" not in e and "valueFrom" in e, f"{path}: {name} must come from a Secret"
    text = (ROOT / LAUNCHER).read_text()
    assert not re.search(r"(RAY_AUTH_TOKEN|_KEY|PASSWORD)=\S", text), "secrets travel in files, not in the config"
    for p in TEXT_FILES:
        hits = LONG_RANDOM.findall(p.read_text())
        assert not hits, f"{p.name}: {hits} look like real secrets"


# ---- optional: the Kubernetes API schemas (kubernetes-validate, offline) ---------------------

def test_core_kubernetes_parts_pass_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = utils.latest_version()
    for doc in load(STORAGE):
        kv.validate(doc, version, strict=True)
    folder = f"kubernetes-json-schema/v{version}-local-strict"  # the bundled schemas, e.g. v1.37.0
    registry = Resource.from_contents(utils.schema_contents(f"{folder}/_definitions.json", version)) @ Registry()

    def check(schema_file: str, data: dict):
        schema = utils.schema_contents(f"{folder}/{schema_file}", version)
        jsonschema.validators.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ registry) \
            .validate(data)

    for path in KUBERAY:
        doc = manifest(path)
        spec = cluster_spec(doc)
        for _, template in pod_templates(spec):
            check("podtemplatespec-v1.json", template)
        if "serveService" in doc["spec"]:
            kv.validate({"apiVersion": "v1", "kind": "Service", **doc["spec"]["serveService"]}, version, strict=True)
