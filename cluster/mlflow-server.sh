#!/usr/bin/env bash
# The MLflow tracking server a cluster logs to: runs in PostgreSQL, artifacts in the
# bucket (the server proxies them, so clients need no bucket credentials), bound to
# this machine's private address only. Every node then sets
#   MLFLOW_TRACKING_URI=http://<that address>:5000
# Install first (once, on the server's machine or in its image):
#   pip install "mlflow>=3.17,<4" psycopg2-binary boto3
# Each default below can be set in the environment instead; tests/test_cluster_files.py
# starts this script as written, with a SQLite store, and reaches it by its Kubernetes name.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:=postgresql://mlflow@db.internal:5432/mlflow}"  # the password in ~/.pgpass
: "${MLFLOW_ARTIFACTS_DESTINATION:=s3://thousandwords/mlflow-artifacts}"
: "${MLFLOW_HOST:=$(hostname -I | awk '{print $1}')}"  # private address; never 0.0.0.0
: "${MLFLOW_PORT:=5000}"
: "${MLFLOW_WORKERS:=4}"
# MLflow answers only requests whose Host header it knows (a guard against DNS rebinding); its
# default, localhost and private addresses, refuses a Kubernetes Service name. These: the nodes
# (by address), a laptop through an SSH tunnel (localhost), and cluster/rayjob.yaml's pods.
: "${MLFLOW_ALLOWED_HOSTS:=$MLFLOW_HOST:$MLFLOW_PORT,localhost:*,127.0.0.1:*,mlflow.mlflow.svc.cluster.local:$MLFLOW_PORT}"
# Job execution off: it starts consumers that outlive a stopped server.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
