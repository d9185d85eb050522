#!/usr/bin/env bash
# Stop the CI SLURM started by tests/slurm/start-cluster.sh: cancel its jobs, stop
# slurmd and slurmctld, and munged if start-cluster.sh started it. Leaves a SLURM it
# did not configure alone.
set -uo pipefail
STATE="${DPDM_SLURM_STATE:-/var/lib/dpdm-slurm-ci}"
log() { echo "stop-cluster: $*" >&2; }
if ! grep -q '^# dpdm-ci' /etc/slurm/slurm.conf 2>/dev/null; then log "not our SLURM: nothing to stop"; exit 0; fi

stop_pidfile() {  # name pidfile
  [ -f "$2" ] || return 0
  local pid; pid="$(cat "$2")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    log "stopped $1 ($pid)"
  fi
  rm -f "$2"
}
timeout 10 scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
stop_pidfile slurmd "$STATE/slurmd.pid"
stop_pidfile slurmctld "$STATE/slurmctld.pid"
if [ -f /run/munge/.dpdm-ci-started ]; then
  stop_pidfile munged /run/munge/munged.pid
  rm -f /run/munge/.dpdm-ci-started
fi
exit 0
