"""Credentials given through the environment never reach a run's files, its output or a
rendered sbatch script: a real run with every sink on (metrics.jsonl, TensorBoard, MLflow
in its default SQLite store, W&B offline) and a Slurm dry run, each with sentinel values
in the variables MLflow, W&B, Hugging Face, AWS and others read, then every byte of every
file under the run root searched for them: SQLite, TensorBoard events and W&B's .wandb
log included, as raw bytes. A Ray job's record (ray/job.json) is not run here: it needs a
Ray cluster, and it holds the cluster's address and auth mode, never its token.

Recipe values that carry credentials are refused by the schema instead
(tests/unit/test_recipe_secrets.py)."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import dlaunch

pytestmark = pytest.mark.integration

NAMES = ["WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
         "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "AZURE_STORAGE_KEY",
         # Prefixes env.json keeps for reproducibility, with a credential's name:
         "DLAUNCH_API_TOKEN", "TORCH_HUB_TOKEN", "NCCL_SECRET", "CUDA_PASSWORD",
         # W&B records every SLURM_* variable; Slurm's REST token is one:
         "SLURM_JWT", "SLURM_JOB_ACCOUNT_KEY"]
# 40 hex digits, as a W&B key has; one per variable, so that a find names its source.
SECRETS = {name: hashlib.sha1(f"dlaunch-sentinel-{name}".encode()).hexdigest() for name in NAMES}
VISIBLE = {"DLAUNCH_SENTINEL_VISIBLE": "seen-in-env-json", "SLURM_CLUSTER_NAME": "seen-by-wandb"}

RECIPE = """name: secrets
model: {{name: mlp, kwargs: {{hidden: [16]}}}}
data: {{source: synthetic, samples: 256, num_features: 8, num_classes: 2}}
precision: {{dtype: fp32}}
train: {{micro_batch_size: 16, max_steps: 6, eval_every: 3}}
logging:
  run_root: {root}
  log_every: 2
  progress: false
  report: false
  tensorboard: true
  mlflow: {{enabled: true}}
  wandb: {{enabled: true, mode: offline}}
"""


def leaks(text_or_bytes: str | bytes) -> list[str]:
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return [name for name, secret in SECRETS.items() if secret.encode() in data]


def test_credentials_in_the_environment_reach_no_file_no_output_and_no_sbatch_script(tmp_path):
    runs = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=runs))
    run = dlaunch("run", str(recipe), "--procs-per-node", "2", cwd=tmp_path, env={**SECRETS, **VISIBLE})
    assert run.returncode == 0, run.stderr[-4000:]
    script = dlaunch("run", str(recipe), "--cluster", "slurm", "--dry-run", cwd=tmp_path, env={**SECRETS, **VISIBLE})
    assert script.returncode == 0 and "#SBATCH --nodes=1" in script.stdout, script.stderr

    files = [path for path in runs.rglob("*") if path.is_file()]
    [run_dir] = [path for path in runs.iterdir() if path.name.startswith("secrets-")]
    # The search reads what it must: the stores hold the run's own words as plain bytes.
    stores = {"mlflow.db": runs / "mlruns" / "mlflow.db", ".wandb": next(run_dir.glob("wandb/*/*.wandb")),
              "tfevents": next((run_dir / "tb").glob("events.out.tfevents.*"))}
    for store in stores.values():
        content = store.read_bytes()
        assert run_dir.name.encode() in content or b"micro_batch_size" in content, \
            f"{store} holds none of the run's text: a sentinel would not be seen in it either"
    # What may be recorded still is: env.json keeps the DLAUNCH_ variables, W&B the SLURM_ ones.
    assert VISIBLE["DLAUNCH_SENTINEL_VISIBLE"] in (run_dir / "env.json").read_text()
    assert VISIBLE["SLURM_CLUSTER_NAME"].encode() in stores[".wandb"].read_bytes()

    found = {str(path.relative_to(runs)): leaks(path.read_bytes()) for path in files}
    found.update({"run stdout": leaks(run.stdout), "run stderr": leaks(run.stderr),
                  "sbatch script": leaks(script.stdout), "dry-run stderr": leaks(script.stderr)})
    assert {where: names for where, names in found.items() if names} == {}
