#!/usr/bin/env bash
# End-to-end test of deploy/swarm/docker-stack.yml on a real single-node Swarm:
# 3 actor replicas take distinct indices, the learner trains; the replay
# server's container is killed; Swarm restarts it, it restores its tables from
# its checkpoint volume, and the same learner and actors (never restarted)
# carry on: the learner finishes at --train_steps, train_step never reset.
# Then `docker stack rm` leaves nothing running.
#   docker/test_swarm.sh    (after docker/test_compose.sh --install; root)
# Leaves the swarm and stops the dockerd it started.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER_TEST_NAME=swarm-test
source docker/lib.sh

started=$(date +%s)
stack=sacswarm$$
work="$(mktemp -d /tmp/sac-swarm.XXXXXX)"
swarm_started=""

logs() { docker service logs --raw --no-trunc "${stack}_$1" 2>&1 || true; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for svc in replay_server learner actor evaluator; do
      echo "----- ${svc} (last 40 lines)" >&2
      logs "$svc" | grep -vE 'Gym|gym|^Please|^See|cuda|cuDNN|cuFFT|cuBLAS' | tail -n 40 >&2
    done
  fi
  docker stack rm "$stack" >/dev/null 2>&1 || true
  for _ in $(seq 60); do
    [ -z "$(docker ps -aq -f "label=com.docker.stack.namespace=$stack")" ] && break
    sleep 1
  done
  [ -n "$swarm_started" ] && docker swarm leave --force >/dev/null 2>&1 || true
  rm -rf "$work"
  stop_dockerd
}
trap cleanup EXIT

install_tools
start_dockerd
build_image

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != "active" ]; then
  say "docker swarm init"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  swarm_started=1
fi
node="$(docker node ls -q | head -n 1)"
docker node update --label-add sac.replay=true --label-add sac.eval=true "$node" >/dev/null

# The stack as users deploy it; only the flagfile differs: small counts, a
# fast environment, a checkpoint every 3 s.
cat >"$work/cluster.flags" <<'FLAGS'
--env=Pendulum-v1
--replay_address=replay_server:8000
--port=8000
--num_actors=3
--train_steps=3000
--initial_collect_steps=300
--replay_capacity=20000
--min_size_to_sample=300
--samples_per_insert=32
--batch_size=32
--actor_fc_layers=32,32
--critic_joint_fc_layers=32,32
--push_interval_steps=20
--pull_interval_steps=20
--policy_save_interval=100000
--checkpoint_interval_steps=100000
--checkpoint_interval_s=3
--actor_lease_grace_s=4
--eval_interval=100000
--num_eval_episodes=1
--video_episodes=0
--log_interval_s=2
--server_timeout_s=180
FLAGS
chmod 644 "$work/cluster.flags"
sed -e "s#file: ../../docker/cluster.flags#file: $work/cluster.flags#" \
    -e 's#replicas: 2#replicas: 3#' \
    deploy/swarm/docker-stack.yml >"$work/stack.yml"
grep -q "replicas: 3" "$work/stack.yml" || fail "could not set 3 actor replicas"

say "docker stack deploy ($stack: 3 actors)"
if ! docker stack deploy --resolve-image never -c "$work/stack.yml" "$stack" >"$work/deploy.log" 2>&1; then
  cat "$work/deploy.log" >&2; fail "docker stack deploy failed"
fi

# Waits until `$2` (a command) succeeds; $1 seconds at most.
wait_for() {
  local limit=$1; shift
  for _ in $(seq "$limit"); do "$@" && return 0; sleep 1; done
  return 1
}
three_indices() {
  [ "$(logs actor | grep -oE 'actor [0-9]+: took index' | sort -u | wc -l)" -ge 3 ]
}
wait_for 240 three_indices || fail "3 actors did not take indices within 240s"
ids="$(logs actor | grep -oE 'took index [0-9]+' | grep -oE '[0-9]+' | sort -n | tr '\n' ' ')"
[ "$ids" = "0 1 2 " ] || fail "actor indices not distinct 0 1 2: $ids"
say "actors took indices $ids"

last_step() { logs learner | grep -oE 'learner: train_step [0-9]+/' | tail -n 1 | grep -oE '[0-9]+' || echo 0; }
training() { [ "$(last_step)" -ge 300 ]; }
wait_for 300 training || fail "the learner did not reach train_step 300"
checkpointed() { logs replay_server | grep -qE 'checkpoint \(periodic\) written .*uniform_table=[1-9]'; }
wait_for 60 checkpointed || fail "the replay server wrote no checkpoint"
sleep 4  # Past another checkpoint.

learner_id="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_learner")"
actor_ids="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_actor" | sort | tr '\n' ' ')"
server_id="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_replay_server")"
[ -n "$learner_id" ] && [ -n "$server_id" ] || fail "learner or server container not found"
[ "$(echo $actor_ids | wc -w)" -eq 3 ] || fail "expected 3 actor containers: $actor_ids"
at_kill="$(last_step)"
say "killing the replay server's container at train_step $at_kill"
docker kill "$server_id" >/dev/null

new_server() {
  local id
  id="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_replay_server")"
  [ -n "$id" ] && [ "$id" != "$server_id" ]
}
wait_for 120 new_server || fail "Swarm did not restart the replay server"
# (Both servers' lines are in the service's log, not necessarily in order; the
# first one restored an empty directory.)
restored_line() { logs replay_server | grep -oE 'restored: actor_ids=[0-9]+, train_step=[0-9]+, uniform_table=[0-9]+, variables=[0-9]+' | grep -v 'uniform_table=0,' | tail -n 1; }
restored() { [ "$(logs replay_server | grep -c 'restored: ')" -ge 2 ]; }
wait_for 120 restored || fail "the restarted replay server did not log what it restored"
line="$(restored_line)"
say "restarted server $line"
items="$(echo "$line" | grep -oE 'uniform_table=[0-9]+' | grep -oE '[0-9]+')"
[ "$items" -gt 0 ] || fail "the replay table came back empty: $line"
echo "$line" | grep -q 'actor_ids=4093, train_step=1, .* variables=1' \
  || fail "not every table was restored: $line"

say "waiting for the learner to finish"
code="$(timeout 400 docker wait "$learner_id")" || fail "learner still running after 400s"
[ "$code" = "0" ] || fail "learner exited $code"
docker logs "$learner_id" >"$work/learner.log" 2>&1
grep -q 'learner: finished at train_step 3000 (started at 0)' "$work/learner.log" \
  || fail "learner did not finish at train_step 3000 from 0"
steps="$(grep -oE 'learner: train_step [0-9]+/' "$work/learner.log" | grep -oE '[0-9]+')"
echo "$steps" | sort -n -c 2>/dev/null || fail "train_step went backwards: $(echo $steps)"
[ "$(docker service ps -q "${stack}_learner" | wc -l)" -eq 1 ] || fail "the learner was restarted"
for id in $actor_ids; do
  code="$(timeout 120 docker wait "$id")" || fail "actor $id still running 120s after the learner"
  [ "$code" = "0" ] || fail "actor container $id exited $code"
done
[ "$(docker service ps -q "${stack}_actor" | wc -l)" -eq 3 ] || fail "an actor was restarted"
say "the same learner (trained $at_kill -> 3000, never reset) and 3 actors finished"

docker stack rm "$stack" >/dev/null
gone() {
  [ -z "$(docker ps -aq -f "label=com.docker.stack.namespace=$stack")" ] &&
  [ -z "$(docker service ls -q -f "label=com.docker.stack.namespace=$stack")" ] &&
  [ -z "$(docker network ls -q -f "label=com.docker.stack.namespace=$stack")" ]
}
wait_for 60 gone || fail "docker stack rm left containers, services or networks"
say "docker stack rm left nothing running"
say "PASS in $(( $(date +%s) - started ))s"
