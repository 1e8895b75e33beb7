"""Where a local Ray's start and stop go, as a ``capfilt run`` without ``--address`` starts one: ``ray.init``
and ``ray.shutdown`` under cProfile (the calls that wait), and the raylet's own log, whose timestamps show
how long it waited for its agents before it registered. Run it on an idle machine with no Ray running.

    python docs/scripts/cpu_ray_start.py
"""

import cProfile
import glob
import pstats
import re
import time

import ray

WAITS = ("get_node", "start_api_server", "connect", "kill_all_processes", "_kill_process_type")

for step, call in (("ray.init", lambda: ray.init(include_dashboard=False)), ("ray.shutdown", ray.shutdown)):
    if step == "ray.shutdown":
        log = sorted(glob.glob("/tmp/ray/session_latest/logs/raylet.out"))
        lines = open(log[0]).read().splitlines() if log else []
        for pattern in (
            "Monitor agent process with name dashboard_agent",
            "Initializing exporter",
            "Raylet of id",
        ):
            stamp = next((line[1:24] for line in lines if pattern in line), "not found")
            print(f"raylet log: {stamp}  {pattern}")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(call)
    print(f"{step}: {time.perf_counter() - start:.2f} s, of which")
    stats = pstats.Stats(profile).stats
    for (path, _, name), (_, _, _, cumulative, _) in stats.items():
        if name in WAITS and re.search(r"ray/_private/(node|services|state|worker)\.py$", path):
            print(f"  {name} ({path.rsplit('/', 1)[1]}): {cumulative:.2f} s")
