#!/usr/bin/env bash
# A real single-node Slurm on this machine, for testing the job scripts beside this file:
# munged and slurmctld + slurmd on localhost, everything (key, sockets, state, logs, slurm.conf)
# in the scratch folder given, so that it touches nothing system-wide and can run twice.
#
#   local_cluster.sh start SCRATCH   # starts the daemons; prints SLURM_CONF=SCRATCH/slurm/slurm.conf
#   local_cluster.sh stop SCRATCH    # stops what start started (by pid file)
#
# Needs root (slurmd runs jobs as their users) and Debian's slurm-wlm and munge. Fails loudly,
# with the daemons' logs, when the node does not come up.
set -euo pipefail
cmd="${1:?usage: local_cluster.sh start|stop SCRATCH}"
scratch="$(realpath -m "${2:?usage: local_cluster.sh start|stop SCRATCH}")"
m="$scratch/munge" s="$scratch/slurm"

stop() {
  for pidfile in "$s/slurmd.pid" "$s/slurmctld.pid" "$m/munged.pid"; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "local_cluster.sh: start or stop, not '$cmd'" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "local_cluster.sh: needs root (slurmd runs the jobs)" >&2; exit 1; }
for b in munged slurmctld slurmd sinfo; do
  command -v "$b" >/dev/null || { echo "local_cluster.sh: $b not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
done

# munge: its own key, socket and files, owned by the munge user.
mkdir -p "$m"
chown munge:munge "$m"
chmod 700 "$m"
if [ ! -f "$m/munge.key" ]; then
  dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$m/munge.key"
  chmod 400 "$m/munge.key"
fi
runuser -u munge -- /usr/sbin/munged --force --key-file="$m/munge.key" --socket="$m/munge.socket" \
  --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
munge --socket="$m/munge.socket" -n | unmunge --socket="$m/munge.socket" >/dev/null || {
  echo "local_cluster.sh: munge does not work:" >&2; cat "$m/munged.log" >&2; exit 1; }

# slurm: one node (this machine), one partition, no cgroups.
mkdir -p "$s/state" "$s/spool"
host="$(hostname -s)"
cpus="$(nproc)"
mem=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
cat > "$s/slurm.conf" <<CONF
ClusterName=pathkernel-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$m/munge.socket
CredType=cred/munge
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool
SlurmctldLogFile=$s/slurmctld.log
SlurmdLogFile=$s/slurmd.log
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd.pid
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$s/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "local_cluster.sh: the node did not come up in 30 s; sinfo says:" >&2
sinfo >&2 || true
tail -20 "$s/slurmctld.log" "$s/slurmd.log" >&2 || true
stop
exit 1
