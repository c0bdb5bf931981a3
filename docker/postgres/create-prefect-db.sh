#!/bin/sh
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): the MLflow
# database is POSTGRES_DB; the Prefect server gets its own database on the same server.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${PREFECT_DB:-prefect}\" OWNER \"$POSTGRES_USER\";"
