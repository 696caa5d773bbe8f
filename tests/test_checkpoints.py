"""Checkpoint files are byte-reproducible: the same state and metadata give the same bytes,
and so the same SHA-256 and cache keys, in any process (docs/reliability.md)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from runtime.checkpoints import Checkpoint, load_state, save_state

REPO = Path(__file__).resolve().parents[1]
META = {f"key_{i}": str(i) for i in range(12)} | {"layer": "2", "seed": "0"}

WRITER = """
import sys, torch
from pathlib import Path
from runtime.checkpoints import save_state
g = torch.Generator().manual_seed(0)
state = {"encoder.linear.weight": torch.randn(7, 5, generator=g),
         "encoder.linear.bias": torch.zeros(7), "b_prime": torch.ones(5, dtype=torch.bfloat16)}
meta = dict(sorted({f"key_{i}": str(i) for i in range(12)}.items(), reverse=True))
meta.update(layer="2", seed="0")
print(save_state(state, Path(sys.argv[1]), meta).sha256)
"""


def test_the_same_checkpoint_from_two_processes_has_the_same_bytes(tmp_path):
    """safetensors writes its metadata from a hash map, in an order that differs between
    processes; with 14 keys two processes all but never agree unless the header is made
    canonical. Each process also randomises its string hashing (PYTHONHASHSEED)."""
    digests = []
    for i, seed in enumerate(("1", "2", "3")):
        out = tmp_path / f"c{i}.safetensors"
        proc = subprocess.run([sys.executable, "-c", WRITER, str(out)], cwd=REPO, text=True,
                              capture_output=True, env={"PYTHONHASHSEED": seed,
                                                        "PATH": "/usr/bin:/bin"}, check=True)
        digests.append(proc.stdout.strip())
    files = [(tmp_path / f"c{i}.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    assert len(set(digests)) == 1


def test_a_canonical_checkpoint_loads_with_its_tensors_and_metadata(tmp_path):
    from safetensors import safe_open

    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
             "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}
    ck = save_state(state, tmp_path / "x.safetensors", META)
    raw = ck.path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0  # the format's alignment of the data section
    header = json.loads(raw[8:8 + n])
    assert list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(META)
    loaded = load_state(Checkpoint(path=ck.path, sha256=ck.sha256))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with safe_open(str(ck.path), "pt") as fh:
        assert fh.metadata() == META
