#!/usr/bin/env bash
# Start a real single-node SLURM (munged, slurmctld, slurmd) on this machine, for CI.
#
#   sudo tests/slurm/start-cluster.sh      # idempotent; as root; no systemd needed
#   tests/slurm/stop-cluster.sh            # stops what this script started
#
# Installs slurm-wlm (Debian/Ubuntu apt) when missing, writes /etc/slurm/slurm.conf and
# gres.conf from the templates beside this script (node and controller: `hostname -s`;
# partitions cpu and gpu; a fake GPU, File=/dev/null, so GPU requests schedule on a CPU
# machine), starts the daemons and waits until the node is idle.
# It never touches a SLURM it did not configure: an existing /etc/slurm/slurm.conf
# without the "dpdm-ci" marker makes it stop with exit status 3.
# Exit status: 0 cluster up; 2 not root / no apt / install failed; 3 foreign SLURM; 1 other.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${DPDM_SLURM_STATE:-/var/lib/dpdm-slurm-ci}"
CONF_DIR=/etc/slurm
GPUS="${DPDM_SLURM_FAKE_GPUS:-2}"
log() { echo "start-cluster: $*" >&2; }

if [ "$(id -u)" != 0 ]; then log "must run as root"; exit 2; fi

if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -q '^# dpdm-ci' "$CONF_DIR/slurm.conf"; then
  log "$CONF_DIR/slurm.conf exists and is not ours: refusing to touch this SLURM"; exit 3
fi

# Already up (our config, node usable)? Nothing to do.
if [ -f "$CONF_DIR/slurm.conf" ] && timeout 10 sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  log "already running"; echo "already-running"; exit 0
fi

# --- install ---------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then log "slurm is not installed and there is no apt-get"; exit 2; fi
  log "installing slurm-wlm (apt)"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d: the packages must not try to start services (no systemd here).
  POLICY=/usr/sbin/policy-rc.d; ADDED_POLICY=0
  if [ ! -e "$POLICY" ]; then printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod +x "$POLICY"; ADDED_POLICY=1; fi
  ok=0
  for i in 1 2 3; do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; then ok=1; break; fi
    sleep 5
  done
  [ "$ADDED_POLICY" = 1 ] && rm -f "$POLICY"
  if [ "$ok" != 1 ]; then log "apt-get install slurm-wlm failed"; exit 2; fi
fi

# --- munge -----------------------------------------------------------------------
if ! id munge >/dev/null 2>&1; then log "no munge user"; exit 1; fi
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge; chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
  touch "/run/munge/.dpdm-ci-started"
fi

# --- configuration ---------------------------------------------------------------
HOST="$(hostname -s)"
# CPUs, topology and memory as slurmd sees them (keep 512 MB for the system).
HW="$(slurmd -C | head -1)"
MEM="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")"; MEM="${MEM:-2048}"
MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))
CPUS="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")"; CPUS="${CPUS:-$(nproc)}"
TOPO="$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$HW" | tr '\n' ' ')"
TOPO="${TOPO:-CPUs=$CPUS}"
mkdir -p "$STATE/slurmctld" "$STATE/slurmd" "$CONF_DIR"
sed -e "s|@HOST@|$HOST|g" -e "s|@TOPO@|$TOPO|g" -e "s|@MEM@|$MEM|g" -e "s|@STATE@|$STATE|g" \
    -e "s|@GPUS@|$GPUS|g" "$HERE/slurm.conf.in" >"$CONF_DIR/slurm.conf.new"
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
{
  echo "# dpdm-ci: fake GPUs (no device behind them) so GPU jobs schedule on a CPU box."
  echo "AutoDetect=off"
  # One line per fake GPU: each needs its own File= (without one the node drains;
  # the same file twice is a fatal "duplicate device file name").
  for i in $(seq 0 $((GPUS - 1))); do
    [ -e "$STATE/fakegpu$i" ] || : >"$STATE/fakegpu$i"
    echo "Name=gpu File=$STATE/fakegpu$i"
  done
} >"$CONF_DIR/gres.conf"
# No cgroup plugins are used; an empty cgroup.conf silences slurmd's lookup.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# dpdm-ci" >"$CONF_DIR/cgroup.conf"

# --- daemons ---------------------------------------------------------------------
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
fail() {
  log "$1"; sinfo -N -l >&2 2>/dev/null || true
  tail -n 15 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 2>/dev/null || true
  exit 1
}
DEADLINE=$(( $(date +%s) + ${DPDM_SLURM_START_TIMEOUT:-90} ))
if ! pid_alive "$STATE/slurmctld.pid"; then
  log "starting slurmctld on $HOST ($CPUS CPUs, $MEM MB, $GPUS fake GPUs)"
  slurmctld -c || fail "slurmctld failed to start"   # -c: no jobs saved by an earlier run
fi
until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
  pid_alive "$STATE/slurmctld.pid" || fail "slurmctld died"
  [ "$(date +%s)" -lt "$DEADLINE" ] || fail "slurmctld does not answer"
  sleep 0.5
done
if ! pid_alive "$STATE/slurmd.pid"; then
  log "starting slurmd"
  slurmd || fail "slurmd failed to start"
fi
# Wait for the node; resume it if an earlier run left it down or drained.
while :; do
  st="$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)"
  case "$st" in
    idle|mix|alloc) log "node $HOST is $st"; echo "started"; exit 0 ;;
    down*|drain*|drng*|inval*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  pid_alive "$STATE/slurmd.pid" || fail "slurmd died"
  pid_alive "$STATE/slurmctld.pid" || fail "slurmctld died"
  [ "$(date +%s)" -lt "$DEADLINE" ] || fail "node $HOST did not become idle (state: ${st:-none})"
  sleep 0.5
done
