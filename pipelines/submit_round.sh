#!/usr/bin/env bash
# Submit one CapFilt round to a running Ray cluster with `ray job submit`; run it from cron for a
# nightly round over newly downloaded shards (e.g. `0 3 * * * cd /opt/capfilt && pipelines/submit_round.sh`).
# The run folder remembers its shards: shards already cleaned are skipped, new ones are cleaned, and
# OUT/summary.json and the dataset card (OUT/README.md, OUT/dataset_info.json) cover them all.
#
# Settings (environment): RAY_ADDRESS (the head's dashboard), SHARDS (a spec: glob, brace pattern or
# @list), OUT, CAPTIONER, FILTER, CONFIG, PYTHON. Extra arguments go to pipelines/run_round.py
# (e.g. --set run.batch_size=32).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
    "${PYTHON:-python}" pipelines/run_round.py "${SHARDS:-s3://capfilt-corpus/web/*.tar}" \
    --out "${OUT:-s3://capfilt-corpus/clean/nightly}" \
    --captioner "${CAPTIONER:-/mnt/models/captioner}" --filter "${FILTER:-/mnt/models/filter}" \
    --config "${CONFIG:-nightly}" "$@"
