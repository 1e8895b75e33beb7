"""Whether CPU pretraining is the same run to run: the demo config's pretraining from round 0's seeded MED
(``runs/demo/round-0/pretrain/init`` after ``make demo``) on two web shards and the human ones, with a
hash of every gradient and every parameter after each optimiser step. Run it several times with other
OUT folders and compare the printed lists (each in its own process, as two trainings are).

    python docs/scripts/train_determinism.py OUT STEPS
"""

import hashlib
import json
import sys

import torch

from capfilt.config import load_config
from capfilt.train.pretrain import pretrain

out, steps = sys.argv[1], int(sys.argv[2])
hashes: list[tuple[str, str]] = []
step = torch.optim.AdamW.step


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()[:12]


def hashed_step(self, *args, **kwargs):
    params = [p for group in self.param_groups for p in group["params"]]
    grads = digest(p.grad for p in params if p.grad is not None)
    result = step(self, *args, **kwargs)
    hashes.append((grads, digest(params)))
    return result


torch.optim.AdamW.step = hashed_step
cfg = load_config("demo", [f"pretrain.steps={steps}", f"pretrain.checkpoint_every={steps}"])
shards = ["shards/web-00000[0-1].tar", "shards/human-*.tar"]
pretrain(cfg, shards, out, init="runs/demo/round-0/pretrain/init")
print(json.dumps(hashes))
