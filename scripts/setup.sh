#!/usr/bin/env bash
# Set up .venv in the checkout: torch first (the CPU wheel on CPU machines), then this package
# and its dependencies constrained so torch is never replaced, then the torchvision repair where
# torch is a CPU build and `import torchvision` fails (see scripts/fix_torchvision.py).
# A second run with unchanged inputs only checks a stamp file and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
stamp_input="$(cat pyproject.toml scripts/setup.sh scripts/fix_torchvision.py) $TORCH_SPEC"
stamp="$VENV/.lvmmed-setup-$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {  # pip, without the "Location ... is ignored" noise of this machine's local index config
    "$VPY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC first"
    pip_install "$TORCH_SPEC"
fi
torch_version=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
printf 'torch==%s\n' "$torch_version" > "$VENV/constraints.txt"
echo "[setup] installing lvmmed-monai and dependencies (torch pinned to $torch_version)"
pip_install -c "$VENV/constraints.txt" -e ".[dev]"
"$VPY" scripts/fix_torchvision.py
rm -f "$VENV"/.lvmmed-setup-*
touch "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, torchvision, monai; print("torch", torch.__version__, "torchvision", torchvision.__version__, "monai", monai.__version__)')"
