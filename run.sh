#!/usr/bin/env bash
# lbgen set-up and entry points. Idempotent: the first run installs everything (about 4 minutes, 6 GB for the
# PyTorch stack), later runs reuse it.
#   ./run.sh quickstart   set up, then run the quickstart on Fashion-MNIST (CPU)
#   ./run.sh test         set up, then run the test suite
#   ./run.sh setup        only set up
# Environment: VENV (default .venv), RUN_DIR (quickstart outputs, default ~/lbgen-runs), PYTHON (default python3),
#              LBGEN_FASHION_MNIST (folder with the four Fashion-MNIST idx .gz files, if not the Debian package's),
#              LBGEN_QUICKSTART_CONTEXTUAL=1 (also the contextual benchmark with its own embedded models: ~35 min).
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

quickstart() {
  setup_data || exit 1
  local out="$RUN_DIR/quickstart"
  mkdir -p "$out"
  log "quickstart: embedded models, 6 ways to generate (txt2img, img2img, GeNIe, lbGen, DataDream, BOB), 5-shot classifiers, label consistency, report.md (about 14 min; outputs in $out)"
  # Each stage is one lbgen command, run one after the other in one process (no start-up per stage); finished
  # stages are reused by the next run (configs/experiments/*.yaml).
  "$VENV/bin/lbgen" experiment configs/experiments/quickstart.yaml --workdir "$out" --in-process
  echo
  cat "$out/report.md"
  if [ "${LBGEN_QUICKSTART_CONTEXTUAL:-0}" != 1 ]; then return; fi
  "$VENV/bin/lbgen" experiment configs/experiments/quickstart_contextual.yaml --workdir "$out" --in-process
  echo
  cat "$out/report_contextual.md"
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
