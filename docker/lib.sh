# Shared by docker/test_compose.sh and docker/test_swarm.sh (sourced, not run).
# Needs root for apt-get and dockerd.

say() { echo "[${DOCKER_TEST_NAME:-docker-test}] $*"; }
fail() { echo "[${DOCKER_TEST_NAME:-docker-test}] FAIL: $*" >&2; exit 1; }

# Installs what is missing: docker.io, iptables, debootstrap, docker-compose.
install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Starts dockerd unless an engine answers; sets dockerd_pid when it started one.
dockerd_pid=""
start_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  say "starting dockerd (log: /tmp/dockerd.log)"
  dockerd >/tmp/dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || {
    tail -n 20 /tmp/dockerd.log >&2
    fail "the Docker engine did not come up within 60s (see /tmp/dockerd.log)"; }
}

stop_dockerd() {
  [ -n "$dockerd_pid" ] || return 0
  say "stopping dockerd"
  kill "$dockerd_pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
}

# The project image, on a locally built base (Docker Hub is out of reach).
build_image() {
  docker/build_base_image.sh python:3.11-slim
  say "building distributed-sac:latest"
  DOCKER_BUILDKIT=0 docker build -q -f docker/Dockerfile -t distributed-sac:latest . >/dev/null
}
