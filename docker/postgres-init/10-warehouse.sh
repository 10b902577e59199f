#!/usr/bin/env bash
# Run once by the postgres image's entrypoint, on the first start with an empty data volume (files in
# /docker-entrypoint-initdb.d): the warehouse database beside Airflow's metadata database, owned by
# its own role. The password comes from the environment (WAREHOUSE_PASSWORD, from .env), passed as a
# psql variable so that psql quotes it. mlcanary's tables are created later by airflow-init
# (`mlcanary init`) or the first rollout. To change the password later: ALTER ROLE, then .env.
set -euo pipefail
: "${WAREHOUSE_PASSWORD:?WAREHOUSE_PASSWORD is not set}"
warehouse_db="${WAREHOUSE_DB:-warehouse}"
warehouse_user="${WAREHOUSE_USER:-mlcanary}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$warehouse_db" -v role="$warehouse_user" -v password="$WAREHOUSE_PASSWORD" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
echo "10-warehouse.sh: database $warehouse_db (owner $warehouse_user) created"
