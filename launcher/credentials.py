"""Which environment variables hold credentials, judged by their names.

Two judgements, for two costs of being wrong. What dlaunch records (env.json) or lets a
tracker record leaves out any variable a credential's word appears in: hiding a harmless
one (TOKENIZERS_PARALLELISM) costs nothing. What the schema refuses to take into a recipe
must name a credential outright, as one of its `_`-separated words (WANDB_API_KEY,
HF_TOKEN, AWS_SECRET_ACCESS_KEY, SLURM_JWT): refusing NCCL_IB_PKEY or
TOKENIZERS_PARALLELISM would stop a run for nothing.
"""

from __future__ import annotations

_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "JWT")
_NAMES = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "JWT"}


def may_hold_credential(name: str) -> bool:
    """Whether a variable is kept out of anything written: a credential's word is in its name."""
    return any(word in name.upper() for word in _WORDS)


def names_credential(name: str) -> bool:
    """Whether a variable is a credential by name: one of its `_`-separated words is one."""
    return any(part in _NAMES for part in name.upper().split("_"))
