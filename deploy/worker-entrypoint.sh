#!/bin/sh
# Entrypoint of the compose `worker` service: claim a shard no other replica uses, then run
#
#     fedmq worker --data $SHARDS/worker-<i>.npz --worker-id worker-<i> [arguments of this script]
#
# Why claims: `docker compose up --scale worker=N` starts N identical containers and tells none
# of them its index (the replica number is in the container name, which the container cannot
# see; its hostname is the container id; IP addresses are neither dense nor stable). So each
# replica takes an index itself: for i = 0, 1, ... while $SHARDS/worker-<i>.npz exists it tries
# `mkdir $CLAIMS/worker-<i>`, which is atomic on one file system, so exactly one replica wins
# each index. The shards and the claims live on the shared `data` volume.
#
# A claim directory holds `owner` (the claiming container's hostname, i.e. its id, which stays
# the same when that container restarts) and `beat`, touched every $BEAT seconds by a
# background loop for as long as the worker process runs. Hence:
#   * a restarted container (restart: on-failure) takes back its own claim: same shard, same id;
#   * a claim whose `beat` is older than $STALE seconds belongs to a worker that has exited or
#     a container that is gone (`docker compose down` then `up`, scale down then up); another
#     replica takes it over, one at a time under the lock directory `worker-<i>.lock`;
#   * a replica that finds every shard claimed by a live replica (more replicas than shards:
#     run the split with FEDMQ_WORKERS >= replicas) waits up to $WAIT seconds for a claim to
#     go stale, then exits with code 3.
# `docker compose down -v` removes the volume, claims included.
#
# POSIX sh plus `stat -c %Y` and `date +%s` (GNU coreutils or busybox).
set -eu

SHARDS=${FEDMQ_SHARDS_DIR:-/data/shards}
CLAIMS=${FEDMQ_CLAIMS_DIR:-/data/claims}
PREFIX=${FEDMQ_WORKER_ID_PREFIX:-worker-}
BEAT=${FEDMQ_CLAIM_BEAT:-10}
STALE=${FEDMQ_CLAIM_STALE:-60}
WAIT=${FEDMQ_CLAIM_WAIT:-300}
ME=${FEDMQ_CLAIM_OWNER:-${HOSTNAME:-$(hostname)}}

say() { echo "worker-entrypoint ($ME): $*" >&2; }

# Seconds since $1 was last modified; very large if it does not exist.
age() {
    m=$(stat -c %Y "$1" 2>/dev/null) || { echo 999999999; return 0; }
    echo $(( $(date +%s) - m ))
}

# The file whose age tells whether claim $1 is alive: its heartbeat, or the claim directory
# itself in the instant between mkdir and the first beat.
beat_of() {
    if [ -e "$1/beat" ]; then echo "$1/beat"; else echo "$1"; fi
}

owner_of() {
    cat "$1/owner" 2>/dev/null || true
}

# Claim index $1; succeed if it is ours now.
claim() {
    d="$CLAIMS/worker-$1"
    if mkdir "$d" 2>/dev/null; then
        echo "$ME" > "$d/owner"
        touch "$d/beat"
        return 0
    fi
    [ "$(age "$(beat_of "$d")")" -ge "$STALE" ] || return 1
    # Stale: take it over, one replica at a time, re-checking under the lock.
    if ! mkdir "$d.lock" 2>/dev/null; then
        # A replica that died while holding the lock would block the index forever.
        if [ "$(age "$d.lock")" -ge "$STALE" ]; then rmdir "$d.lock" 2>/dev/null || true; fi
        return 1
    fi
    taken=1
    if [ "$(age "$(beat_of "$d")")" -ge "$STALE" ]; then
        echo "$ME" > "$d/owner"
        touch "$d/beat"
        taken=0
    fi
    rmdir "$d.lock" 2>/dev/null || true
    return "$taken"
}

# Set idx to a shard index that is ours: our own earlier claim first, else a free or stale one.
pick() {
    i=0
    while [ "$i" -lt "$n" ]; do
        if [ "$(owner_of "$CLAIMS/worker-$i")" = "$ME" ]; then
            touch "$CLAIMS/worker-$i/beat"
            idx=$i
            return 0
        fi
        i=$((i + 1))
    done
    i=0
    while [ "$i" -lt "$n" ]; do
        if claim "$i"; then
            idx=$i
            return 0
        fi
        i=$((i + 1))
    done
    return 1
}

n=0
while [ -f "$SHARDS/worker-$n.npz" ]; do n=$((n + 1)); done
if [ "$n" -eq 0 ]; then
    say "no shard $SHARDS/worker-0.npz (has the split service run?)"
    exit 2
fi
mkdir -p "$CLAIMS"

waited=0
idx=
until pick; do
    if [ "$waited" -ge "$WAIT" ]; then
        say "all $n shards are held by live replicas; split into more shards (FEDMQ_WORKERS) or scale down"
        exit 3
    fi
    if [ "$waited" -eq 0 ]; then say "all $n shards are claimed; waiting up to $WAIT s for a free one"; fi
    sleep 5
    waited=$((waited + 5))
done

# Heartbeat while the worker runs (after exec below, this shell's pid $$ is the worker's) and
# the claim is still ours.
claim_dir="$CLAIMS/worker-$idx"
worker_pid=$$
(
    while kill -0 "$worker_pid" 2>/dev/null && [ "$(owner_of "$claim_dir")" = "$ME" ]; do
        touch "$claim_dir/beat"
        sleep "$BEAT"
    done
) </dev/null >/dev/null 2>&1 &

say "shard $idx of $n: $SHARDS/worker-$idx.npz, worker id $PREFIX$idx"
exec fedmq worker --data "$SHARDS/worker-$idx.npz" --worker-id "$PREFIX$idx" "$@"
