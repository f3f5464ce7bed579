#!/usr/bin/env bash
# Paper 000's Tables I-III (issue 17, item 1) with the project's own commands: from a fine-tuned
# published ResNet20 (configs/resnet20_pretrained.yaml), L2 filter pruning 12.5% / 25% and Tucker-2
# with VBMF ranks (plain and runtime-aware), each fine-tuned for the same number of epochs by
# `cli.py fit` with paper 000's configs (arch and normalisation switched to the published weights'),
# then each measured side by side against the baseline by `cli.py profile --baseline` (torch and
# ONNX Runtime, batch 1 and 128, at the thread counts in $THREADS, default "1 2"). The configs'
# own ProfileCallback is switched off: it would time the model at fit start and end (two-time),
# which the side-by-side `profile --baseline` replaces. Last, `cli.py test` with the int8 config
# (configs/vgg16_quant8.yaml, any arch) gives each model's int8 ONNX Runtime top-1 and its int8
# speedup over ONNX Runtime float, side by side. Prints the Markdown tables at the end.
#   bash benchmarks/reproduce_paper000.sh BASELINE.ckpt [EPOCHS=1] [OUT=runs/paper000]
#   THREADS=1 bash benchmarks/reproduce_paper000.sh ...   # when another job holds the other core
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=${1:?usage: bash benchmarks/reproduce_paper000.sh BASELINE.ckpt [EPOCHS] [OUT]}
epochs=${2:-1}
out=${3:-runs/paper000}
threads=(${THREADS:-1 2})
methods=(${METHODS:-prune12 prune25 tucker_vbmf tucker_vbmf_runtime})
int8() {  # int8 ONNX Runtime top-1 and speedup of checkpoint $1, written under $2/int8/
  python cli.py test --config configs/vgg16_quant8.yaml --model.arch resnet20_a \
    --data.init_args.normalization imagenet --ckpt_path "$1" \
    --trainer.logger.init_args.save_dir "$2" --trainer.logger.init_args.name int8
}
# The baseline's top-1 and macro F1 on the same validation images.
python cli.py test --config configs/resnet20_pretrained.yaml --ckpt_path "$baseline" \
  --trainer.logger.init_args.save_dir "$out"
int8 "$baseline" "$out/resnet20_pretrained"
for method in "${methods[@]}"; do
  python cli.py fit --config "configs/resnet20_$method.yaml" \
    --model.arch resnet20_a --model.init_from "$baseline" --data.init_args.normalization imagenet \
    --trainer.max_epochs "$epochs" --trainer.logger.init_args.save_dir "$out" \
    "--trainer.callbacks[ProfileCallback].init_args.on_fit_start=false" \
    "--trainer.callbacks[ProfileCallback].init_args.on_fit_end=false"
  run=$(ls -d "$out/resnet20_$method"/version_* | sort -V | tail -1)
  python cli.py profile --config configs/resnet20_pretrained.yaml --ckpt_path "$run/checkpoints/last.ckpt" \
    --baseline "$baseline" --backends torch onnxruntime --threads "${threads[@]}" --output_dir "$run/profile_vs_baseline"
  int8 "$run/checkpoints/last.ckpt" "$run"
done
python benchmarks/paper000_table.py "$out" "${methods[@]}"
