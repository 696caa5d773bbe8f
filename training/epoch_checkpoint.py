"""A training stage's resume point: everything it needs to continue exactly after a kill,
written at the end of every epoch.

One file of safetensors holds the state a ``training.engine.PopulationSystem`` gives
(``training_state``): the population's weights, the optimiser's state, each member's best
weights, the random-number states of noise and dropout, and, in the header, the epoch, the
step count, the early-stopping state, the members still training and the histories. The
data order needs no state: epoch e's order is a function of (seed, e).

An epoch that runs longer than a set number of seconds is also checkpointed inside, between
two chunks of minibatches (``position``: the chunks done; the epoch's partial sums kept).

Two slots, written in turn (``epoch-a``, ``epoch-b``), each atomically
(``runtime.checkpoints.atomic_write``) and carrying the digest of its tensors
(``runtime.checkpoints.tensor_sha256``): a write cut short (a ``.tmp`` file left over, or a slot whose tensors no longer match their digest)
leaves the other slot, one checkpoint older, to continue from. Disk use is at most two
checkpoints; ``remove`` deletes them when the stage has finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from runtime.checkpoints import atomic_write, tensor_sha256

SLOTS = ("epoch-a.safetensors", "epoch-b.safetensors")
FORMAT = "layerwise-epoch-checkpoint-1"

#: (tensors on the CPU, the JSON-able rest)
TrainingState = tuple[dict[str, torch.Tensor], dict[str, Any]]


class EpochCheckpoint:
    """The latest epoch of one stage, in ``folder``.

    Args:
        folder: Where the two slots live (the stage's own, cache-keyed directory).
        identity: What the stage is (its members, seeds, sizes): a checkpoint of another
            identity is never resumed from.
    """

    def __init__(self, folder: Path, identity: dict[str, Any]):
        self.folder = Path(folder)
        self.identity = json.dumps(identity, sort_keys=True)
        self.notes: list[str] = []  # what ``load`` found worth saying
        self.newest: Optional[str] = None  # the slot of the newest intact checkpoint

    def save(self, state: TrainingState) -> Path:
        """Write ``state`` over the older slot (the newer one stays until this succeeds)."""
        tensors, meta = state
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        header = {"format": FORMAT, "identity": self.identity, "sha256": tensor_sha256(tensors),
                  "meta": json.dumps(meta)}
        path = self.folder / (SLOTS[1] if self.newest == SLOTS[0] else SLOTS[0])
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        self.newest = path.name
        return path

    def load(self) -> Optional[TrainingState]:
        """The newest intact checkpoint of this identity, or None. A slot cut short or
        damaged, or a write left unfinished, is skipped with a note in ``notes``."""
        found, broken = {}, [p.name for p in self.folder.glob(".epoch-*.tmp")]
        for name in SLOTS:
            path = self.folder / name
            if not path.is_file():
                continue
            state = _read(path, self.identity)
            if state is None:
                broken.append(name)
            elif state != "other":
                found[name] = state
        for leftover in self.folder.glob(".epoch-*.tmp"):
            leftover.unlink(missing_ok=True)
        self.newest = max(found, key=lambda n: _when(found[n][1]), default=None)
        best = found.get(self.newest) if self.newest else None
        if broken:
            where = (f"continuing from the one of {_describe(best[1])}" if best
                     else "no intact one is left, starting the stage over")
            self.notes.append(f"a checkpoint in {self.folder} was cut short while it was "
                              f"written ({', '.join(sorted(broken))}): {where}")
        return best

    def remove(self) -> None:
        """Delete both slots and any unfinished write: the stage has finished."""
        for name in SLOTS:
            (self.folder / name).unlink(missing_ok=True)
        for leftover in self.folder.glob(".epoch-*.tmp"):
            leftover.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _when(meta: dict[str, Any]) -> tuple[int, int]:
    """How far a checkpoint is: (epochs done, chunks done of the epoch after them)."""
    return meta["epoch"], meta.get("position", 0)


def _describe(meta: dict[str, Any]) -> str:
    epoch, position = _when(meta)
    return f"epoch {epoch}" + (f" and {position} chunks of the next" if position else "")


def _read(path: Path, identity: str) -> Any:
    """The state in ``path``; ``"other"`` for another stage's; None when it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != FORMAT:
                return None
            if header.get("identity") != identity:
                return "other"
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # noqa: BLE001 - any failure to parse is a damaged file
        return None
    if tensor_sha256(tensors) != header.get("sha256"):
        return None
    return tensors, json.loads(header["meta"])


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every name under ``prefix.``."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix.…``, with the prefix taken off."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_state(opt: Optional[torch.optim.Optimizer]) -> TrainingState:
    """An optimiser's ``state_dict`` split into tensors and JSON (None: nothing)."""
    if opt is None:
        return {}, {}
    sd = opt.state_dict()
    tensors, rest = {}, {"param_groups": sd["param_groups"], "state": {}}
    for index, values in sd["state"].items():
        rest["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                rest["state"][str(index)][key] = value
    return tensors, rest


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         rest: dict[str, Any]) -> None:
    """Inverse of ``optimizer_state``."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def generator_states(generators: Optional[list[torch.Generator]]) -> list[torch.Tensor]:
    return [g.get_state() for g in generators or []]


def note(say: Callable[[str], None], checkpoint: EpochCheckpoint) -> None:
    """Pass on what ``load`` found worth saying, once."""
    for text in checkpoint.notes:
        say(text)
    checkpoint.notes.clear()
