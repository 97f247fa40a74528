#!/usr/bin/env bash
# Real nodes for the e2e cluster of e2e/cluster.sh: kube-scheduler and
# kube-controller-manager on the host, and N kubelet + containerd nodes, each
# in its own network, mount and UTS namespaces, on this one machine.
#
#   VIREO_E2E_BIND_ADDRESS=0.0.0.0 e2e/cluster.sh start DIR
#   e2e/nodes.sh start DIR [N]           # N nodes (default 2), waits for Ready
#   e2e/nodes.sh exec DIR NODE -- CMD... # CMD in NODE's network+mount+UTS ns
#   e2e/nodes.sh import DIR IMAGE.tar    # into every node's containerd
#   e2e/nodes.sh status DIR
#   e2e/nodes.sh stop DIR                # before e2e/cluster.sh stop DIR
#
# NODE is a node's name (vireo-node-1) or its number (1).
#
# Node i (named vireo-node-i) lives in the network namespace vireo-e2e-X-i
# (X is the second octet of the 10.X.0.0/16 the cluster uses: the first of
# 88..95 not in use on the host, or VIREO_E2E_NODE_NET):
#   veth ve2eX-i (host, 10.X.i.1/24) <-> eth0 (node, 10.X.i.2/24)
#   pods 10.X.(100+i).0/24 on the node's bridge cni0 (CNI bridge + host-local
#   + loopback, + portmap when iptables exists), routed from the host via
#   10.X.i.2; the host forwards between nodes (net.ipv4.ip_forward=1 while
#   any node runs, restored after the last one).
#   nft table `ip e2e-apiserver` in the node: DNAT of 10.96.0.1:443 (the
#   `kubernetes` Service, in the serving certificate) to the API server at
#   10.X.i.1:PORT, for pods (prerouting) and the node itself (output). kubelet
#   uses https://10.96.0.1 too.
# Its mount namespace (held by a `sleep` process, the node's "holder") is a
# slave of the host's with / made rshared, a sysfs of its own network
# namespace, and these bind-mounted from DIR/nodes/vireo-node-i/:
#   /var/lib/kubelet      kubelet/          /var/lib/containerd  containerd/
#   /var/log/pods         log-pods/         /run/containerd     run-containerd/
#   /var/log/containers   log-containers/   /etc/cni/net.d      cni-conf/
#   /var/lib/cni          cni-state/        /run/netns          netns/
#   /var/lib/vireo        vireo/   (the Vireo agent's state dir)
# cgroup root /vireo-e2e-X-i in every cgroup hierarchy.
#
# start writes DIR/nodes.env (shell-sourceable): NODES, NODE_NAMES, and per
# node i NODE_i_NAME, NODE_i_IP, NODE_i_HOST_IP, NODE_i_POD_CIDR,
# NODE_i_NETNS, NODE_i_PID (the holder: `nsenter -t PID -n -m -u -- CMD` runs
# CMD in the node), NODE_i_DIR, NODE_i_VIREO_DIR; plus SCHEDULER_PID,
# CONTROLLER_MANAGER_PID, NODE_NET. Logs: DIR/nodes/*.log and
# DIR/nodes/NAME/{kubelet,containerd,holder}.log.
#
# Environment:
#   VIREO_E2E_TIMEOUT   seconds to wait for the nodes to be Ready (default 180)
#   VIREO_E2E_NODE_NET  second octet X of 10.X.0.0/16 (default: first free of 88..95)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/nodes.sh
# Host-wide bookkeeping shared by every DIR's nodes (network choice, the
# sysctls to restore after the last node stops).
global=/run/vireo-e2e-nodes

log() { printf '[nodes] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  cat >&2 <<EOF
usage: $0 start DIR [N]
       $0 stop DIR
       $0 status DIR
       $0 exec DIR NODE -- CMD [ARG...]
       $0 import DIR IMAGE.tar
EOF
  exit 2
}

# Host sysctls that the nodes change: ip_forward (for traffic between nodes)
# and those kubelet sets on start (it is not namespaced: vm.* and kernel.*).
saved_sysctls=(net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# alive PID NAME: the pid runs a binary called NAME (guards against pid reuse).
alive() {
  local pid=$1 name=$2 exe
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [[ ${exe##*/} == "$name" ]]
}

# stop_pid PID NAME [SECONDS]: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 secs=${3:-15} i
  alive "$pid" "$name" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM; killing"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.1
  done
  log "warning: $name (pid $pid) is still running"
}

# ---------------------------------------------------------------------------
# Node layout (deterministic from the net X and the node number i).

node_name() { echo "vireo-node-$1"; }
node_netns() { echo "vireo-e2e-$net-$1"; }
node_veth() { echo "ve2e$net-$1"; }
node_cgroup() { echo "/vireo-e2e-$net-$1"; }
node_ip() { echo "10.$net.$1.2"; }
node_host_ip() { echo "10.$net.$1.1"; }
node_pod_cidr() { echo "10.$net.$((100 + $1)).0/24"; }
node_pod_gw() { echo "10.$net.$((100 + $1)).1"; }

# The node's directories under DIR/nodes/NAME and where they are mounted.
bind_pairs=(
  kubelet:/var/lib/kubelet
  log-pods:/var/log/pods
  log-containers:/var/log/containers
  containerd:/var/lib/containerd
  run-containerd:/run/containerd
  cni-conf:/etc/cni/net.d
  cni-state:/var/lib/cni
  netns:/run/netns
  vireo:/var/lib/vireo
)

# Every cgroup (v1 and v2) mount point on the host.
cgroup_mounts() {
  awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo | sort -u
}

# ---------------------------------------------------------------------------
# State: DIR/nodes/state is appended to while start goes, so that stop undoes
# a partial start too.

state_file() { echo "$dir/nodes/state"; }
record() { echo "$1" >>"$(state_file)"; }

load_state() {
  net="" nodes_count=0 scheduler_pid="" cm_pid=""
  declare -gA holder_pid=() containerd_pid=() kubelet_pid=()
  local f
  f=$(state_file)
  [[ -f $f ]] || return 1
  local line k v
  while IFS= read -r line; do
    [[ $line == *=* ]] || continue
    k=${line%%=*} v=${line#*=}
    case $k in
      NET) net=$v ;;
      NODES) nodes_count=$v ;;
      SCHEDULER_PID) scheduler_pid=$v ;;
      CONTROLLER_MANAGER_PID) cm_pid=$v ;;
      HOLDER_PID_*) holder_pid[${k#HOLDER_PID_}]=$v ;;
      CONTAINERD_PID_*) containerd_pid[${k#CONTAINERD_PID_}]=$v ;;
      KUBELET_PID_*) kubelet_pid[${k#KUBELET_PID_}]=$v ;;
    esac
  done <"$f"
  [[ -n $net ]]
}

# holder_ok I: node I's holder is alive and in node I's network namespace.
holder_ok() {
  local i=$1 pid=${holder_pid[$1]:-} ns
  alive "$pid" sleep || return 1
  ns=/run/netns/$(node_netns "$i")
  [[ -e $ns ]] || return 1
  [[ $(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) == "$(stat -L -c %i "$ns" 2>/dev/null)" ]]
}

# in_node I -- CMD: CMD in node I's network, mount and UTS namespaces.
in_node() {
  local i=$1
  shift
  [[ $1 == -- ]] && shift
  holder_ok "$i" || { log "node $(node_name "$i") is not running (no holder process)"; return 1; }
  nsenter -t "${holder_pid[$i]}" -n -m -u -- "$@"
}

# ---------------------------------------------------------------------------
# Host-wide network choice and sysctls (under a lock).

net_in_use() {
  local x=$1
  compgen -G "/run/netns/vireo-e2e-$x-*" >/dev/null && return 0
  ip -o link show 2>/dev/null | grep -q " ve2e$x-[0-9]*@" && return 0
  ip -4 route show 2>/dev/null | grep -q "^10\.$x\." && return 0
  ip -4 -o addr show 2>/dev/null | grep -q " 10\.$x\." && return 0
  return 1
}

# Any of our nodes running on this host (any DIR)?
any_nodes() {
  compgen -G "/run/netns/vireo-e2e-*" >/dev/null
}

save_sysctls() {
  [[ -f $global/sysctl.orig ]] && return 0
  local k
  for k in "${saved_sysctls[@]}"; do
    echo "$k=$(sysctl -n "$k")"
  done >"$global/sysctl.orig.tmp"
  mv "$global/sysctl.orig.tmp" "$global/sysctl.orig"
}

restore_sysctls() {
  [[ -f $global/sysctl.orig ]] || return 0
  local line
  while IFS= read -r line; do
    [[ $(sysctl -n "${line%%=*}" 2>/dev/null) == "${line#*=}" ]] && continue
    log "restoring ${line%%=*} = ${line#*=}"
    sysctl -q -w "$line" >/dev/null || log "warning: could not restore $line"
  done <"$global/sysctl.orig"
  rm -f "$global/sysctl.orig"
}

# ---------------------------------------------------------------------------
# PKI: client certificates signed by the cluster CA.

# client_cert OUT_BASE CN [O]
client_cert() {
  local base=$1 cn=$2 o=${3:-} subj
  subj="/CN=$cn"
  [[ -n $o ]] && subj="/O=$o/CN=$cn"
  openssl ecparam -name prime256v1 -genkey -noout -out "$base.key" 2>/dev/null
  openssl req -new -key "$base.key" -subj "$subj" -out "$base.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth" >"$base.ext"
  openssl x509 -req -in "$base.csr" -CA "$CA_FILE" -CAkey "$pki/ca.key" -CAcreateserial \
    -CAserial "$base.srl" -sha256 -days 3650 -extfile "$base.ext" -out "$base.crt" 2>/dev/null
  rm -f "$base.csr" "$base.ext" "$base.srl"
  chmod 600 "$base.key"
}

# kubeconfig OUT SERVER CERT KEY
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vireo-e2e
  cluster:
    server: $2
    certificate-authority: $CA_FILE
users:
- name: user
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: vireo-e2e
  context:
    cluster: vireo-e2e
    user: user
current-context: vireo-e2e
EOF
  chmod 600 "$1"
}

# ---------------------------------------------------------------------------
# The holder: runs inside `nsenter --net=NETNS unshare --mount --uts
# --propagation slave`, sets up the node's mount namespace, then sleeps.

do_holder() {
  local ndir=$1 name=$2
  echo "$name" >/proc/sys/kernel/hostname
  # A sysfs of the node's own network namespace (what /sys/class/net shows),
  # keeping the host's cgroup mounts under it.
  local keep=$ndir/.cgroup-keep
  mkdir -p "$keep"
  mount --rbind /sys/fs/cgroup "$keep"
  mount -t sysfs sysfs /sys
  mount --rbind "$keep" /sys/fs/cgroup
  umount -R -l "$keep"
  rmdir "$keep"
  local p src dst
  for p in "${bind_pairs[@]}"; do
    src=$ndir/${p%%:*} dst=${p#*:}
    mkdir -p "$src" "$dst"
    mount --bind "$src" "$dst"
  done
  # The chart mounts hostPath / with HostToContainer propagation.
  mount --make-rshared /
  touch "$ndir/.holder-ready"
  exec sleep infinity
}

# ---------------------------------------------------------------------------

print_failure_logs() {
  local i name f
  for ((i = 1; i <= nodes_count; i++)); do
    name=$(node_name "$i")
    for f in holder containerd kubelet; do
      [[ -s $dir/nodes/$name/$f.log ]] || continue
      log "--- $name: last lines of $dir/nodes/$name/$f.log"
      tail -n 25 "$dir/nodes/$name/$f.log" >&2 || true
    done
  done
  for f in kube-scheduler kube-controller-manager; do
    [[ -s $dir/nodes/$f.log ]] || continue
    log "--- last lines of $dir/nodes/$f.log"
    tail -n 15 "$dir/nodes/$f.log" >&2 || true
  done
}

cleanup_on_failure() {
  local rc=$?
  [[ $rc -eq 0 ]] && return 0
  trap - EXIT
  log "start failed (exit $rc); stopping what was started"
  print_failure_logs
  do_stop || true
  return "$rc"
}

load_cluster_env() {
  [[ -f $dir/env ]] || die "no $dir/env: start the cluster first (VIREO_E2E_BIND_ADDRESS=0.0.0.0 e2e/cluster.sh start $dir)"
  # shellcheck disable=SC1091
  source "$dir/env"
  pki=$dir/pki
}

wait_for() { # wait_for SECONDS WHAT CMD...: poll CMD every 0.2s
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@" 2>/dev/null; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

# setup_node_net I: network namespace, veth, addresses, routes, DNAT.
setup_node_net() {
  local i=$1 ns veth
  ns=$(node_netns "$i") veth=$(node_veth "$i")
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip addr add "$(node_host_ip "$i")/24" dev "$veth"
  ip link set "$veth" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "$(node_ip "$i")/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip route add default via "$(node_host_ip "$i")"
  ip netns exec "$ns" sysctl -q -w net.ipv4.ip_forward=1 >/dev/null
  ip route add "$(node_pod_cidr "$i")" via "$(node_ip "$i")" dev "$veth"
  ip netns exec "$ns" nft -f - <<EOF
table ip e2e-apiserver {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.1 tcp dport 443 dnat to $(node_host_ip "$i"):$APISERVER_PORT
  }
  chain output {
    type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.1 tcp dport 443 dnat to $(node_host_ip "$i"):$APISERVER_PORT
  }
}
EOF
}

# setup_node_cgroups I: the node's cgroup root in every hierarchy.
setup_node_cgroups() {
  local cg m
  cg=$(node_cgroup "$1")
  while IFS= read -r m; do
    mkdir -p "$m$cg"
    if [[ -f $m/cpuset.cpus ]]; then
      cat "$m/cpuset.cpus" >"$m$cg/cpuset.cpus"
      cat "$m/cpuset.mems" >"$m$cg/cpuset.mems"
    fi
  done < <(cgroup_mounts)
}

# start_node I: directories, configs, holder, containerd, pause image, kubelet.
start_node() {
  local i=$1 name ndir
  name=$(node_name "$i")
  ndir=$dir/nodes/$name
  # A node starts afresh: no containers, images, pods or agent state from an
  # earlier start in this DIR (their mounts went with that node's namespace).
  if [[ -e $ndir ]]; then
    awk -v d="$ndir/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo &&
      die "$ndir has mounts on the host; not wiping it"
    rm -rf --one-file-system "$ndir"
  fi
  mkdir -p "$ndir/pki"
  local p
  for p in "${bind_pairs[@]}"; do mkdir -p "$ndir/${p%%:*}"; done

  client_cert "$ndir/pki/kubelet-client" "system:node:$name" system:nodes
  kubeconfig "$ndir/kubelet.kubeconfig" https://10.96.0.1:443 \
    "$ndir/pki/kubelet-client.crt" "$ndir/pki/kubelet-client.key"
  sed -e "s|@CGROUP_ROOT@|$(node_cgroup "$i")|" -e "s|@NODE_IP@|$(node_ip "$i")|" \
    -e "s|@CA_FILE@|$CA_FILE|" "$here/nodes/kubelet.yaml.in" >"$ndir/kubelet.yaml"
  sed -e "s|@PAUSE_IMAGE@|$pause_ref|" -e "s|@RUNC@|$runc|" -e "s|@CNI_BIN_DIR@|$cni_bin|" \
    "$here/nodes/containerd.toml.in" >"$ndir/containerd.toml"
  local portmap=""
  if [[ -n $iptables ]]; then
    portmap=$',\n    { "type": "portmap", "capabilities": { "portMappings": true } }'
  fi
  local conf
  conf=$(sed -e "s|@POD_CIDR@|$(node_pod_cidr "$i")|" -e "s|@POD_GW@|$(node_pod_gw "$i")|" \
    "$here/nodes/cni.conflist.in")
  echo "${conf/@PORTMAP@/$portmap}" >"$ndir/cni-conf/10-vireo-e2e.conflist"

  setup_node_cgroups "$i"
  record "CGROUP_$i=$(node_cgroup "$i")"

  rm -f "$ndir/.holder-ready"
  nohup nsenter --net="/run/netns/$(node_netns "$i")" \
    unshare --mount --uts --propagation slave -- "$self" _holder "$ndir" "$name" \
    </dev/null >"$ndir/holder.log" 2>&1 &
  holder_pid[$i]=$!
  record "HOLDER_PID_$i=${holder_pid[$i]}"
  local deadline=$((SECONDS + 20))
  until [[ -e $ndir/.holder-ready ]]; do
    kill -0 "${holder_pid[$i]}" 2>/dev/null || die "$name's namespaces could not be set up (see $ndir/holder.log)"
    ((SECONDS < deadline)) || die "timed out waiting for $name's namespaces (see $ndir/holder.log)"
    sleep 0.1
  done
  wait_for 5 "$name's holder" holder_ok "$i"

  nohup nsenter -t "${holder_pid[$i]}" -n -m -u -- "$containerd" --config "$ndir/containerd.toml" \
    </dev/null >"$ndir/containerd.log" 2>&1 &
  containerd_pid[$i]=$!
  record "CONTAINERD_PID_$i=${containerd_pid[$i]}"
}

start_kubelet() {
  local i=$1 name ndir
  name=$(node_name "$i")
  ndir=$dir/nodes/$name
  wait_for 30 "$name's containerd (see $ndir/containerd.log)" \
    in_node "$i" ctr --address /run/containerd/containerd.sock version >/dev/null
  alive "${containerd_pid[$i]}" containerd || die "$name's containerd exited"
  in_node "$i" ctr --address /run/containerd/containerd.sock -n k8s.io images import \
    "$pause_tar" >"$ndir/import-pause.log" 2>&1 ||
    { cat "$ndir/import-pause.log" >&2; die "importing $pause_tar into $name failed"; }

  nohup nsenter -t "${holder_pid[$i]}" -n -m -u -- "$bin/kubelet" \
    --config="$ndir/kubelet.yaml" \
    --kubeconfig="$ndir/kubelet.kubeconfig" \
    --hostname-override="$name" \
    --node-ip="$(node_ip "$i")" \
    --v=1 \
    </dev/null >"$ndir/kubelet.log" 2>&1 &
  kubelet_pid[$i]=$!
  record "KUBELET_PID_$i=${kubelet_pid[$i]}"
}

start_control_plane() {
  local cp=$dir/nodes/pki
  mkdir -p "$cp"
  chmod 700 "$cp"
  client_cert "$cp/kube-scheduler" system:kube-scheduler
  client_cert "$cp/kube-controller-manager" system:kube-controller-manager
  kubeconfig "$dir/nodes/kube-scheduler.kubeconfig" "$SERVER" "$cp/kube-scheduler.crt" "$cp/kube-scheduler.key"
  kubeconfig "$dir/nodes/kube-controller-manager.kubeconfig" "$SERVER" \
    "$cp/kube-controller-manager.crt" "$cp/kube-controller-manager.key"

  log "starting kube-scheduler and kube-controller-manager"
  nohup "$bin/kube-scheduler" \
    --kubeconfig="$dir/nodes/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$dir/nodes/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$dir/nodes/kube-scheduler.kubeconfig" \
    --leader-elect=false \
    --secure-port=0 \
    </dev/null >"$dir/nodes/kube-scheduler.log" 2>&1 &
  scheduler_pid=$!
  record "SCHEDULER_PID=$scheduler_pid"

  # Service-account credentials per controller, the SA signing key (token
  # controller), the cluster CA (kube-root-ca.crt, CSR signing).
  nohup "$bin/kube-controller-manager" \
    --kubeconfig="$dir/nodes/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$dir/nodes/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$dir/nodes/kube-controller-manager.kubeconfig" \
    --leader-elect=false \
    --secure-port=0 \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$CA_FILE" \
    --cluster-signing-cert-file="$CA_FILE" \
    --cluster-signing-key-file="$pki/ca.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --allocate-node-cidrs=false \
    </dev/null >"$dir/nodes/kube-controller-manager.log" 2>&1 &
  cm_pid=$!
  record "CONTROLLER_MANAGER_PID=$cm_pid"
}

# nodes_ready: every node Ready, without the not-ready/unreachable taints, and
# the default ServiceAccount exists (pods are refused before it does).
nodes_ready() {
  local out i
  out=$("$bin/kubectl" --kubeconfig="$KUBECONFIG" get nodes -o \
    jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints[*].key}{"\n"}{end}') || return 1
  for ((i = 1; i <= nodes_count; i++)); do
    grep -Eq "^$(node_name "$i") True( |$)" <<<"$out" || return 1
  done
  ! grep -q 'node.kubernetes.io/not-ready\|node.kubernetes.io/unreachable' <<<"$out" || return 1
  "$bin/kubectl" --kubeconfig="$KUBECONFIG" -n default get serviceaccount default >/dev/null 2>&1
}

check_alive() {
  local i
  alive "$scheduler_pid" kube-scheduler || die "kube-scheduler exited"
  alive "$cm_pid" kube-controller-manager || die "kube-controller-manager exited"
  for ((i = 1; i <= nodes_count; i++)); do
    alive "${containerd_pid[$i]}" containerd || die "$(node_name "$i")'s containerd exited"
    alive "${kubelet_pid[$i]}" kubelet || die "$(node_name "$i")'s kubelet exited"
  done
}

do_start() {
  local n=${1:-2}
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99"
  load_cluster_env
  if load_state; then
    local i
    for ((i = 1; i <= nodes_count; i++)); do
      holder_ok "$i" && die "nodes are already running from $dir (run: $0 stop $dir)"
    done
    log "stale $(state_file) from an earlier start; cleaning up first"
    do_stop
  fi
  [[ ${APISERVER_BIND_ADDRESS:-127.0.0.1} != 127.0.0.1 ]] ||
    die "the API server of $dir listens on 127.0.0.1 only, out of the nodes' reach: start it with VIREO_E2E_BIND_ADDRESS=0.0.0.0 e2e/cluster.sh start $dir"

  bin=$VIREO_E2E_BIN
  local b
  for b in kubelet kube-scheduler kube-controller-manager kubectl; do
    [[ -x $bin/$b ]] || die "$bin/$b not found: the cluster was started with binaries from before e2e/build-tools.sh built the nodes' (restart it)"
  done
  pause_tar=$bin/../images/pause.tar
  [[ -f $pause_tar ]] || die "$pause_tar not found (e2e/build-tools.sh builds it)"
  pause_ref=$(cat "$bin/../images/pause.ref")
  containerd=$(command -v containerd) || die "containerd is not installed (scripts/setup)"
  runc=$(command -v runc || true)
  [[ -n $runc ]] || runc=/usr/sbin/runc
  [[ -x $runc ]] || die "runc is not installed (scripts/setup)"
  command -v containerd-shim-runc-v2 >/dev/null || die "containerd-shim-runc-v2 is not installed (scripts/setup)"
  command -v ctr >/dev/null || die "ctr is not installed (scripts/setup)"
  cni_bin=""
  for b in /usr/lib/cni /opt/cni/bin; do
    [[ -x $b/bridge && -x $b/host-local && -x $b/loopback ]] && { cni_bin=$b; break; }
  done
  [[ -n $cni_bin ]] || die "CNI plugins not found (containernetworking-plugins, scripts/setup)"
  iptables=""
  [[ -x $cni_bin/portmap ]] && iptables=$(command -v iptables || true)
  local t
  for t in nsenter unshare ip nft openssl; do
    command -v "$t" >/dev/null || die "$t is required"
  done

  local started=$SECONDS
  timeout=${VIREO_E2E_TIMEOUT:-180}
  mkdir -p "$dir/nodes" "$global"
  rm -f "$dir/nodes.env"
  trap cleanup_on_failure EXIT

  # Pick the network and create every node's netns under the host-wide lock,
  # so that two starts never pick the same 10.X.
  exec 8>"$global/.lock"
  flock 8
  if [[ -n ${VIREO_E2E_NODE_NET:-} ]]; then
    net=$VIREO_E2E_NODE_NET
    net_in_use "$net" && die "10.$net.0.0/16 is in use on this host"
  else
    net=""
    for t in 88 89 90 91 92 93 94 95; do
      net_in_use "$t" || { net=$t; break; }
    done
    [[ -n $net ]] || die "no free 10.X.0.0/16 in 10.88..10.95"
  fi
  nodes_count=$n
  declare -gA holder_pid=() containerd_pid=() kubelet_pid=()
  scheduler_pid="" cm_pid=""
  : >"$(state_file)"
  record "NET=$net"
  record "NODES=$n"
  save_sysctls
  sysctl -q -w net.ipv4.ip_forward=1 >/dev/null
  local i
  for ((i = 1; i <= n; i++)); do
    setup_node_net "$i"
  done
  flock -u 8
  exec 8>&-
  log "network 10.$net.0.0/16: nodes 10.$net.i.2, pods 10.$net.(100+i).0/24"

  "$bin/kubectl" --kubeconfig="$KUBECONFIG" apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: vireo-e2e:system:nodes
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:node
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: system:nodes
EOF
  # Node objects left from an earlier start in this cluster would read Ready
  # (their last status) before the new kubelets say anything.
  "$bin/kubectl" --kubeconfig="$KUBECONFIG" delete nodes --all --wait=false >/dev/null
  start_control_plane
  for ((i = 1; i <= n; i++)); do
    log "starting $(node_name "$i") ($(node_ip "$i"))"
    start_node "$i"
  done
  for ((i = 1; i <= n; i++)); do
    start_kubelet "$i"
  done

  log "waiting for $n node(s) to be Ready"
  local deadline=$((SECONDS + timeout))
  until nodes_ready; do
    check_alive
    ((SECONDS < deadline)) || die "nodes not Ready after ${timeout}s"
    sleep 0.5
  done

  write_nodes_env
  trap - EXIT
  log "$n node(s) Ready after $((SECONDS - started))s (env $dir/nodes.env)"
}

write_nodes_env() {
  local i names=() out=$dir/nodes.env
  for ((i = 1; i <= nodes_count; i++)); do names+=("$(node_name "$i")"); done
  {
    echo "# Written by e2e/nodes.sh start; source it. Run CMD in node i with"
    echo "#   e2e/nodes.sh exec $dir vireo-node-i -- CMD   or   \$NODE_i_EXEC CMD"
    echo "NODES=$nodes_count"
    echo "NODE_NAMES=\"${names[*]}\""
    echo "NODE_NET=$net"
    echo "NODES_SH=$self"
    echo "SCHEDULER_PID=$scheduler_pid"
    echo "CONTROLLER_MANAGER_PID=$cm_pid"
    for ((i = 1; i <= nodes_count; i++)); do
      echo "NODE_${i}_NAME=$(node_name "$i")"
      echo "NODE_${i}_IP=$(node_ip "$i")"
      echo "NODE_${i}_HOST_IP=$(node_host_ip "$i")"
      echo "NODE_${i}_POD_CIDR=$(node_pod_cidr "$i")"
      echo "NODE_${i}_NETNS=$(node_netns "$i")"
      echo "NODE_${i}_PID=${holder_pid[$i]}"
      echo "NODE_${i}_EXEC=\"nsenter -t ${holder_pid[$i]} -n -m -u --\""
      echo "NODE_${i}_DIR=$dir/nodes/$(node_name "$i")"
      echo "NODE_${i}_VIREO_DIR=$dir/nodes/$(node_name "$i")/vireo"
      echo "NODE_${i}_KUBELET_PID=${kubelet_pid[$i]}"
      echo "NODE_${i}_CONTAINERD_PID=${containerd_pid[$i]}"
    done
  } >"$out.tmp"
  mv "$out.tmp" "$out"
}

# ---------------------------------------------------------------------------

# pids_in_node I: every process in node I's network namespace, mount
# namespace (if its holder is known) or cgroup root (any hierarchy).
pids_in_node() {
  local i=$1 netino="" mntid="" cg m p
  [[ -e /run/netns/$(node_netns "$i") ]] && netino=$(stat -L -c %i "/run/netns/$(node_netns "$i")" 2>/dev/null || true)
  holder_ok "$i" && mntid=$(readlink "/proc/${holder_pid[$i]}/ns/mnt" 2>/dev/null || true)
  cg=$(node_cgroup "$i")
  {
    while IFS= read -r m; do
      [[ -d $m$cg ]] && find "$m$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    done < <(cgroup_mounts)
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      [[ $p == "$$" || $p == "$BASHPID" ]] && continue
      if [[ -n $netino && $(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null) == "$netino" ]]; then
        echo "$p"
      elif [[ -n $mntid && $(readlink "/proc/$p/ns/mnt" 2>/dev/null) == "$mntid" ]]; then
        echo "$p"
      fi
    done
  } | sort -un
}

stop_node() {
  local i=$1 name ndir pids k m cg
  name=$(node_name "$i")
  ndir=$dir/nodes/$name
  stop_pid "${kubelet_pid[$i]:-}" kubelet 15
  stop_pid "${containerd_pid[$i]:-}" containerd 10
  # Containers, shims and anything else left in the node (processes that
  # escaped the pod cgroups stay in the node's network namespace).
  for ((k = 0; k < 50; k++)); do
    pids=$(pids_in_node "$i")
    [[ -z $pids ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  [[ -n $pids ]] && log "warning: processes left in $name: $(echo $pids)"
  if [[ -e /run/netns/$(node_netns "$i") ]]; then
    ip netns del "$(node_netns "$i")" 2>/dev/null || log "warning: could not delete netns $(node_netns "$i")"
  fi
  ip link del "$(node_veth "$i")" 2>/dev/null || true
  ip route del "$(node_pod_cidr "$i")" 2>/dev/null || true
  cg=$(node_cgroup "$i")
  while IFS= read -r m; do
    [[ -d $m$cg ]] || continue
    # Deepest first; a cgroup whose last process just died may need a moment.
    for ((k = 0; k < 30; k++)); do
      find "$m$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [[ -d $m$cg ]] || break
      sleep 0.1
    done
    [[ -d $m$cg ]] && log "warning: could not remove cgroup $m$cg"
  done < <(cgroup_mounts)
  rm -f "$ndir/.holder-ready"
}

do_stop() {
  if ! load_state; then
    log "no $(state_file): nothing to stop"
    rm -f "$dir/nodes.env"
    return 0
  fi
  rm -f "$dir/nodes.env"
  local i
  # Kubelets first, all of them, so none reports the others' pods as lost.
  for ((i = 1; i <= nodes_count; i++)); do
    stop_pid "${kubelet_pid[$i]:-}" kubelet 15
  done
  for ((i = 1; i <= nodes_count; i++)); do
    stop_node "$i"
  done
  stop_pid "$scheduler_pid" kube-scheduler
  stop_pid "$cm_pid" kube-controller-manager
  # Mounts are per node namespace and went with it; a leftover would be a bug.
  local m
  while IFS= read -r m; do
    log "warning: unmounting leftover $m"
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  mkdir -p "$global"
  exec 8>"$global/.lock"
  flock 8
  any_nodes || restore_sysctls
  flock -u 8
  exec 8>&-
  mv "$(state_file)" "$(state_file).stopped"
  log "nodes stopped (logs kept in $dir/nodes)"
}

do_status() {
  load_state || { log "not started"; return 1; }
  local ok=0 i name
  if alive "$scheduler_pid" kube-scheduler; then log "kube-scheduler running (pid $scheduler_pid)"; else log "kube-scheduler not running"; ok=1; fi
  if alive "$cm_pid" kube-controller-manager; then log "kube-controller-manager running (pid $cm_pid)"; else log "kube-controller-manager not running"; ok=1; fi
  for ((i = 1; i <= nodes_count; i++)); do
    name=$(node_name "$i")
    if holder_ok "$i" && alive "${containerd_pid[$i]:-}" containerd && alive "${kubelet_pid[$i]:-}" kubelet; then
      log "$name running ($(node_ip "$i"); holder ${holder_pid[$i]}, containerd ${containerd_pid[$i]}, kubelet ${kubelet_pid[$i]})"
    else
      log "$name not (fully) running"
      ok=1
    fi
  done
  return $ok
}

# node_index NODE: the number of a node given by name or number.
node_index() {
  local x=$1
  x=${x#vireo-node-}
  [[ $x =~ ^[1-9][0-9]?$ ]] && ((x <= nodes_count)) || die "no node $1 (nodes: 1..$nodes_count)"
  echo "$x"
}

do_exec() {
  load_state || die "nodes of $dir are not running"
  local i
  i=$(node_index "$1")
  shift
  [[ ${1:-} == -- ]] && shift
  [[ $# -gt 0 ]] || usage
  holder_ok "$i" || die "node $(node_name "$i") is not running"
  exec nsenter -t "${holder_pid[$i]}" -n -m -u -- "$@"
}

# normalize_ref REF: the reference the way containerd's CRI looks it up
# (vireo:0.1.0 -> docker.io/library/vireo:0.1.0), as e2e/nodes/mkimage.sh.
normalize_ref() {
  local name=${1%%@*} first
  first=${name%%/*}
  if [[ $name != */* ]]; then
    name=docker.io/library/$name
  elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
    name=docker.io/$name
  fi
  [[ ${name##*/} == *:* ]] || name=$name:latest
  echo "$name"
}

# import: docker archives get normalized names from ctr, OCI archives keep the
# name of their io.containerd.image.name (or ref.name) annotation as it is;
# a short one (vireo:0.1.0) is tagged with its normalized name as well, which
# is what a pod's `image: vireo:0.1.0` resolves to.
do_import() {
  local tarball=$1
  [[ -f $tarball ]] || die "$tarball: no such file"
  tarball=$(cd "$(dirname "$tarball")" && pwd)/$(basename "$tarball")
  load_state || die "nodes of $dir are not running"
  local i out
  for ((i = 1; i <= nodes_count; i++)); do
    out=$(in_node "$i" ctr --address /run/containerd/containerd.sock -n k8s.io images import \
      "$tarball" 2>&1) || { echo "$out" >&2; die "import into $(node_name "$i") failed"; }
    local names=() ref full
    mapfile -t names < <(sed -n 's/^unpacking \([^ ]*\) .*/\1/p' <<<"$out")
    [[ ${#names[@]} -gt 0 ]] || { echo "$out" >&2; die "$tarball holds no named image"; }
    for ref in "${names[@]}"; do
      full=$(normalize_ref "$ref")
      if [[ $full != "$ref" ]]; then
        in_node "$i" ctr --address /run/containerd/containerd.sock -n k8s.io images tag --force \
          "$ref" "$full" >/dev/null || die "tagging $ref as $full in $(node_name "$i") failed"
      fi
      log "$(node_name "$i"): imported $full"
    done
  done
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
if [[ $cmd == _holder ]]; then
  do_holder "$@"
fi
[[ $# -ge 1 ]] || usage
mkdir -p "$1"
dir=$(cd "$1" && pwd)
shift
[[ $(id -u) -eq 0 ]] || die "nodes need root (network namespaces, mounts, cgroups)"

case $cmd in
  start) [[ $# -le 1 ]] || usage; do_start "$@" ;;
  stop) [[ $# -eq 0 ]] || usage; do_stop ;;
  status) [[ $# -eq 0 ]] || usage; do_status ;;
  exec) [[ $# -ge 2 ]] || usage; do_exec "$@" ;;
  import) [[ $# -eq 1 ]] || usage; do_import "$1" ;;
  *) usage ;;
esac
