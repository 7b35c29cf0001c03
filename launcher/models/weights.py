"""Initial weights (``model.init_from``): where they are (``resolve``, no torch), their
names and shapes (``read_shapes``, cheap: no tensor data is read where the format allows)
and the weights themselves in float32 (``read_weights``).

A run directory gives its final weights, model.pt. A checkpoint, once its files match
its manifest (launcher/manifest.py), gives what its engine saved: DeepSpeed ZeRO 1-3
the fp32 master weights, reassembled from every rank's partition by DeepSpeed's own
zero_to_fp32; a stage-0 DeepSpeed checkpoint the module's weights in the training
precision (as model.pt holds them); Accelerate its model file.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UsageError
from launcher.manifest import MANIFEST, verify
from launcher.models.facts import WeightsSource
from launcher.rundir import CHECKPOINTS, PLAN

if TYPE_CHECKING:
    import torch

KEY = "model.init_from"
FINAL_WEIGHTS = "model.pt"
# Where the engines put the model in a checkpoint's engine/ folder: DeepSpeed's tag
# folder (launcher/engines/deepspeed.py), or Accelerate's save_state() file (DDP, or
# FSDP with a full state dict).
DEEPSPEED_TAG = "deepspeed"
ACCELERATE_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

Shapes = dict[str, tuple[int, ...]]


def resolve(path: str) -> WeightsSource:
    """The weights ``path`` names: a run directory, a checkpoint of one, or a file."""
    try:
        return _resolve(path)
    except RuntimeError:  # `~user/...` of a user this host does not know
        raise UsageError(f"{path!r}: no such user's home directory", key=KEY) from None
    except OSError as exc:  # a path too long, unreadable, a loop of links
        raise UsageError(f"cannot read {path!r}: {exc.strerror or exc}", key=KEY) from None


def _resolve(path: str) -> WeightsSource:
    where = Path(path).expanduser().absolute()
    if where.is_dir():
        if (where / PLAN).is_file():
            weights = where / FINAL_WEIGHTS
            if not weights.is_file():
                raise UsageError(f"run {path!r} has no final weights ({FINAL_WEIGHTS}): it has not "
                                 f"finished; give one of its checkpoints ({CHECKPOINTS}/step-N)", key=KEY)
            return WeightsSource(str(weights), "torch")
        if where.parent.name == CHECKPOINTS and (where / "engine").is_dir():
            return _checkpoint_weights(_verified(where, path) / "engine", path)
        raise UsageError(f"{path!r} is neither a dlaunch run directory (it has no {PLAN}) nor one "
                         f"of its checkpoints ({CHECKPOINTS}/step-N)", key=KEY)
    if not where.is_file():
        raise UsageError(f"{path!r} does not exist", key=KEY)
    if where.suffix == ".safetensors":
        return WeightsSource(str(where), "safetensors")
    if where.suffix in TORCH_SUFFIXES:
        return WeightsSource(str(where), "torch")
    raise UsageError(f"{path!r} is not a weights file dlaunch reads: {', '.join(TORCH_SUFFIXES)} "
                     "(a torch state dict) or .safetensors", key=KEY)


def _verified(checkpoint: Path, path: str) -> Path:
    """``checkpoint``, if it is a complete one whose files match its manifest."""
    if checkpoint.name.startswith("."):
        raise UsageError(f"{path!r} is a checkpoint still being written, or one a crash cut short; give "
                         f"a complete one ({CHECKPOINTS}/step-N)", key=KEY)
    # One an older dlaunch wrote has no manifest: its weights are read as they are, as
    # a resume loads it (launcher/manifest.py, `loadable`).
    problems = verify(checkpoint) if (checkpoint / MANIFEST).exists() else []
    if problems:
        raise UsageError(f"checkpoint {path!r} is corrupt: {', '.join(problems)}; give another of its "
                         "run's checkpoints, or its model.pt", key=KEY)
    return checkpoint


def _checkpoint_weights(engine: Path, path: str) -> WeightsSource:
    if (engine / DEEPSPEED_TAG).is_dir():
        return WeightsSource(str(engine / DEEPSPEED_TAG), "deepspeed")
    for name in ACCELERATE_FILES:
        if (engine / name).is_file():
            kind = "safetensors" if name.endswith(".safetensors") else "torch"
            return WeightsSource(str(engine / name), kind)
    raise UsageError(f"checkpoint {path!r} holds no model weights dlaunch reads (a DeepSpeed "
                     f"checkpoint, or one of {', '.join(ACCELERATE_FILES)}; a sharded FSDP checkpoint "
                     "is not one: start from the run's model.pt)", key=KEY)


def read_shapes(source: WeightsSource) -> Shapes:
    """Every weight's name and shape; reads no tensor data from safetensors and mmaps a
    torch file."""
    if source.format == "safetensors":
        from safetensors import safe_open

        with _readable(source), safe_open(source.path, framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    if source.format == "torch":
        return {name: tuple(t.shape) for name, t in _torch_state_dict(source).items()}
    return _deepspeed_shapes(Path(source.path))


def read_weights(source: WeightsSource) -> dict[str, torch.Tensor]:
    """Every weight, floating-point ones in float32, on the CPU."""
    if source.format == "safetensors":
        from safetensors.torch import load_file

        with _readable(source):
            state = load_file(source.path, device="cpu")
    elif source.format == "torch":
        state = _torch_state_dict(source)
    else:
        state = _deepspeed_weights(Path(source.path))
    return {name: t.detach().float() if t.is_floating_point() else t.detach() for name, t in state.items()}


@contextlib.contextmanager
def _readable(source: WeightsSource):
    """A file that is not what its name says is bad input, not a crash."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise UsageError(f"cannot read {source.path!r} as {source.format} weights: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", key=KEY) from None


def _torch_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    with _readable(source):
        try:
            loaded = torch.load(source.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:  # not plain tensors (weights_only refuses objects)
            raise ValueError(exc) from None
    # A plain state dict, or one inside a training checkpoint (PyTorch Lightning, timm and
    # many repositories save {"state_dict": ...} or {"model": ...}).
    for candidate in (loaded, *(loaded.get(k) for k in ("state_dict", "model") if isinstance(loaded, dict))):
        if _is_state_dict(candidate):
            return candidate
    raise UsageError(f"{source.path!r} holds no state dict (a mapping of names to tensors)", key=KEY)


def _is_state_dict(value: Any) -> bool:
    import torch

    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _deepspeed_states(tag_dir: Path) -> dict[str, Any]:
    """Rank 0's model-states file: the module's state dict (parameters empty under
    ZeRO-3), the parameter shapes and the buffer names."""
    import torch

    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise UsageError(f"{str(tag_dir)!r} holds no DeepSpeed model states (*model_states.pt)", key=KEY)
    # DeepSpeed pickles its config and version objects beside the tensors: a checkpoint
    # DeepSpeed wrote is trusted as DeepSpeed's own loader trusts it.
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)


def _deepspeed_shapes(tag_dir: Path) -> Shapes:
    states = _deepspeed_states(tag_dir)
    shapes: Shapes = {name: tuple(t.shape) for name, t in states["module"].items()}
    # Under ZeRO-3 the module's parameters are empty: their shapes are recorded apart.
    for group in states.get("param_shapes") or []:
        shapes.update((name, tuple(shape)) for name, shape in group.items())
    shapes.update((name, tuple(shape)) for name, shape in (states.get("frozen_param_shapes") or {}).items())
    for name, shared_with in (states.get("shared_params") or {}).items():
        shapes[name] = shapes[shared_with]
    return shapes


def _deepspeed_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    if not any(tag_dir.glob("*optim_states.pt")):
        # Stage 0 keeps the optimizer beside the module: the module holds every weight.
        return dict(_deepspeed_states(tag_dir)["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints its progress on stdout and stderr; a rank's log needs none of it.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
