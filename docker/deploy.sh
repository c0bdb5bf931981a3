#!/bin/sh
# The compose `deploy` service, run from the image's WORKDIR (/opt/perl/app, where prefect.yaml is):
# the process work pool the worker polls, then prefect.yaml's deployment `perl-nightly`.
set -eu
pool=perl-process
deployment=perl-nightly

prefect work-pool create "$pool" --type process --overwrite
# Prefect 3.8.8's `prefect deploy`, after saving the deployment, lists the pool's workers with
# limit=null, which its server (with FastAPI 0.154) rejects with HTTP 422: the command then exits 1
# although the deployment was saved. So its exit code is not trusted; the deployment is read back.
prefect --no-prompt deploy --name "$deployment" || echo "deploy.sh: prefect deploy exited $?; reading the deployment back"
prefect deployment inspect "perl-pipeline/$deployment" > /dev/null
echo "deploy.sh: perl-pipeline/$deployment is registered on pool $pool"
