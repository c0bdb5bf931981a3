#!/bin/sh
# The one install recipe for the image. docker/Dockerfile runs it at build time and
# tests/test_docker_stack.py runs it into a fresh virtualenv, so the two cannot drift apart.
#
# usage (from the project root): sh docker/install.sh VENV_DIR LOCK_FILE
#   TORCH_FIND_LINKS  a folder or HTML page (http://...) holding the torch wheel; wins when set
#                     (an offline build, the dev machines' /opt/wheels).
#   TORCH_INDEX_URL   else the wheel index for torch: the Dockerfile passes the PyTorch CPU index
#                     (or a CUDA variant's); the versions there read 2.13.0+cpu, which the pin
#                     torch==2.13.0 in constraints.txt accepts.
#   UV_DEFAULT_INDEX  the index of everything else (uv's default: PyPI).
#   PERL_EXTRAS       extras of the package (default postgres,s3: an MLflow server on PostgreSQL/S3)
# uv (pinned in constraints.txt) does the installing: the same resolution as pip, in a tenth of
# the time, which keeps the test that replays this script within its budget.
set -eu
venv=$1
lock=$2
extras=${PERL_EXTRAS:-postgres,s3}

uv venv --python "$(command -v python3)" "$venv"
py="$venv/bin/python"

# torch first and alone, from its own index; --no-deps: its dependencies come in the next step
# from the ordinary index, under the same constraints as everything else.
if [ -n "${TORCH_FIND_LINKS:-}" ]; then
    uv pip install --python "$py" --no-deps -c constraints.txt --no-index --find-links "$TORCH_FIND_LINKS" torch
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    uv pip install --python "$py" --no-deps -c constraints.txt --index-url "$TORCH_INDEX_URL" torch
else
    echo "install.sh: set TORCH_INDEX_URL or TORCH_FIND_LINKS: a bare 'torch' from PyPI pulls GBs of CUDA" >&2
    exit 2
fi

# Installed in place (editable): prefect.yaml's deployments name their flow by file path
# (flows/pipeline.py) in this folder, so the code the worker runs is the code installed here.
# pip too (pinned in constraints.txt): MLflow records a model's environment with `pip --version`.
uv pip install --python "$py" -c constraints.txt -e ".[$extras]" pip
uv pip check --python "$py"

# DVC versions data/ through data.dvc, but refuses to work outside a git checkout, and the image
# has none (.git stays out of the build context): `core.no_scm` in this copy's local config.
# Never in a real checkout, where DVC should see git.
if [ -d .dvc ] && ! git rev-parse --git-dir > /dev/null 2>&1; then
    printf '[core]\n    no_scm = true\n' > .dvc/config.local
fi

# The resolved package set, logged by every pipeline run inside the image (PERL_IMAGE_LOCK).
mkdir -p "$(dirname "$lock")"
uv pip freeze --python "$py" > "$lock"
echo "install.sh: $(grep -c . "$lock") packages recorded in $lock"
