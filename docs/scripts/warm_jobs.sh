#!/usr/bin/env bash
# Warm actors kept by one `ray job submit --working-dir .` and taken by the next (docs/BENCHMARKS.md,
# "Warm actors on a running cluster"): a head and a worker node of one CPU each on this machine, then three
# nightly rounds as pipelines/submit_round.sh submits them, each printing its summary's startup_seconds.
# Usage, from the repository root: bash docs/scripts/warm_jobs.sh MODELS OUT
#   MODELS: a finetune folder (captioner/, filter/), e.g. runs/demo/round-0/finetune; OUT: a new folder.
set -u
MODELS=$(realpath "$1") OUT=$2 ROOT=$PWD
export RAY_AUTH_MODE=disabled PATH=$ROOT/.venv/bin:$PATH
rm -rf "$OUT" /tmp/ray-wh /tmp/ray-ww
setsid ray start --head --port=6391 --dashboard-port=8271 --num-cpus=1 --node-ip-address=127.0.0.1 \
    --temp-dir=/tmp/ray-wh --disable-usage-stats --block > /dev/null 2>&1 &
sleep 12
setsid ray start --address=127.0.0.1:6391 --num-cpus=1 --node-ip-address=127.0.0.1 \
    --dashboard-agent-listen-port=52367 --temp-dir=/tmp/ray-ww --block > /dev/null 2>&1 &
sleep 12
for night in 1 2 3; do
    spec="$ROOT/shards/web-00000{0,1}.tar"
    [ "$night" = 1 ] || spec="$ROOT/shards/web-00000{0,1,2,3}.tar"
    /usr/bin/time -f "night $night: ray job submit took %e s" ray job submit --address http://127.0.0.1:8271 \
        --working-dir . -- python pipelines/run_round.py "$spec" --out "$OUT" \
        --captioner "$MODELS/captioner" --filter "$MODELS/filter" --human "$ROOT/shards/human-*.tar" \
        --set run.keep_actors=true --set run.actors=2 2>&1 | tail -1
    python -c "import json; s = json.load(open('$OUT/summary.json'))['this_invocation']; \
print('night $night:', s['shards'], 'shard(s) cleaned; startup_seconds', s['startup_seconds'])"
    ray list actors --address http://127.0.0.1:8271 --filter state=ALIVE --filter class_name=ShardActor \
        --detail 2>/dev/null | grep -E "^ +(name|node_id):"
done
capfilt actors --address 127.0.0.1:6391 --stop
ray stop --force > /dev/null 2>&1
