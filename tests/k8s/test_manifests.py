"""k8s/: every KubeRay manifest is valid against KubeRay's own CRD schema and agrees with the repository.

The schemas are the OpenAPI v3 schemas of the RayCluster and RayJob CRDs (``spec.versions[v1].schema
.openAPIV3Schema``), read from ``../shared/data/kuberay/`` beside the repository (never copied into it;
``OPEN_RSTAR_KUBERAY_CRDS`` names another directory). They are validated as the API server does with strict
field validation (kubectl's default): a field the schema does not declare is an error, unless the schema marks
the object ``x-kubernetes-preserve-unknown-fields``. The tests skip when the schemas are absent.

Beyond the schema: the entry point and config exist in the repo, the image and Ray version match k8s/Dockerfile,
every mount names a volume, the run directory is on storage every pod shares (a ReadWriteMany claim, or an
object store whose credentials come from a Secret), GPU workers request ``nvidia.com/gpu``, and the
autoscaling bounds hold.
"""

from __future__ import annotations

import copy
import functools
import os
import posixpath
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(os.environ.get("OPEN_RSTAR_KUBERAY_CRDS") or REPO.parent / "shared" / "data" / "kuberay")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = sorted(p.name for p in (REPO / "k8s").glob("*.yaml"))
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

needs_crds = pytest.mark.skipif(not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()),
                                reason=f"KubeRay CRDs not found in {CRD_DIR}")


def _strict(schema):
    """Unknown fields become errors (additionalProperties: false) wherever the schema lists the fields."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


@functools.cache
def validator(kind: str):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    # OpenAPI v3.0 schemas are JSON Schema draft 4 plus vendor keys (x-kubernetes-*), which draft 4 ignores.
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def errors(manifest: dict) -> list[str]:
    v = validator(manifest["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in sorted(v.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "k8s" / name).read_text())


def cluster_spec(m: dict) -> dict:
    return m["spec"]["rayClusterSpec"] if m["kind"] == "RayJob" else m["spec"]


def pod_specs(m: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    spec = cluster_spec(m)
    return [("head", spec["headGroupSpec"]["template"]["spec"]),
            *((g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"])]


def dockerfile() -> tuple[str, str]:
    """(WORKDIR, Ray version of the base image) of k8s/Dockerfile."""
    text = (REPO / "k8s" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    ray = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)", text, re.M).group(1)
    return workdir, ray


def entry(m: dict) -> tuple[list[str], dict]:
    """The entry point's argv and its --options as a dict (RayJob only)."""
    argv = shlex.split(m["spec"]["entrypoint"])
    opts, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            opts[argv[i]] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        i += 1
    return argv, opts


def runtime_env(m: dict) -> dict:
    return yaml.safe_load(m["spec"].get("runtimeEnvYAML") or "{}") or {}


def is_object_store(name: str) -> bool:
    return name.endswith("-s3.yaml")


def test_manifests_exist():
    # Both kinds, each in a shared-volume and an object-storage variant.
    assert MANIFESTS == ["raycluster-s3.yaml", "raycluster.yaml", "rayjob-s3.yaml", "rayjob.yaml"], MANIFESTS


# ------------------------------------------------------------------------------------------ the CRD schemas


@needs_crds
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_against_the_kuberay_crd(name):
    m = load(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] in CRD_FILES, (m.get("apiVersion"), m.get("kind"))
    assert errors(m) == [], f"k8s/{name} does not validate against {CRD_DIR / CRD_FILES[m['kind']]}"


@needs_crds
def test_the_validator_rejects_unknown_fields_wrong_types_and_missing_required_fields():
    m = load("rayjob.yaml")
    typo = copy.deepcopy(m)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # "replica", not "replicas"
    assert any("'replica' was unexpected" in e for e in errors(typo)), errors(typo)
    wrong = copy.deepcopy(m)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert any("maxReplicas" in e and "'integer'" in e for e in errors(wrong)), errors(wrong)
    pod = copy.deepcopy(m)
    pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].pop("name")
    assert any("'name' is a required property" in e for e in errors(pod)), errors(pod)
    c = load("raycluster.yaml")
    del c["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in errors(c)), errors(c)


# ------------------------------------------------------------------------------------------ against the repo


@pytest.mark.parametrize("name", [n for n in MANIFESTS if n.startswith("rayjob")])
def test_job_entry_point_and_config_exist_in_the_repo(name):
    from pipeline.config import load_config

    m = load(name)
    argv, opts = entry(m)
    assert argv[:2] == ["python", "round.py"], argv
    assert (REPO / argv[1]).is_file()
    source = (REPO / "round.py").read_text()
    for opt in opts:  # every option the entry point passes is one round.py declares
        assert f'"{opt}"' in source, f"k8s/{name}: round.py has no option {opt}"
    config = REPO / opts["--config"]
    assert config.is_file(), f"k8s/{name}: --config {opts['--config']} is not a file of the repo"
    load_config(config)  # and a valid preset, not just a file
    assert "--run-dir" in opts, f"k8s/{name}: name the run directory, so a resubmission resumes the same run"
    workdir, _ = dockerfile()
    assert runtime_env(m).get("working_dir") == workdir, "the job's working_dir is where the image has the repo"


@pytest.mark.parametrize("name", MANIFESTS)
def test_image_ray_version_and_mounts_match(name):
    m = load(name)
    _, ray_version = dockerfile()
    assert cluster_spec(m)["rayVersion"] == ray_version, f"k8s/{name}: rayVersion vs k8s/Dockerfile's base image"
    images = {c["image"] for _, pod in pod_specs(m) for c in pod["containers"]}
    assert images == {"open-rstar:latest"}, images
    for group, pod in pod_specs(m):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"k8s/{name} {group}: mount {mount['name']!r} names no volume"


def _mounts(pod: dict, kind: str) -> list[str]:
    """Mount paths of the volumes of one kind (persistentVolumeClaim, emptyDir) in a pod."""
    names = {v["name"] for v in pod.get("volumes", []) if kind in v}
    return [mt["mountPath"] for c in pod["containers"] for mt in c.get("volumeMounts", []) if mt["name"] in names]


def _under(path: str, root: str) -> bool:
    return posixpath.commonpath([posixpath.normpath(path), root]) == root


@pytest.mark.parametrize("name", [n for n in MANIFESTS if not is_object_store(n)])
def test_shared_volume_variant_keeps_the_run_directory_on_the_claim_every_pod_mounts(name):
    m = load(name)
    claims = set()
    for group, pod in pod_specs(m):
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert "/app/runs" in _mounts(pod, "persistentVolumeClaim"), f"k8s/{name} {group}: runs/ claim not mounted"
    assert claims == {"open-rstar-runs"}, claims
    if m["kind"] == "RayJob":
        _, opts = entry(m)
        run_dir = opts["--run-dir"]
        # Ray runs the entry point in a copy of working_dir: a relative run directory would not be on the claim.
        assert posixpath.isabs(run_dir) and _under(run_dir, "/app/runs"), f"k8s/{name}: --run-dir {run_dir}"
        env = runtime_env(m)
        assert "runs/" in env.get("excludes", []), "the volume under working_dir must not be packaged with the job"
        assert _under(env["env_vars"]["HF_HOME"], "/app/runs"), "the model cache is shared through the claim"


@pytest.mark.parametrize("name", [n for n in MANIFESTS if is_object_store(n)])
def test_object_store_variant_needs_no_shared_volume_and_takes_credentials_from_a_secret(name):
    m = load(name)
    for group, pod in pod_specs(m):
        assert not any("persistentVolumeClaim" in v for v in pod.get("volumes", [])), f"k8s/{name} {group}"
        for c in pod["containers"]:
            secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            from_keys = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert secrets == ["open-rstar-s3"] or set(S3_CREDENTIALS) <= from_keys, \
                f"k8s/{name} {group}/{c['name']}: S3 credentials must come from the Secret open-rstar-s3"
            literal = [e["name"] for e in c.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
            assert not literal, f"k8s/{name} {group}/{c['name']}: credentials written into the manifest: {literal}"
    if m["kind"] == "RayJob":
        _, opts = entry(m)
        assert opts["--run-dir"].startswith("s3://"), opts["--run-dir"]
        hf_home = runtime_env(m)["env_vars"]["HF_HOME"]
        for group, pod in pod_specs(m):  # the cache is on each pod's own disk, not in the container's layer
            assert any(_under(hf_home, p) for p in _mounts(pod, "emptyDir")), f"k8s/{name} {group}: HF_HOME {hf_home}"
    # Checkpoints that shipped work downloads (pipeline.storage.shipping) go to each pod's emptyDir as well.
    for group, pod in pod_specs(m):
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])} | runtime_env(m).get("env_vars", {})
            cache = env.get("OPEN_RSTAR_NODE_CACHE")
            assert cache and any(_under(cache, p) for p in _mounts(pod, "emptyDir")), \
                f"k8s/{name} {group}/{c['name']}: OPEN_RSTAR_NODE_CACHE={cache!r} is not on the pod's emptyDir"


def _quantity(resources: dict, key: str, which: str) -> int:
    return int(str(resources.get(which, {}).get(key, 0)))


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_workers_and_autoscaling_bounds(name):
    spec = cluster_spec(load(name))
    assert spec.get("enableInTreeAutoscaling") is True, f"k8s/{name}: the worker groups are meant to autoscale"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", "the head runs the driver only: no engine on it"
    for c in head["template"]["spec"]["containers"]:
        assert _quantity(c["resources"], "nvidia.com/gpu", "limits") == 0
    for g in spec["workerGroupSpecs"]:
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert 1 <= lo <= n <= hi, f"k8s/{name} group {g['groupName']}: need 1 <= min {lo} <= replicas {n} <= max {hi}"
        (c,) = g["template"]["spec"]["containers"]
        gpus = _quantity(c["resources"], "nvidia.com/gpu", "limits")
        assert gpus >= 1, f"k8s/{name} group {g['groupName']}: GPU workers need an nvidia.com/gpu limit"
        # Kubernetes: an extended resource's request, when given, must equal its limit.
        assert _quantity(c["resources"], "nvidia.com/gpu", "requests") in (0, gpus)
