#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine (root), for multi-node jobs without a cluster:
#   bash launch/local-slurm/two-nodes.sh start [STATE_DIR]   # prints the SLURM_CONF to export
#   bash launch/local-slurm/two-nodes.sh stop [STATE_DIR]    # daemons, namespaces and interfaces gone
# Each node is a network namespace (n1 10.231.0.11, n2 10.231.0.12) joined by a veth pair to a bridge
# that holds 10.231.0.1/24, an address that exists only on this machine; the namespaces have no route
# out, and nothing in /etc changes. slurmctld runs in the root namespace on its own ports; each node's
# slurmd runs in its namespace (nsenter --net: `ip netns exec` remounts /sys, and slurmd then stops
# with "No filesystem mounted on /sys/fs/cgroup") with a hostname of its own and a hosts file naming the
# controller and both nodes bind-mounted over /etc/hosts (unshare --uts --mount), so names resolve from
# that file alone and a job's tasks on n2 reach its master on n1 over the bridge, as on a cluster.
# Its own state directory and ports (6827 and 6828; VLMTRAIN_SLURM_2N_PORT=N picks N and N+1): it runs
# beside the single-node cluster of start.sh. Start and stop may be repeated.
set -euo pipefail
source "$(dirname "$0")/common.sh"
action="${1:-start}"
state="${2:-${VLMTRAIN_SLURM_2N_DIR:-/tmp/vlmtrain-slurm-2n}}"
port="${VLMTRAIN_SLURM_2N_PORT:-6827}"
cpus="${VLMTRAIN_SLURM_CPUS:-16}"  # per node: more slots than cores, test jobs are small
net=10.231.0  # a private /24 of this machine's only
bridge=vlmtrain-br0
nodes=(n1 n2)

address() { [ "$1" = n1 ] && echo "$net.11" || echo "$net.12"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }

no_ipv6() {  # IPv4 only: no link-local address, no router solicitation
  local conf="/proc/sys/net/ipv6/conf/$1/disable_ipv6"
  if [ -e "$conf" ]; then echo 1 > "$conf"; fi
}

network_up() {
  ip link show "$bridge" > /dev/null 2>&1 || ip link add "$bridge" type bridge
  no_ipv6 "$bridge"
  ip addr show dev "$bridge" | grep -q "inet $net.1/" || ip addr add "$net.1/24" dev "$bridge"
  ip link set "$bridge" up
  for node in "${nodes[@]}"; do
    ns="vlmtrain-$node"
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "vlmt-$node" > /dev/null 2>&1; then
      ip link add "vlmt-$node" type veth peer name "vlmt-$node-in"
      ip link set "vlmt-$node-in" netns "$ns"
      ip -n "$ns" link set "vlmt-$node-in" name eth0
    fi
    no_ipv6 "vlmt-$node"
    nsenter "--net=/run/netns/$ns" bash -c "$(declare -f no_ipv6); no_ipv6 eth0"
    ip link set "vlmt-$node" master "$bridge" up
    ip -n "$ns" addr show dev eth0 | grep -q "inet $(address "$node")/" ||
      ip -n "$ns" addr add "$(address "$node")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up  # its one route: the /24 of the bridge
  done
}

write_config() {
  mkdir -p "$state/state"
  printf '127.0.0.1 localhost\n%s.1 ctl\n%s.11 n1\n%s.12 n2\n' "$net" "$net" "$net" | put_file "$state/hosts"
  put_file "$state/resolv.conf" < /dev/null  # no name server: names come from the hosts file only
  {
    cluster_conf vlmtrain-two-nodes "ctl($net.1)" "$port" "$state" "-%n"
    echo "NodeName=n1 NodeAddr=$net.11 CPUs=$cpus RealMemory=16000 State=UNKNOWN"
    echo "NodeName=n2 NodeAddr=$net.12 CPUs=$cpus RealMemory=16000 State=UNKNOWN"
    echo "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } | put_file "$state/slurm.conf"
}

# In a node's namespaces: its hostname, the hosts file and an empty resolv.conf, then the daemon.
in_node() {
  local node="$1"
  shift
  local netns=()
  [ "$node" = ctl ] || netns=(nsenter "--net=/run/netns/vlmtrain-$node")
  "${netns[@]}" unshare --uts --mount sh -c \
    "mount --bind '$state/hosts' /etc/hosts && mount --bind '$state/resolv.conf' /etc/resolv.conf \
     && hostname $node && exec \"\$@\"" sh "$@"
}

start() {
  network_up
  write_config
  export SLURM_CONF="$state/slurm.conf"
  start_munge
  alive "$state/slurmctld.pid" || in_node ctl /usr/sbin/slurmctld -f "$SLURM_CONF"
  for node in "${nodes[@]}"; do
    mkdir -p "$state/spool-$node"
    alive "$state/slurmd-$node.pid" || in_node "$node" /usr/sbin/slurmd -N "$node" -f "$SLURM_CONF"
  done
  for _ in $(seq 60); do  # both nodes register within a few seconds
    if [ "$(sinfo -h -N -o %T 2> /dev/null | grep -cE '^(idle|mixed|allocated)')" = 2 ]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "error: the two local SLURM nodes did not come up; see $state/slurmctld.log and $state/slurmd-n*.log" >&2
  return 1
}

stop() {
  local pids=()
  for pidfile in "$state"/slurmd-*.pid "$state/slurmctld.pid"; do
    alive "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  for node in "${nodes[@]}"; do  # and what the nodes still run (a job's tasks)
    [ -e "/run/netns/vlmtrain-$node" ] && pids+=($(ip netns pids "vlmtrain-$node"))
  done
  [ "${#pids[@]}" = 0 ] || kill "${pids[@]}" 2> /dev/null || true
  for _ in $(seq 20); do
    kill -0 "${pids[@]}" 2> /dev/null || break
    sleep 0.5
  done
  [ "${#pids[@]}" = 0 ] || kill -9 "${pids[@]}" 2> /dev/null || true
  for node in "${nodes[@]}"; do  # a namespace takes its end of the veth pair with it
    [ -e "/run/netns/vlmtrain-$node" ] && ip netns del "vlmtrain-$node"
    ip link del "vlmt-$node" 2> /dev/null || true
  done
  ip link del "$bridge" 2> /dev/null || true
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
