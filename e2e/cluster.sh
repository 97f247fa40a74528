#!/usr/bin/env bash
# Starts or stops a throwaway etcd + kube-apiserver on loopback.
#
#   e2e/cluster.sh start DIR   # certs, etcd, kube-apiserver; waits for /readyz
#   e2e/cluster.sh stop DIR    # stops both (data and logs stay in DIR)
#   e2e/cluster.sh status DIR  # exit 0 if both processes are alive
#
# start writes into DIR:
#   kubeconfig          admin (token in group system:masters), CA data inline
#   env                 shell-sourceable: ports, pids, server URL, token, paths
#   pki/                ca.crt/ca.key, apiserver.crt/key (signed by the CA),
#                       sa.key/sa.pub, admin.crt/key (client cert, system:masters),
#                       front-proxy-ca.crt/key and front-proxy-client.crt/key
#                       (the aggregator's identity towards aggregated APIs;
#                       --enable-aggregator-routing: it dials endpoint IPs)
#   tokens.csv          static token file
#   etcd-data/          etcd's data
#   etcd.log, kube-apiserver.log
#
# There is no controller-manager, scheduler or kubelet: no garbage collection,
# no namespace finalization, no pods run. Test against API objects only --
# unless e2e/nodes.sh adds them (start this with VIREO_E2E_BIND_ADDRESS=0.0.0.0
# so that nodes in their network namespaces reach the API server).
#
# Environment:
#   VIREO_E2E_BIN      directory holding kube-apiserver, etcd (and kubectl);
#                      default: the output of e2e/build-tools.sh (cached build)
#   VIREO_E2E_TIMEOUT  seconds to wait for etcd and for /readyz (default 120)
#   VIREO_E2E_FSYNC    set to 1 to keep etcd fsync on (default off: test data)
#   VIREO_E2E_PROFILING
#                      true serves kube-apiserver's /debug/pprof (default
#                      false); the scale bench's --pprof sets it
#   VIREO_E2E_APISERVER_V
#                      kube-apiserver's log verbosity (default 0); the scale
#                      bench sets 1, where the watchers it closes are logged
#   VIREO_E2E_BIND_ADDRESS
#                      kube-apiserver's --bind-address (default 127.0.0.1);
#                      0.0.0.0 for e2e/nodes.sh. DIR/kubeconfig still uses
#                      127.0.0.1; a specific address is added to the serving
#                      certificate's SANs (10.96.0.1, the `kubernetes` Service,
#                      always is).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }

[[ $# -eq 2 ]] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
timeout=${VIREO_E2E_TIMEOUT:-120}
bind_address=${VIREO_E2E_BIND_ADDRESS:-127.0.0.1}

# alive PID NAME: the pid runs a binary called NAME (guards against pid reuse).
alive() {
  local pid=$1 name=$2 exe
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ ${exe##*/} == "$name" || ${exe##*/} == "$name (deleted)" ]]
}

# still_starting PID NAME: the process we just started is alive. Right after
# `nohup BIN &` the PID is still the forked shell, then nohup, until it
# execs BIN (a busy machine makes that window long), so those count too.
# While the PID execs, /proc/PID/exe can be unreadable for a moment: that
# counts as starting too, unless the process is a zombie (it exited).
still_starting() {
  local pid=$1 name=$2 exe stat
  alive "$pid" "$name" && return 0
  kill -0 "$pid" 2>/dev/null || return 1
  if ! exe=$(readlink "/proc/$pid/exe" 2>/dev/null); then
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
    return
  fi
  [[ ${exe##*/} == bash || ${exe##*/} == nohup ]]
}

# stop_pid PID NAME: SIGTERM, wait up to 30s, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 i
  alive "$pid" "$name" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM; killing"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.1
  done
  die "$name (pid $pid) is still running"
}

load_env() {
  [[ -f $dir/env ]] || return 1
  # shellcheck disable=SC1091
  source "$dir/env"
}

do_stop() {
  if ! load_env; then
    log "no $dir/env: nothing to stop"
    return 0
  fi
  stop_pid "${APISERVER_PID:-}" kube-apiserver
  stop_pid "${ETCD_PID:-}" etcd
  log "stopped (data and logs kept in $dir)"
}

# ETCD_PORT, SERVER, ... come from DIR/env.
# shellcheck disable=SC2153
do_status() {
  load_env || { log "not started"; return 1; }
  local ok=0
  if alive "${ETCD_PID:-}" etcd; then log "etcd running (pid $ETCD_PID, port $ETCD_PORT)"; else log "etcd not running"; ok=1; fi
  if alive "${APISERVER_PID:-}" kube-apiserver; then
    log "kube-apiserver running (pid $APISERVER_PID, $SERVER)"
  else
    log "kube-apiserver not running"; ok=1
  fi
  return $ok
}

# A free loopback TCP port, from a range below the usual ephemeral range.
used_ports=()
free_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    [[ " ${used_ports[*]-} " == *" $p "* ]] && continue
    # Connection refused => nothing listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

gen_pki() {
  local pki=$dir/pki extra_san=""
  [[ $bind_address == 127.0.0.1 || $bind_address == 0.0.0.0 ]] || extra_san=",IP:$bind_address"
  mkdir -p "$pki"
  chmod 700 "$pki"
  (
    cd "$pki"
    exec 2>"$dir/openssl.log"
    # CA: a real CA certificate (basicConstraints CA:TRUE, keyCertSign); the
    # serving certificate below is a separate leaf signed by it. rustls rejects
    # a leaf used as its own CA.
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=vireo-e2e-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -addext "subjectKeyIdentifier=hash" \
      -out ca.crt

    # kube-apiserver serving certificate for 127.0.0.1 / localhost.
    openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
    cat >apiserver.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1${extra_san}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -sha256 -days 3650 -extfile apiserver.ext -out apiserver.crt

    # Admin client certificate (O=system:masters), for clients that prefer
    # certificates to the bearer token.
    openssl ecparam -name prime256v1 -genkey -noout -out admin.key
    openssl req -new -key admin.key -subj "/O=system:masters/CN=vireo-e2e-admin" -out admin.csr
    cat >admin.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EOF
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -sha256 -days 3650 -extfile admin.ext -out admin.crt

    # The front proxy: the CA kube-apiserver's aggregator proves itself with
    # to aggregated API servers (the agents' subresources.vireo.dev), kept
    # apart from the cluster CA as Kubernetes advises, and its client cert.
    openssl ecparam -name prime256v1 -genkey -noout -out front-proxy-ca.key
    openssl req -x509 -new -key front-proxy-ca.key -sha256 -days 3650 -subj "/CN=vireo-e2e-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -addext "subjectKeyIdentifier=hash" \
      -out front-proxy-ca.crt
    openssl ecparam -name prime256v1 -genkey -noout -out front-proxy-client.key
    openssl req -new -key front-proxy-client.key -subj "/CN=front-proxy-client" -out front-proxy-client.csr
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -sha256 -days 3650 -extfile admin.ext -out front-proxy-client.crt

    # Service-account token signing keypair.
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
    openssl pkey -in sa.key -pubout -out sa.pub

    openssl verify -CAfile ca.crt apiserver.crt admin.crt >&2
    openssl verify -CAfile front-proxy-ca.crt front-proxy-client.crt >&2
    rm -f ./*.csr ./*.ext ca.srl front-proxy-ca.srl
  ) || die "certificate generation failed, see $dir/openssl.log"
}

started_etcd=""
started_apiserver=""
cleanup_on_failure() {
  local rc=$?
  [[ $rc -eq 0 ]] && return 0
  log "start failed (exit $rc); stopping what was started"
  [[ -n $started_apiserver ]] && { tail -n 30 "$dir/kube-apiserver.log" >&2 || true; stop_pid "$started_apiserver" kube-apiserver || true; }
  [[ -n $started_etcd ]] && { tail -n 20 "$dir/etcd.log" >&2 || true; stop_pid "$started_etcd" etcd || true; }
  rm -f "$dir/env"
  return "$rc"
}

do_start() {
  if load_env && { alive "${ETCD_PID:-}" etcd || alive "${APISERVER_PID:-}" kube-apiserver; }; then
    die "a cluster is already running from $dir (run: $0 stop $dir)"
  fi
  rm -f "$dir/env"

  local bin=${VIREO_E2E_BIN:-}
  if [[ -z $bin ]]; then
    bin=$("$here/build-tools.sh" | tail -n 1)
  fi
  bin=$(cd "$bin" && pwd)
  local b
  for b in etcd kube-apiserver; do
    [[ -x $bin/$b ]] || die "$bin/$b not found (set VIREO_E2E_BIN or run e2e/build-tools.sh)"
  done
  command -v openssl >/dev/null || die "openssl is required"
  command -v curl >/dev/null || die "curl is required"

  trap cleanup_on_failure EXIT

  log "generating certificates and keys in $dir/pki"
  gen_pki
  local token
  token=$(openssl rand -hex 32)
  printf '%s,vireo-e2e-admin,vireo-e2e-admin,"system:masters"\n' "$token" >"$dir/tokens.csv"
  chmod 600 "$dir/tokens.csv"

  local etcd_port etcd_peer_port api_port
  etcd_port=$(free_port)
  used_ports+=("$etcd_port")
  etcd_peer_port=$(free_port)
  used_ports+=("$etcd_peer_port")
  api_port=$(free_port)

  # --- etcd ------------------------------------------------------------------
  local fsync=(--unsafe-no-fsync)
  [[ ${VIREO_E2E_FSYNC:-0} == 1 ]] && fsync=()
  mkdir -p "$dir/etcd-data"
  chmod 700 "$dir/etcd-data"
  log "starting etcd on 127.0.0.1:$etcd_port"
  nohup "$bin/etcd" \
    --name=vireo-e2e \
    --data-dir="$dir/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster="vireo-e2e=http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster-state=new \
    "${fsync[@]}" \
    </dev/null >"$dir/etcd.log" 2>&1 &
  started_etcd=$!

  local deadline=$((SECONDS + timeout))
  until curl -fsS "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; do
    still_starting "$started_etcd" etcd || die "etcd exited, see $dir/etcd.log"
    ((SECONDS < deadline)) || die "etcd not healthy after ${timeout}s, see $dir/etcd.log"
    sleep 0.2
  done
  log "etcd healthy (pid $started_etcd)"

  # --- kube-apiserver --------------------------------------------------------
  local pki=$dir/pki
  log "starting kube-apiserver on https://127.0.0.1:$api_port"
  nohup "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address="$bind_address" \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --cert-dir="$pki" \
    --tls-cert-file="$pki/apiserver.crt" \
    --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --token-auth-file="$dir/tokens.csv" \
    --endpoint-reconciler-type=none \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --kubelet-client-certificate="$pki/admin.crt" \
    --kubelet-client-key="$pki/admin.key" \
    --profiling="${VIREO_E2E_PROFILING:-false}" \
    --v="${VIREO_E2E_APISERVER_V:-0}" \
    --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$pki/front-proxy-client.crt" \
    --proxy-client-key-file="$pki/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  started_apiserver=$!

  local server="https://127.0.0.1:$api_port"
  deadline=$((SECONDS + timeout))
  until [[ $(curl -sS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
    "$server/readyz" 2>/dev/null) == ok ]]; do
    still_starting "$started_apiserver" kube-apiserver || die "kube-apiserver exited, see $dir/kube-apiserver.log"
    ((SECONDS < deadline)) || die "kube-apiserver not ready after ${timeout}s, see $dir/kube-apiserver.log"
    sleep 0.5
  done
  log "kube-apiserver ready (pid $started_apiserver)"

  # --- kubeconfig and env ----------------------------------------------------
  local ca_data
  ca_data=$(base64 -w0 <"$pki/ca.crt")
  umask 077
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vireo-e2e
  cluster:
    server: $server
    certificate-authority-data: $ca_data
users:
- name: vireo-e2e-admin
  user:
    token: $token
contexts:
- name: vireo-e2e
  context:
    cluster: vireo-e2e
    user: vireo-e2e-admin
    namespace: default
current-context: vireo-e2e
EOF
  cat >"$dir/env" <<EOF
# Written by e2e/cluster.sh start; source it.
VIREO_E2E_DIR=$dir
VIREO_E2E_BIN=$bin
KUBECONFIG=$dir/kubeconfig
SERVER=$server
ADMIN_TOKEN=$token
CA_FILE=$pki/ca.crt
ADMIN_CERT_FILE=$pki/admin.crt
ADMIN_KEY_FILE=$pki/admin.key
APISERVER_PORT=$api_port
APISERVER_BIND_ADDRESS=$bind_address
APISERVER_PID=$started_apiserver
ETCD_ENDPOINT=http://127.0.0.1:$etcd_port
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
ETCD_PID=$started_etcd
EOF
  trap - EXIT
  log "cluster up: $server (kubeconfig $dir/kubeconfig, env $dir/env)"
}

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac
