"""The order in which an ablation submits its tasks (``flows.submission``): what waits for
nothing goes first."""

from __future__ import annotations

import pytest

from config.grid import GRIDS_DIR, customise, expand, load_grid


class _Recorder:
    """Stands in for a Prefect task: records what is submitted, in order."""

    def __init__(self, kind: str, order: list):
        self.kind, self.order = kind, order

    def with_options(self, task_run_name: str, **_):
        self.name = task_run_name
        return self

    def submit(self, *args):
        self.order.append((self.kind, self.name))
        return object()


class _Runs:
    def live(self, cell):
        return None

    def layer_live(self, key):
        return None


@pytest.mark.parametrize("population", [1, 10])
def test_tasks_that_wait_for_nothing_are_submitted_first(monkeypatch, population):
    """Prefect's process pool resolves input futures in as many threads as it has workers,
    in submission order: a random-init cell submitted after the layers above layer 1 waited
    for them (flows.submission.ready_first). Layer 1 and the random arm go first; a layer
    still follows the layers below it."""
    from flows import submission
    from tasks.ablation_plan import pretraining_plan

    order: list = []
    for name, kind in [("pretrain_layer", "layer"), ("pretrain_population", "layer"),
                       ("run_cell", "cell"), ("run_population_cells", "cell")]:
        monkeypatch.setattr(submission, name, _Recorder(kind, order))
    cells = expand(customise(load_grid(GRIDS_DIR / ("tutorial.yaml" if population == 1
                                                    else "erhan-small.yaml"))))
    nodes, stacks = pretraining_plan(cells)
    submission._submit(cells, nodes, stacks, population, "home", 1, {}, lambda _: None, _Runs())
    names = [name for _, name in order]
    first_waiting = next(i for i, name in enumerate(names) if name.startswith("layer-2"))
    ready = names[:first_waiting]
    mark = "cell/init=tutorial" if population == 1 else "cells/random-"

    def is_random(name: str) -> bool:
        return name.startswith(mark)

    random_cells = [name for name in names if is_random(name)]
    assert random_cells and set(random_cells) <= set(ready)
    assert all(name.startswith("layer-1") or is_random(name) for name in ready)
    for k in (2, 3):  # every layer k after every layer k-1 it may read
        assert max(i for i, n in enumerate(names) if n.startswith(f"layer-{k - 1}")) < \
            min(i for i, n in enumerate(names) if n.startswith(f"layer-{k}"))
    if population == 1:
        assert names[:2] == [names[0], "cell/init=tutorial,seed=0"]
