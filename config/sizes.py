"""Split-size rules of the data stage, shared by the pre-start-up check and the loader.

How the validation split is chosen (``data.n_valid``):

- a named dataset (``mnist``, ``fashion-mnist``, ``kmnist``, ``mnist-bg-rand``,
  ``mnist-rot``): the LAST ``n_valid`` of the 60,000 training images, 10,000 by default
  (MNIST's reference split: 50k train / 10k valid, as in the reference tutorial);
- a file with its own validation split (``x_valid``/``y_valid`` in an ``.npz``, or rows
  marked ``valid`` in a table's ``split`` column): that split; ``n_valid`` must stay unset;
- any other file: an explicit ``n_valid`` takes the LAST ``n_valid`` training rows;
  unset, a class-stratified, seeded (``data.subset_seed``) ``data.valid_fraction`` of them.

Every rule needs only row counts, so it is checked from the file's header before any
server starts, and again on the loaded arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from sources.fractions import fraction_count

class DataSizes(Protocol):
    """The fields of the data config (``config.stages.DataConfig``) the rules read; the
    config validates with these rules, so they name it by its shape, not by an import."""

    dataset: str
    n_valid: Optional[int]
    valid_fraction: float
    n_train: Optional[int]

    @property
    def is_named(self) -> bool: ...

#: Size of the official MNIST-style training set and the reference validation split.
MNIST_TRAIN_POOL = 60_000
MNIST_VALID_SIZE = 10_000


@dataclass(frozen=True)
class SplitPlan:
    """How the training pool splits into training and validation rows.

    Args:
        n_pool: rows the training split (and, unless ``valid_from == "file"``, the
            validation split) come from.
        n_valid: validation rows.
        valid_from: ``"last"`` (the last rows of the pool), ``"file"`` (the file's own
            split) or ``"stratified"`` (a seeded, class-stratified fraction of the pool).
    """

    n_pool: int
    n_valid: int
    valid_from: str

    @property
    def n_fit(self) -> int:
        """Training rows before any ``n_train`` subset."""
        return self.n_pool if self.valid_from == "file" else self.n_pool - self.n_valid


def plan_split(cfg: DataSizes, n_pool: int, n_file_valid: Optional[int]) -> SplitPlan:
    """The split ``cfg`` asks for on a pool of ``n_pool`` rows (see the module docstring)."""
    if cfg.is_named:
        return SplitPlan(n_pool, cfg.n_valid or MNIST_VALID_SIZE, "last")
    if n_file_valid is not None:
        return SplitPlan(n_pool, n_file_valid, "file")
    if cfg.n_valid is not None:
        return SplitPlan(n_pool, cfg.n_valid, "last")
    return SplitPlan(n_pool, fraction_count(cfg.valid_fraction, n_pool), "stratified")


def size_problems(
    cfg: DataSizes, plan: SplitPlan, batch_sizes: Optional[dict[str, int]] = None
) -> list[str]:
    """Every size rule ``cfg`` (and the batch sizes) break on ``plan``, each with its fix.

    Args:
        cfg: the data config.
        plan: the split from :func:`plan_split`.
        batch_sizes: ``{"pretrain.batch_size": 20, ...}`` to check against the training set.

    Returns:
        One message per problem, naming the key, the value and a value that works.
    """
    src = cfg.dataset
    if plan.valid_from == "file" and cfg.n_valid is not None:
        return [f"data.n_valid={cfg.n_valid} is set, but {src} carries its own validation "
                f"split ({plan.n_valid} rows). Fix: leave data.n_valid unset "
                "(--set data.n_valid=null) to use it"]  # fmt: skip
    if plan.valid_from != "file" and plan.n_pool < 2:
        return [f"{src} has {plan.n_pool} training row(s): too small for any setting. Fix: "
                "give it at least 2 (one to train on, one to validate), or a validation "
                "split of its own (x_valid/y_valid in an .npz)"]  # fmt: skip
    problems = []
    if plan.n_fit < 1:  # name the fix, then check the rest as if it were applied
        fix = (MNIST_VALID_SIZE if cfg.is_named
               else fraction_count(cfg.valid_fraction, plan.n_pool))  # what "unset" gives
        problems.append(f"data.n_valid={plan.n_valid} leaves no training data: {src} has "
                        f"{plan.n_pool} training examples. Fix: --set data.n_valid={fix}, or "
                        "leave it unset")  # fmt: skip
        plan = SplitPlan(plan.n_pool, fix, plan.valid_from)
    n_train = plan.n_fit
    if cfg.n_train is not None and cfg.n_train > plan.n_fit:
        problems.append(
            f"data.n_train={cfg.n_train} is above the {plan.n_fit} training examples that "
            f"exist ({plan.n_pool} minus {plan.n_valid} for validation). Fix: --set "
            f"data.n_train={plan.n_fit}, or data.n_train=null for all of them")
    elif cfg.n_train is not None:
        n_train = cfg.n_train
    for key, bs in (batch_sizes or {}).items():
        if bs > n_train:
            problems.append(f"{key}={bs} is larger than the training set ({n_train} "
                            f"examples). Fix: --set {key}={n_train}")  # fmt: skip
    return problems
