"""Credentials written into a recipe are refused: whatever a recipe holds is written to
recipe.yaml, plan.json, the sbatch script and the trackers' parameters. (Credentials in
the environment stay out of all of those: tests/integration/test_secrets.py.)"""

from __future__ import annotations

import pytest

from launcher.errors import UsageError
from launcher.recipe import load_recipe


def load(tmp_path, text: str, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path, list(overrides))[0]


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(UsageError) as info:
        load(tmp_path, text, overrides)
    return str(info.value)


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                                  "SLURM_JWT", "GOOGLE_APPLICATION_CREDENTIALS", "api_key"])
def test_a_slurm_env_variable_named_for_a_credential_is_refused(tmp_path, name):
    message = error_of(tmp_path, f"cluster:\n  slurm:\n    env:\n      NCCL_DEBUG: INFO\n      {name}: s3cr3t\n")
    assert message.startswith(f"error: cluster.slurm.env.{name} (line 5): a credential here would be written to "
                              "recipe.yaml, plan.json, the sbatch script")
    assert message.endswith("export it in the shell that runs dlaunch instead (sbatch passes that environment on "
                            "to the job)") and "s3cr3t" not in message


def test_a_credential_given_with_set_is_refused_and_not_repeated(tmp_path):
    message = error_of(tmp_path, "{}\n", ["cluster.slurm.env.HF_TOKEN=hf_s3cr3t"])
    assert message.startswith("error: cluster.slurm.env.HF_TOKEN (--set): a credential here") and "s3cr3t" not in message


def test_variables_that_only_contain_a_credential_word_are_taken(tmp_path):
    names = ["TOKENIZERS_PARALLELISM", "NCCL_IB_PKEY", "WANDB_MODE", "MONKEY_PATCH", "OMP_NUM_THREADS"]
    text = "cluster:\n  slurm:\n    env:\n" + "".join(f"      {name}: '1'\n" for name in names)
    assert list(load(tmp_path, text).cluster.slurm.env) == names


@pytest.mark.parametrize("uri,message", [
    ("https://me:s3cr3t@mlflow.example", "a password here would be written to recipe.yaml and plan.json; give it in "
                                         "MLFLOW_TRACKING_PASSWORD instead"),
    ("https://s3cr3t@mlflow.example", "a user name or token here would be written to recipe.yaml and plan.json; give "
                                      "it in MLFLOW_TRACKING_USERNAME, or a token in MLFLOW_TRACKING_TOKEN"),
    ("postgresql://me:s3cr3t@db/mlflow", "a password here would be written to recipe.yaml and plan.json; give it the "
                                         "database's own way (PGPASSWORD or ~/.pgpass, MYSQL_PWD or ~/.my.cnf)"),
    ("https://mlflow.example/?access_token=s3cr3t", "the query's access_token would be written to recipe.yaml and "
                                                    "plan.json; give a token in MLFLOW_TRACKING_TOKEN instead"),
    ("http://[::1:5000", "'http://[::1:5000' is not a URI: Invalid IPv6 URL"),
])
def test_a_tracking_uri_with_a_credential_is_refused(tmp_path, uri, message):
    text = f"logging:\n  mlflow:\n    tracking_uri: '{uri}'\n"
    assert error_of(tmp_path, text) == f"error: logging.mlflow.tracking_uri (line 3): {message}"


@pytest.mark.parametrize("uri", ["http://mlflow.example:5000", "sqlite:///runs/mlflow.db", "databricks",
                                 "databricks://profile:prefix", "postgresql://me@db/mlflow", "file:///tmp/mlruns"])
def test_a_tracking_uri_without_a_credential_is_taken(tmp_path, uri):
    assert load(tmp_path, f"logging:\n  mlflow:\n    tracking_uri: '{uri}'\n").logging.mlflow.tracking_uri == uri
