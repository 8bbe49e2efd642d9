#!/usr/bin/env bash
# Build the project's environment in .venv from nothing; a no-op when it is already complete.
#
# Variables (all optional):
#   SOLOV2_VENV          where the environment goes (default: <repo>/.venv)
#   PYTHON               interpreter that creates it (default: python3.11, else python3)
#   SOLOV2_TORCH         pip requirements for torch (default: "torch==2.14.1 torchvision==0.29.1")
#   DETECTRON2_PIP       a pip requirement for detectron2 with its compiled ops, e.g.
#                        'git+https://github.com/facebookresearch/detectron2.git' (needs internet
#                        and a compiler). Unset: keep an importable detectron2, else install the
#                        Python sources of the PyPI sdist pb1-detectron2==0.6 without compiling.
#   SOLOV2_SYSTEM_SITE   1: create the venv with --system-site-packages, so a detectron2 already
#                        installed for the interpreter is seen and kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SOLOV2_VENV:-$ROOT/.venv}"
TORCH_REQ="${SOLOV2_TORCH:-torch==2.14.1 torchvision==0.29.1}"
D2_SDIST="pb1-detectron2==0.6"
STAMP="$VENV/.solov2_d2-bootstrap"
# What a complete environment imports (the project with its test, export and openvino extras).
IMPORTS="import solov2_d2, detectron2.modeling, onnx, onnxscript, onnxruntime, openvino"

# Everything that decides what gets installed; a change of any of it re-runs the install.
fingerprint() {
    {
        cat "$ROOT/tools/bootstrap.sh" "$ROOT/tools/detectron2_sources_setup.py" "$ROOT/setup.cfg"
        echo "$TORCH_REQ|${DETECTRON2_PIP:-}|${SOLOV2_SYSTEM_SITE:-}"
    } | sha256sum | cut -d' ' -f1
}

log() { echo "[bootstrap] $*" >&2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] \
    && "$VENV/bin/python" -c "$IMPORTS" 2>/dev/null; then
    log "environment in $VENV is complete"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating $VENV with $PY"
    venv_args=()
    [ "${SOLOV2_SYSTEM_SITE:-0}" = "1" ] && venv_args+=(--system-site-packages)
    "$PY" -m venv "${venv_args[@]}" "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

log "installing $TORCH_REQ"
# shellcheck disable=SC2086
"${PIP[@]}" install -q $TORCH_REQ
# detectron2 0.6's model_zoo imports pkg_resources, which setuptools 81 removed.
"${PIP[@]}" install -q "setuptools>=64,<81" wheel
"${PIP[@]}" install -q "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools opencv-python \
    lvis "Pillow>=7.1" matplotlib termcolor "yacs>=0.1.8" tabulate cloudpickle "tqdm>4.29.0" \
    tensorboard "omegaconf>=2.1" "hydra-core>=1.1" pydot

if [ -n "${DETECTRON2_PIP:-}" ]; then
    log "installing detectron2 from $DETECTRON2_PIP"
    "${PIP[@]}" install --no-build-isolation "$DETECTRON2_PIP"
elif "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    log "keeping the installed detectron2 ($("$VENV/bin/python" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))'))"
else
    log "installing detectron2's Python sources from $D2_SDIST (no compiled ops)"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # The sdist's own setup.py imports torch, hence no build isolation.
    "${PIP[@]}" download -q --no-deps --no-build-isolation -d "$work" "$D2_SDIST"
    tar -xzf "$work"/pb1-detectron2-*.tar.gz -C "$work"
    src="$(find "$work" -maxdepth 1 -type d -name 'pb1-detectron2-*' | head -n 1)"
    cp "$ROOT/tools/detectron2_sources_setup.py" "$src/setup.py"
    rm -f "$src/pyproject.toml"
    "${PIP[@]}" install -q --no-deps --no-build-isolation "$src"
fi

log "installing solov2_d2 (editable) with its test tools, ONNX export and OpenVINO"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[test,export,openvino]"

"$VENV/bin/python" -c "$IMPORTS"
fingerprint > "$STAMP"
log "environment in $VENV is ready"
