#!/bin/bash
# Start (idempotently) or stop a single-node SLURM cluster on this machine, for trying
# sweeps locally and for the tests (tests/test_slurm.py). Debian 12 / Slurm 22.05, as root,
# no systemd needed: slurmctld + slurmd (+ munged) run as daemons with their state, spool,
# logs and PID files under $SLURM_DIR.
#
# Usage: slurm/local-cluster.sh [up|down|status]
#   env: SLURM_DIR     state folder (default /tmp/fedmpi-slurm)
#        SLURM_AUTH    munge (default) | none  (none: no munged; any local user can claim
#                      any uid, so only on a throwaway machine)
#        SLURM_INSTALL 1 = apt-get install the packages if missing (default 0: fail)
#        SLURM_ETC_CONF where the convenience link goes (default /etc/slurm/slurm.conf)
# After `up`, sbatch/squeue/scontrol find the cluster through /etc/slurm/slurm.conf (a
# symlink made here unless a real config exists) or `export SLURM_CONF=$SLURM_DIR/slurm.conf`;
# `down` removes that link again (only if it is ours). `status` prints one line, and
# sinfo's when the cluster is up; its exit status is 0 when up, 1 when down.
# Only one such cluster per machine: it listens on the default ports 6817/6818, on
# 127.0.0.1 (no name resolution needed).
set -euo pipefail
D=${SLURM_DIR:-/tmp/fedmpi-slurm}
AUTH=${SLURM_AUTH:-munge}
ETC_CONF=${SLURM_ETC_CONF:-/etc/slurm/slurm.conf}
H=$(hostname -s)
export SLURM_CONF=$D/slurm.conf
case "$AUTH" in munge|none) ;; *) echo "SLURM_AUTH must be munge or none" >&2; exit 2;; esac

# PID 1 of some VMs reaps orphans lazily and `kill -0` succeeds on a zombie: read /proc
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -r "/proc/$p/status" ] &&
  ! grep -q '^State:.*Z' "/proc/$p/status"; }

case "${1:-up}" in
  down)
    for p in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
      if alive "$p"; then kill "$(cat "$p")"; fi; done
    for p in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
      for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done; rm -f "$p"; done
    # the link `up` made would dangle (or point at a stopped cluster): remove it if ours
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$SLURM_CONF" ]; then
      rm -f "$ETC_CONF"
    fi
    echo "local SLURM cluster down ($D)"
    exit 0;;
  status)
    if alive "$D/slurmctld.pid" && alive "$D/slurmd.pid"; then
      echo "local SLURM cluster up ($D, $SLURM_CONF):"
      sinfo -h -o '%P %a %D %T %N'
      exit $?
    fi
    down=""
    for p in slurmctld slurmd; do alive "$D/$p.pid" || down="$down $p"; done
    echo "local SLURM cluster down ($D: not running:$down); start it with: $0 up"
    exit 1;;
  up) ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2;;
esac

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v sbatch >/dev/null || { [ "$AUTH" = munge ] && ! command -v munged >/dev/null; }; then
  if [ "${SLURM_INSTALL:-0}" != 1 ]; then
    echo "SLURM packages missing: apt-get install --no-install-recommends slurmctld slurmd" \
         "slurm-client munge (or run with SLURM_INSTALL=1)" >&2
    exit 3
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends slurmctld slurmd slurm-client munge
fi

mkdir -p "$D/state" "$D/spool" "$D/log"
cat > "$SLURM_CONF.new" <<EOF
ClusterName=fedmpi-local
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
KillWait=10
MinJobAge=300
AuthInfo=cred_expire=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,bf_interval=1,sched_interval=1
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
$(slurmd -C | head -1) NodeAddr=127.0.0.1
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
mv "$SLURM_CONF.new" "$SLURM_CONF"
# let plain `sbatch` etc. find it without SLURM_CONF (unless a real config exists)
mkdir -p "$(dirname "$ETC_CONF")"
if [ ! -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
  ln -sfn "$SLURM_CONF" "$ETC_CONF"
fi
if [ "$AUTH" = munge ] && ! munge -n >/dev/null 2>&1; then  # no working munged yet
  install -d -o munge -g munge -m 755 /run/munge "$D/munge"
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey -c
  runuser -u munge -- munged --pid-file="$D/munge/munged.pid"
fi
alive "$D/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
alive "$D/slurmd.pid" || slurmd -f "$SLURM_CONF"
for _ in $(seq 120); do
  if alive "$D/slurmctld.pid" && alive "$D/slurmd.pid"; then
    case "$(sinfo -h -o %T 2>/dev/null)" in idle|mixed|allocated) exit 0;; esac
  fi
  sleep 0.25
done
echo "slurm did not come up; see $D/log" >&2
exit 1
