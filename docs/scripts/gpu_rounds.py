"""GPU rounds at BLIP-base size (random weights, bf16, batch 256): the model alone, then `run_round` end to
end over the world's web shards with DALI and Pillow, 1 and 2 actors, and once in-process without Ray.

    capfilt synth /tmp/w384 --set synth.image_size=384 --set synth.n_web=4000   # then copy to 16 shards
    python docs/scripts/gpu_rounds.py /tmp/w384 rounds.json [ROWS]   # ROWS: e.g. 2,3 of ROUNDS, from 0

One row runs the actor with Python's GIL switch interval at 0.5 ms instead of 5 ms, through a
sitecustomize that the actors' processes load (the driver's PYTHONPATH reaches them). Every row is printed
as it is measured, so a run that a time limit stops keeps the rows it reached; the most wanted run first.
"""

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from capfilt.bench import web_captions
from capfilt.config import load_config
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.data.specs import expand_shards
from capfilt.run import bench
from capfilt.run.pipeline import decoded_batches
from capfilt.run.round import run_round
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

SWITCH = 'import os, sys\nif os.environ.get("PY_SWITCH_INTERVAL"):\n    sys.setswitchinterval(float(os.environ["PY_SWITCH_INTERVAL"]))\n'
ROUNDS = [  # (what, decoder, actors, in-process, switch interval, shards in flight)
    ("1 actor, dali", "dali", 1, False, "", 1),
    ("1 actor, dali, 2 shards in flight", "dali", 1, False, "", 2),
    ("2 actors, dali", "dali", 2, False, "", 1),
    ("2 actors, dali, 2 shards in flight", "dali", 2, False, "", 2),
    ("in-process (no Ray), pillow", "pillow", 1, True, "", 1),
    ("1 actor, dali, switch interval 0.5 ms", "dali", 1, False, "0.0005", 1),
    ("2 actors, pillow", "pillow", 2, False, "", 1),
]

world, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config("blip-base")  # batch 256, 6 decode threads and CPUs per actor, bf16
tmp = tempfile.mkdtemp()
Path(tmp, "sitecustomize.py").write_text(SWITCH)
os.environ["PYTHONPATH"] = os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])
web = [str(world / "web-*.tar")]
cap, flt = bench.random_models(dataclasses.replace(cfg.model, image_size=384), tmp, web_captions(world))
rows = []


def add(what: str, images_per_s: float, detail: str = "") -> None:
    rows.append((what, images_per_s, detail))
    print(f"{what} | {images_per_s:,.1f} images/s | {detail}", flush=True)
    out.write_text(json.dumps(rows, indent=1))


pillow = PillowDecoder(cfg.run.image_size, cfg.run.decode_threads)
decoded = decoded_batches(ShardReader(expand_shards(web)[0]), pillow, cfg.run.batch_size)
batches = [(b.pixels.cuda(), [s.key for s in b.samples], [s.caption for s in b.samples]) for b in decoded]
r = cfg.run
ours = (Captioner(cap, cfg.caption, "cuda", r.seed, r.dtype), Filter(flt, cfg.filter, "cuda", r.dtype))
add(
    f"model only, batch {cfg.run.batch_size}, pixels on the GPU",
    bench.model_images_per_s({"ours": ours}, batches)["ours"],
)
del ours, batches
rows_wanted = [int(i) for i in sys.argv[3].split(",")] if len(sys.argv) > 3 else range(len(ROUNDS))
for what, decoder, n, local, switch, in_flight in [ROUNDS[i] for i in rows_wanted]:
    os.environ["PY_SWITCH_INTERVAL"] = switch
    run = copy.deepcopy(cfg)
    run.run.actors, run.run.decoder, run.run.num_gpus_per_actor = n, decoder, 1 / n
    run.run.shards_in_flight = in_flight
    start = time.perf_counter()
    summary = run_round(run, web, f"{tmp}/round-{len(rows)}", cap, flt, local=local, progress=False)
    s = summary["this_invocation"]
    stages = {k: round(v, 1) for k, v in s["stage_seconds"].items()}
    add(
        f"end to end, {s['n_in']:,} images, {what}",
        s["images_per_s"],
        f"{stages} startup {s['startup_seconds']} close {s['close_seconds']} wall {time.perf_counter() - start:.1f} s",
    )
