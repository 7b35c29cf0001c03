"""The CLI stays light: --help, validate and plan never import torch, nor the libraries of
the optional sinks (mlflow, wandb)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

HEAVY = ("torch", "deepspeed", "accelerate", "ray", "nvidia.dali", "mlflow", "wandb")


def modules_after(argv: list[str], prelude: str = "") -> set[str]:
    code = (
        f"import sys\n{prelude}\n"
        "from launcher.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('MODULES:', *(m for m in sys.modules if m.split('.')[0] in {[h.split('.')[0] for h in HEAVY]!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    [listing] = [line for line in out.stdout.splitlines() if line.startswith("MODULES:")]
    return set(listing.split()[1:])


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["plan", "recipes/quickstart.yaml", "--nodes", "4"],
    ["plan", "recipes/quickstart.yaml", "--json"],
    ["plan", "recipes/quickstart.yaml", "--cluster", "ray", "--nodes", "2"],
    ["validate", "recipes/quickstart.yaml"],
    ["validate", "recipes/quickstart.yaml", "--set", "logging.mlflow.enabled=true",
     "--set", "logging.wandb.enabled=true"],
])
def test_command_imports_no_torch(argv):
    assert modules_after(argv) == set()


def test_the_check_sees_torch_when_it_is_imported():
    """The same probe reports torch once something imports it: the check can fail."""
    assert "torch" in modules_after(["validate", "recipes/quickstart.yaml"], prelude="import torch")
