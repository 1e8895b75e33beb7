"""Which one-wrong-attribute web captions a round's filter let through, by what is wrong (docs/RESULTS.md).

Reads a finished round's *.scores.parquet (the round-0 filter's ITM of every web caption) and the demo
world's truth.parquet, finds for each attribute-noise caption the words that its scene contradicts
(a shape, size or colour named in the caption that no object, or for colour the background, has;
none of them: the words are true but bound to the wrong object or relation), and prints the share
dropped at the threshold the round used.

python docs/scripts/attribute_misses.py runs/demo/round-1/run shards/truth.parquet
"""

import collections
import glob
import json
import sys

import pyarrow.parquet as pq

run, truth_path = sys.argv[1], sys.argv[2]
threshold = json.load(open(f"{run}/summary.json"))["threshold"]
truth = {r["key"]: r for r in pq.read_table(truth_path).to_pylist()}
scenes = {k: json.loads(r["scene"]) for k, r in truth.items()}
vocab = {
    attr: {o[attr] for s in scenes.values() for o in s["objects"]} for attr in ("shape", "size", "color")
}
counts = collections.defaultdict(lambda: [0, 0])
for path in sorted(glob.glob(f"{run}/*.scores.parquet")):
    for row in pq.read_table(path, columns=["key", "caption", "candidates"]).to_pylist():
        if truth[row["key"]]["noise_type"] != "attribute":
            continue
        scene, words = scenes[row["key"]], row["caption"].replace(",", " ").split()
        wrong = []
        for attr in ("shape", "size", "color"):
            present = {o[attr] for o in scene["objects"]} | (
                {scene["background"]["color"]} if attr == "color" else set()
            )
            if any(w in vocab[attr] and w not in present for w in words):
                wrong.append(attr)
        kind = f"{'+'.join(wrong) or 'binding or relation'}, {len(scene['objects'])} object(s)"
        web = next(c for c in row["candidates"] if c["source"] == "web")
        counts[kind][0] += 1
        counts[kind][1] += web["itm"] < threshold
print(f"threshold {threshold:.3f}")
for kind, (n, dropped) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
    print(f"| {kind} | {n} | {dropped / n:.2f} |")
