#!/bin/sh
# Starts Redis with deploy/redis/redis.conf and one ACL user per service (used by docker-compose.yml and
# deploy/k8s/10-redis.yaml). Passwords come from the environment (a Secret), never from the command line,
# and the ACL file holds only their SHA-256 hashes. The default user is off: every client logs in.
#   admin      operators only: everything
#   worker     RQ's jobs and queues (rq:*) and the results (<prefix>:*); no FLUSHALL, CONFIG, KEYS, DEBUG...
#              scripts only as redis-py runs RQ's: EVAL, EVALSHA, SCRIPT LOAD|EXISTS
#   producer   the same keys and commands without pub/sub
#   dashboard  reads, plus the expired-entry clean-up RQ runs when it counts failed jobs; writes only the
#              operators' feedback (<prefix>:feedback*) and the review queue (<prefix>:review, :review:item:*)
#   registry   the operators' `steelsight model`: the model pointers, audit log and shadow figures
#              (<prefix>:model:*, <prefix>:shadow:*) and nothing else (when REDIS_REGISTRY_PASSWORD is set)
#   keda       TYPE and LLEN on the queues, in the script KEDA sends with EVAL (when REDIS_KEDA_PASSWORD is set)
#   metrics    INFO, for redis_exporter
set -eu
umask 077
conf=${REDIS_CONF:-/etc/redis/redis.conf}
acl=${REDIS_ACL_FILE:-/run/redis/users.acl}
prefix=${STEELSIGHT_KEY_PREFIX:-steelsight}
hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
mkdir -p "$(dirname "$acl")"
app="~rq:* ~$prefix:* resetchannels -@all +@read +@write +@keyspace +eval +evalsha +script|load +script|exists +@transaction +@connection"
# a selector: the dashboard's writes (feedback marks, their per-frame lock released by a script, the review
# queue) reach these keys only; MULTI/EXEC are checked per queued command
feedback="~$prefix:feedback ~$prefix:feedback:* ~$prefix:review ~$prefix:review:item:* +@read +@write +eval +evalsha +@transaction -@dangerous"
cat > "$acl" <<ACL
user default off resetkeys resetchannels -@all
user admin on #$(hash "${REDIS_ADMIN_PASSWORD:?set REDIS_ADMIN_PASSWORD}") ~* &* +@all
user worker on #$(hash "${REDIS_WORKER_PASSWORD:?set REDIS_WORKER_PASSWORD}") $app &rq:* +@pubsub -@dangerous +info
user producer on #$(hash "${REDIS_PRODUCER_PASSWORD:?set REDIS_PRODUCER_PASSWORD}") $app -@dangerous +info
user dashboard on #$(hash "${REDIS_DASHBOARD_PASSWORD:?set REDIS_DASHBOARD_PASSWORD}") ~rq:* %R~$prefix:* resetchannels -@all +@read +@connection -@dangerous +info +zremrangebyscore ($feedback)
user ${REDIS_METRICS_USERNAME:-metrics} on #$(hash "${REDIS_METRICS_PASSWORD:?set REDIS_METRICS_PASSWORD}") resetkeys resetchannels -@all +ping +hello +select +info +dbsize
ACL
if [ -n "${REDIS_KEDA_PASSWORD:-}" ]; then  # Kubernetes only
  echo "user ${REDIS_KEDA_USERNAME:-keda} on #$(hash "$REDIS_KEDA_PASSWORD") ~rq:queue:* resetchannels -@all +eval +evalsha +type +llen +ping +hello +select" >> "$acl"
fi
if [ -n "${REDIS_REGISTRY_PASSWORD:-}" ]; then  # promote and roll back run scripts on the model keys
  echo "user registry on #$(hash "$REDIS_REGISTRY_PASSWORD") ~$prefix:model:* ~$prefix:shadow:* resetchannels -@all +@read +@write +eval +evalsha +@transaction +@connection -@dangerous" >> "$acl"
fi
unset REDIS_ADMIN_PASSWORD REDIS_WORKER_PASSWORD REDIS_PRODUCER_PASSWORD REDIS_DASHBOARD_PASSWORD \
  REDIS_KEDA_PASSWORD REDIS_METRICS_PASSWORD REDIS_REGISTRY_PASSWORD
exec redis-server "$conf" --aclfile "$acl" "$@"
