#!/usr/bin/env bash
# The tiny world's committed reports in one command, from the repository root: the single-seed main
# job (docs/results/tiny/) and the same job over 5 seeds (docs/results/tiny_seeds/), each copied from
# its pipeline output, plus the cross-seed mask analysis (a rerun reuses finished steps; --force true
# reruns them).
#   bash scripts/tiny_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml "$@"
python -m antidote_pl pipeline --config configs/tiny/pipeline.yaml --config configs/tiny/seeds.yaml "$@"
copy() {  # copy the report and its figures of one pipeline output into a docs folder
  mkdir -p "$2"
  cp "$1"/report.md "$1"/report.png "$2"/
  for f in "$1"/mask_heatmap_*.png "$1"/reattack.png; do [ -e "$f" ] && cp "$f" "$2"/; done
  return 0
}
copy outputs/tiny/pipeline docs/results/tiny
copy outputs/tiny/seeds docs/results/tiny_seeds
# Mask overlaps across seeds and calibration sets, from the saved masks (no model runs).
python -m antidote_pl posthoc --run outputs/tiny/seeds --out docs/results/tiny_seeds/analysis.md
echo "wrote docs/results/tiny/report.md, docs/results/tiny_seeds/report.md and docs/results/tiny_seeds/analysis.md"
