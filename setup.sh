#!/usr/bin/env bash
# One command sets up everything mtnlg needs on a fresh machine:
#   * the package itself, editable, with all extras, into the current Python environment;
#   * the Debian package fortunes-zh (the built-in Chinese poem corpus) and chromium (for the
#     web-page test) when apt-get is available and we are root; otherwise say how to get them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

say() { echo "setup.sh: $*"; }

# PyTorch: an existing torch inside the supported range is kept as it is. Otherwise the build comes from
# the indexes pip is configured with (pip.conf, PIP_INDEX_URL / PIP_EXTRA_INDEX_URL): when one of them
# serves PyTorch's CPU builds, the "+cpu" build is taken; else pip's default index, whose Linux x86-64
# torch is the multi-GB CUDA build. To get the CPU build, point pip at PyTorch's CPU wheel index first
# (PyTorch's "Get started" page names it), e.g. `pip config set global.extra-index-url <that index>`,
# or put the CPU wheel in a folder named by pip's find-links.
TORCH_SPEC="torch>=2.6,<2.15"
if "$PY" -c "import torch" >/dev/null 2>&1; then
    say "keeping the installed $("$PY" -c 'import torch; print("torch", torch.__version__)')"
else
    say "trying torch 2.13.0+cpu (the CPU build) from the indexes and wheel folders pip is configured with..."
    if "$PY" -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null; then
        say "installed torch 2.13.0+cpu"
    else
        say "installing $TORCH_SPEC from pip's default index (on Linux x86-64 the CUDA build, ~2.5 GB; for the"
        say "  CPU build configure pip's extra-index-url as described at the top of setup.sh and rerun)..."
        "$PY" -m pip install --quiet "$TORCH_SPEC"
    fi
fi
say "installing mtnlg (editable) with its extras: transformers, lm-eval, pytest, ... (about a minute)..."
"$PY" -m pip install --quiet -e ".[all]"
# Let plain `lm_eval --model mtnlg ...` find mtnlg's lm-evaluation-harness model (a one-line .pth hook
# that registers it lazily when lm-eval loads its model table; `mtnlg eval --uninstall-lm-eval-hook` removes it).
say "registering the lm-eval hook..."
"$PY" -m mtnlg eval --install-lm-eval-hook >/dev/null

apt_pkgs=(fortunes-zh chromium fonts-wqy-zenhei)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        say "updating the apt package lists..."
        apt-get update -qq >/dev/null || true
        for p in "${missing[@]}"; do
            say "installing the Debian package $p..."
            apt-get install -y -qq "$p" >/dev/null || echo "setup.sh: could not install $p; continuing"
        done
    else
        echo "setup.sh: please install the Debian packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]});"
        echo "          without fortunes-zh the 'poems' corpus is unavailable (the 'python' corpus still works)."
    fi
fi
echo "setup.sh: done ($("$PY" -c 'import mtnlg, torch; print("mtnlg", mtnlg.__version__, "torch", torch.__version__)'))"
