#!/usr/bin/env bash
# The MLflow tracking server a cluster logs to: runs in PostgreSQL, artifacts in the
# bucket (the server proxies them, so clients need no bucket credentials), bound to
# this machine's private address only. Every node then sets
#   MLFLOW_TRACKING_URI=http://<that address>:5000
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:=postgresql://mlflow@db.internal:5432/mlflow}"  # the password in ~/.pgpass
: "${MLFLOW_ARTIFACTS_DESTINATION:=s3://thousandwords/mlflow-artifacts}"
: "${MLFLOW_HOST:=$(hostname -I | awk '{print $1}')}"  # private address; never 0.0.0.0
pip install "mlflow>=3.17,<4" psycopg2-binary boto3
# Job execution off: it starts consumers that outlive a stopped server.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "$MLFLOW_HOST" --port 5000 --workers 4
