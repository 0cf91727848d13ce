"""Measure the black-box attacks on quickstart-trained few-shot learners (resumable).

    OMP_NUM_THREADS=1 nohup python scripts/blackbox_glyphs.py > /tmp/blackbox_glyphs.log 2>&1 &

Trains MAML and R-MAML with configs/quickstart.yaml into runs/blackbox_glyphs/ (skipped when the
checkpoint exists), then runs configs/blackbox/glyphs_linf.yaml on each (skipped when its result
exists) and writes scripts/results/blackbox_glyphs.json and a plot per model (committed).

Sized for a shared 2-core CPU: MAML's transductive batch norm makes every query a forward of the
whole query set (the image inside its clean batch), so the attacked episodes are 5-way 1-shot
3-query (15 query images, frozen with seed 0 into runs/blackbox_glyphs/episodes_3query.json) and
the budget is 200 queries. Extra arguments are blackbox overrides (e.g. budget=500 episodes=8).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metarobust.blackbox.run import blackbox_table, load_blackbox_config, run_blackbox  # noqa: E402
from metarobust.data.datasets import load_split  # noqa: E402
from metarobust.data.manifest import freeze_episodes, save_manifest  # noqa: E402
from metarobust.experiment import load_config, train_and_evaluate  # noqa: E402

OUT = ROOT / "runs" / "blackbox_glyphs"
RESULT = ROOT / "scripts" / "results" / "blackbox_glyphs.json"
SETTINGS = ["budget=200", "episodes=4", *sys.argv[1:]]


def main() -> None:
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    manifest = OUT / "episodes_3query.json"
    for recipe in ("maml", "r_maml"):
        run = OUT / recipe
        if not (run / "checkpoints").exists():
            start = time.time()
            cfg = load_config(ROOT / "configs" / "quickstart.yaml",  # a short evaluation: the attacks are the point
                              [f"recipe={recipe}", f"name={recipe}", f"out_dir={OUT}", "eval.checks=false",
                               "eval.eps_sweep=[]"])
            train_and_evaluate(cfg, progress=False)
            print(f"trained {recipe} in {time.time() - start:.0f}s", flush=True)
        if not manifest.exists():
            cfg = load_config(ROOT / "configs" / "quickstart.yaml")
            save_manifest(freeze_episodes(load_split(cfg.data, "test"), 5, 1, 3, 4, seed=0, dataset="glyphs"),
                          manifest)
        if recipe in results:
            continue
        start = time.time()
        bb = load_blackbox_config(ROOT / "configs" / "blackbox" / "glyphs_linf.yaml",
                                  [f"run={run}", f"overrides=[eval.manifest={manifest}]", *SETTINGS])
        summary, paths = run_blackbox(bb, lambda n, r: print(f"  {recipe} {n}: {r['success_rate']:.3f} "
                                                             f"({time.time() - start:.0f}s)", flush=True))
        summary["seconds"] = round(time.time() - start, 1)
        print(blackbox_table(summary), flush=True)
        results[recipe] = summary
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(results, indent=2) + "\n")
        (RESULT.parent / f"blackbox_glyphs_{recipe}.png").write_bytes(paths["plot"].read_bytes())


if __name__ == "__main__":
    main()
