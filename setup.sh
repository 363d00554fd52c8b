#!/usr/bin/env bash
# One command sets up everything mtnlg needs on a fresh machine:
#   * the package itself, editable, with all extras, into the current Python environment;
#   * the Debian package fortunes-zh (the built-in Chinese poem corpus) and chromium (for the
#     web-page test) when apt-get is available and we are root; otherwise say how to get them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# PyTorch: use the CPU build when no torch is installed yet (a plain "torch" pulls a multi-GB CUDA
# build). An existing torch inside the supported range is kept as it is.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0" \
        || "$PY" -m pip install --quiet "torch>=2.6,<2.15" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install --quiet -e ".[all]"
# Let plain `lm_eval --model mtnlg ...` find mtnlg's lm-evaluation-harness model (a one-line .pth hook
# that registers it lazily when lm-eval loads its model table; `mtnlg eval --uninstall-lm-eval-hook` removes it).
"$PY" -m mtnlg eval --install-lm-eval-hook >/dev/null

apt_pkgs=(fortunes-zh chromium fonts-wqy-zenhei)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || true
        for p in "${missing[@]}"; do
            apt-get install -y -qq "$p" >/dev/null || echo "setup.sh: could not install $p; continuing"
        done
    else
        echo "setup.sh: please install the Debian packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]});"
        echo "          without fortunes-zh the 'poems' corpus is unavailable (the 'python' corpus still works)."
    fi
fi
echo "setup.sh: done ($("$PY" -c 'import mtnlg, torch; print("mtnlg", mtnlg.__version__, "torch", torch.__version__)'))"
