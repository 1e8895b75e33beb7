"""The round's fixed start-up on a local Ray: ``ray.init``, then two one-core actors that import MODULES
in their constructor, until both answer, then ``ray.shutdown``. Comparing what the actor imports now
(``capfilt.run.worker``: torch and transformers' BLIP modules) with what it would import without
transformers tells what an inference path free of transformers would save.

    python docs/scripts/cpu_actor_start.py capfilt.run.worker
    python docs/scripts/cpu_actor_start.py torch,safetensors.torch,tokenizers,capfilt.run.pipeline
"""

import importlib
import sys
import time

import ray


class Importer:
    def __init__(self, modules: list[str]):
        for name in modules:
            importlib.import_module(name)

    def ready(self) -> bool:
        return True


modules = sys.argv[1].split(",")
start = time.perf_counter()
ray.init(include_dashboard=False)
up = time.perf_counter()
actors = [ray.remote(Importer).options(num_cpus=1).remote(modules) for _ in range(2)]
ray.get([a.ready.remote() for a in actors])
ready = time.perf_counter()
ray.shutdown()
end = time.perf_counter()
print(
    f"{sys.argv[1]}: ray.init {up - start:.1f} s, actors ready {ready - up:.1f} s, shutdown {end - ready:.1f} s"
)
