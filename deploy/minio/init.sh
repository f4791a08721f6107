#!/bin/sh
# Creates the buckets (private) and one MinIO user per service with its own policy (deploy/minio/*-policy.json):
# the producer writes frames; the worker reads frames and the registry's models, writes overlays; the dashboard
# reads frames and overlays, reads and writes operator feedback; steelsight-registry (the operators'
# `steelsight model` and `steelsight dataset export`) writes models and reads models and feedback. Only this
# job holds the root credentials. HEAD on a bucket (the services check their buckets at start) needs
# s3:ListBucket. Safe to run again: users get their current secret key, policies their current text.
set -eu
: "${MINIO_URL:=http://minio:9000}" "${POLICY_DIR:=/policies}"
# the root login through the environment, not through `mc alias set` arguments
MC_HOST_local="${MINIO_URL%%://*}://$MINIO_ROOT_USER:$MINIO_ROOT_PASSWORD@${MINIO_URL#*://}"
export MC_HOST_local
mc mb --ignore-existing local/steelsight-frames local/steelsight-overlays local/steelsight-library
for bucket in steelsight-frames steelsight-overlays steelsight-library; do
  mc anonymous set none "local/$bucket"
done
# frames and overlays expire after STEELSIGHT_OBJECT_EXPIRY_DAYS (default: the results' 1 day; 0 keeps them).
# The services' keys may not manage lifecycle, so the rule is set here, on buckets that have none yet:
# rules an operator set with `mc ilm` are left alone. steelsight-library (models, feedback) gets no rule: its
# objects stay until deleted by hand.
days=${STEELSIGHT_OBJECT_EXPIRY_DAYS:-1}
for bucket in steelsight-frames steelsight-overlays; do
  if [ "$days" -gt 0 ] && ! mc ilm rule ls "local/$bucket" >/dev/null 2>&1; then
    mc ilm rule add --expire-days "$days" "local/$bucket" >/dev/null
  fi
done
for service in producer worker dashboard registry; do
  case $service in
    producer) secret=${PRODUCER_S3_SECRET_KEY:?set PRODUCER_S3_SECRET_KEY} ;;
    worker) secret=${WORKER_S3_SECRET_KEY:?set WORKER_S3_SECRET_KEY} ;;
    dashboard) secret=${DASHBOARD_S3_SECRET_KEY:?set DASHBOARD_S3_SECRET_KEY} ;;
    registry) secret=${REGISTRY_S3_SECRET_KEY:?set REGISTRY_S3_SECRET_KEY} ;;
  esac
  mc admin policy create local "steelsight-$service" "$POLICY_DIR/$service-policy.json"
  # mc takes a secret key only as an argument: it is seen inside this one-shot container alone
  mc admin user add local "steelsight-$service" "$secret" >/dev/null
  mc admin policy attach local "steelsight-$service" --user "steelsight-$service" 2>/dev/null \
    || mc admin user info local "steelsight-$service" | grep -q "PolicyName: *steelsight-$service"
done
echo "minio-init: buckets private; users steelsight-producer, steelsight-worker, steelsight-dashboard," \
  "steelsight-registry ready"
