#!/usr/bin/env bash
# lbgen set-up and entry points. Idempotent: the first run installs everything (about 4 minutes, 6 GB for the
# PyTorch stack), later runs reuse it.
#   ./run.sh quickstart   set up, then run the quickstart on Fashion-MNIST (CPU)
#   ./run.sh test         set up, then run the test suite
#   ./run.sh setup        only set up
# Environment: VENV (default .venv), RUN_DIR (quickstart outputs, default ~/lbgen-runs), PYTHON (default python3),
#              LBGEN_FASHION_MNIST (folder with the four Fashion-MNIST idx .gz files, if not the Debian package's),
#              LBGEN_QUICKSTART_CONTEXTUAL=0 (skip the contextual benchmark and its embedded models: ~30 min less).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
RUN_DIR=${RUN_DIR:-$HOME/lbgen-runs}
FMNIST_DEFAULT=/usr/share/datasets/fashion-mnist
FMNIST=${LBGEN_FASHION_MNIST:-$FMNIST_DEFAULT}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac  # absolute: the quickstart works in its run folder
case $RUN_DIR in /*) ;; *) RUN_DIR=$PWD/$RUN_DIR ;; esac

log() { printf '\033[1m[lbgen]\033[0m %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@";
  else return 1; fi
}

setup_python() {
  local stamp="$VENV/.lbgen-installed" want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      log "python3 -m venv failed; installing Debian's python3-venv"
      rm -rf "$VENV"
      as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv \
        || { log "cannot install python3-venv: install it, or set PYTHON to a Python with venv"; exit 1; }
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  log "installing lbgen and its dependencies into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
}

have_fmnist() { [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; }

setup_data() {
  if have_fmnist; then return 0; fi
  if [ "$FMNIST" = "$FMNIST_DEFAULT" ] && command -v apt-get >/dev/null; then
    log "installing Debian package dataset-fashion-mnist"
    if as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
      have_fmnist && return 0
    fi
  fi
  log "Fashion-MNIST not found in $FMNIST. Either install it (apt-get install dataset-fashion-mnist), or put"
  log "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and"
  log "t10k-labels-idx1-ubyte.gz in a folder and run: LBGEN_FASHION_MNIST=/that/folder ./run.sh ..."
  return 1
}

# Run a stage unless its output marker exists (a finished stage is reused by the next quickstart).
stage() {
  local marker=$1; shift
  if [ -e "$marker" ]; then log "reusing $marker"; return; fi
  log "lbgen $*"
  local start=$SECONDS
  "$VENV/bin/lbgen" "$@" --trainer.enable_progress_bar=false
  log "done in $((SECONDS - start)) s"
}

quickstart() {
  setup_data || exit 1
  local repo; repo=$(pwd)
  local out="$RUN_DIR/quickstart"
  mkdir -p "$out"
  log "quickstart: embedded generators, 7 generation methods (lbGen, BOB, DataDream, GeNIe, ...), 5-shot classifiers on Fashion-MNIST and contextual Fashion-MNIST (outputs in $out)"
  # Recipes name their inputs and outputs relative to the working folder (runs/...), so stages chain there.
  cd "$out"
  stage runs/embedded/vae/config.json fit -c "$repo/configs/generator/fashion_vae.yaml" \
    --trainer.default_root_dir runs/logs/vae
  stage runs/embedded/generator/model_index.json fit -c "$repo/configs/generator/fashion_pretrain.yaml" \
    --trainer.default_root_dir runs/logs/generator
  local methods="txt2img img2img_low img2img_high genie"
  for m in $methods; do
    stage "runs/synthetic/$m/manifest.jsonl" predict -c "$repo/configs/generate/fashion_$m.yaml"
  done
  # lbGen: the embedded CLIP and quality judges, the class-name-only LoRA fine-tune, then its dataset
  stage runs/embedded/clip/open_clip_config.json fit -c "$repo/configs/foundation/fashion_clip.yaml" \
    --trainer.default_root_dir runs/logs/clip
  stage runs/embedded/quality/quality_config.json fit -c "$repo/configs/foundation/fashion_quality.yaml" \
    --trainer.default_root_dir runs/logs/quality
  stage runs/lbgen/fashion/lora/pytorch_lora_weights.safetensors fit -c "$repo/configs/lbgen/fashion.yaml" \
    --trainer.default_root_dir runs/logs/lbgen
  stage runs/synthetic/lbgen/manifest.jsonl predict -c "$repo/configs/generate/fashion_txt2img.yaml" \
    -c "$repo/configs/generate/fashion_lbgen.yaml"
  methods="$methods lbgen"
  # BOB: attribute bank (embedded CLIP zero-shot), LoRA on attribute captions, marginalised generation; DataDream:
  # the same LoRA fine-tune on class captions
  stage runs/bob/fashion/attributes.json predict -c "$repo/configs/bob/attributes.yaml"
  stage runs/bob/fashion/lora/pytorch_lora_weights.safetensors fit -c "$repo/configs/bob/finetune.yaml" \
    --trainer.default_root_dir runs/logs/bob
  stage runs/bob/fashion/datadream_lora/pytorch_lora_weights.safetensors fit -c "$repo/configs/bob/finetune.yaml" \
    -c "$repo/configs/bob/datadream.yaml" --trainer.default_root_dir runs/logs/datadream
  stage runs/synthetic/bob/manifest.jsonl predict -c "$repo/configs/bob/generate.yaml"
  stage runs/synthetic/datadream/manifest.jsonl predict -c "$repo/configs/bob/generate.yaml" \
    -c "$repo/configs/bob/generate_datadream.yaml"
  methods="$methods datadream bob"
  stage runs/classifier/real_only/version_0/test_metrics.json fit -c "$repo/configs/classifier/fashion_5shot.yaml" \
    --trainer.default_root_dir runs/classifier/real_only
  local table=("5-shot real only=runs/classifier/real_only")
  for m in $methods; do
    stage "runs/classifier/$m/version_0/test_metrics.json" fit \
      -c "$repo/configs/classifier/fashion_5shot_plus_synthetic.yaml" \
      --data.init_args.synthetic.init_args.folder "runs/synthetic/$m" --trainer.default_root_dir "runs/classifier/$m"
    table+=("5-shot real + 100/class $m=runs/classifier/$m")
  done
  echo
  log "5-shot Fashion-MNIST, top-1 on the 10k test set (outputs in $out/runs)"
  "$VENV/bin/python" -m lbgen.evaluation.summary "${table[@]}"
  if [ "${LBGEN_QUICKSTART_CONTEXTUAL:-1}" = 0 ]; then return; fi
  # The contextual benchmark (objects on photographs, 90% of a class's training images on its own background): its
  # own embedded VAE and generator, then real only vs DataDream vs BOB (attributes: the benchmark's exact records)
  stage runs/embedded/contextual/vae/config.json fit -c "$repo/configs/generator/fashion_vae.yaml" \
    -c "$repo/configs/foundation/contextual_vae.yaml" --trainer.default_root_dir runs/logs/contextual_vae
  stage runs/embedded/contextual/generator/model_index.json fit -c "$repo/configs/foundation/contextual_generator.yaml" \
    --trainer.default_root_dir runs/logs/contextual_generator
  stage runs/bob/contextual/attributes.json predict -c "$repo/configs/bob/attributes.yaml" \
    -c "$repo/configs/bob/contextual_attributes.yaml"
  local ft=(-c "$repo/configs/bob/finetune.yaml" -c "$repo/configs/bob/contextual_finetune.yaml")
  local gen=(-c "$repo/configs/bob/generate.yaml" -c "$repo/configs/bob/contextual_generate.yaml")
  stage runs/bob/contextual/lora/pytorch_lora_weights.safetensors fit "${ft[@]}" \
    --trainer.default_root_dir runs/logs/bob_contextual
  stage runs/bob/contextual/datadream_lora/pytorch_lora_weights.safetensors fit "${ft[@]}" \
    -c "$repo/configs/bob/datadream.yaml" --model.init_args.output_dir runs/bob/contextual/datadream_lora \
    --trainer.default_root_dir runs/logs/datadream_contextual
  stage runs/synthetic/bob_contextual/manifest.jsonl predict "${gen[@]}"
  stage runs/synthetic/datadream_contextual/manifest.jsonl predict "${gen[@]}" \
    -c "$repo/configs/bob/generate_datadream.yaml" \
    --model.init_args.generator.init_args.lora runs/bob/contextual/datadream_lora \
    --model.init_args.output_dir runs/synthetic/datadream_contextual
  stage runs/classifier/contextual_real_only/version_0/test_metrics.json fit \
    -c "$repo/configs/classifier/fashion_contextual_5shot.yaml" --data.init_args.image_size 32 \
    --trainer.default_root_dir runs/classifier/contextual_real_only
  local contextual=("contextual, 5-shot real only=runs/classifier/contextual_real_only")
  for m in datadream bob; do
    stage "runs/classifier/contextual_$m/version_0/test_metrics.json" fit \
      -c "$repo/configs/classifier/fashion_5shot_plus_synthetic.yaml" \
      -c "$repo/configs/classifier/fashion_contextual_5shot_plus_synthetic.yaml" \
      --data.init_args.synthetic.init_args.folder "runs/synthetic/${m}_contextual" \
      --trainer.default_root_dir "runs/classifier/contextual_$m"
    contextual+=("contextual, 5-shot real + 100/class $m=runs/classifier/contextual_$m")
  done
  echo
  log "5-shot contextual Fashion-MNIST (bias 0.9), top-1 on its 10k test set (backgrounds independent of the class)"
  "$VENV/bin/python" -m lbgen.evaluation.summary "${contextual[@]}"
}

run_tests() {
  setup_data || log "tests that need the real Fashion-MNIST files will be skipped (they fail under CI=true)"
  "$VENV/bin/python" -m pytest "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup_python; setup_data ;;
  quickstart) setup_python; quickstart ;;
  test) setup_python; run_tests "$@" ;;
  *) echo "usage: ./run.sh {quickstart|test|setup} [pytest args]"; exit 2 ;;
esac
